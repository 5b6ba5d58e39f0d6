#!/usr/bin/env bash
# Beam's portable Flink job server (Beam 2.62.0, Flink 1.19, embedded [local]
# Flink cluster) and, from the same classpath, a standalone expansion service
# for Kafka IO whose Java transforms run EMBEDDED in the job server (the job
# server's own expansion port would give them a DOCKER environment).
#   scripts/flink.sh start|stop|status|clean-artifacts
# Ports: FLINK_JOB_PORT (18099), FLINK_ARTIFACT_PORT (18098),
# FLINK_EXPANSION_PORT (18097, the job server's), KAFKA_EXPANSION_PORT (18096).
# Logs in .stage/logs/flink-job-server.log and kafka-expansion.log; each job's
# staged artifacts in .stage/flink/artifacts/<sha256>/.
# start is idempotent and waits until every port listens.
set -euo pipefail
source "$(dirname "$0")/lib-service.sh"

JOB_PORT=${FLINK_JOB_PORT:-18099}
ARTIFACT_PORT=${FLINK_ARTIFACT_PORT:-18098}
EXPANSION_PORT=${FLINK_EXPANSION_PORT:-18097}
KAFKA_EXPANSION_PORT=${KAFKA_EXPANSION_PORT:-18096}
LIB=$STAGE/java/flink-job-server/lib
LOG=$LOG_DIR/flink-job-server.log
ARTIFACTS=$STAGE/flink/artifacts
PYTHON=${TIDEMARK_PYTHON:-$ROOT/.venv/bin/python}
# Flink 1.19 and Beam's harness reflect into the JDK: Java 17 needs these.
JAVA_OPENS=(
  --add-opens=java.base/java.lang=ALL-UNNAMED
  --add-opens=java.base/java.util=ALL-UNNAMED
  --add-opens=java.base/java.lang.reflect=ALL-UNNAMED
  --add-opens=java.base/java.io=ALL-UNNAMED
  --add-opens=java.base/java.net=ALL-UNNAMED
  --add-opens=java.base/java.nio=ALL-UNNAMED
  --add-opens=java.base/sun.nio.ch=ALL-UNNAMED
  --add-opens=java.base/java.util.concurrent=ALL-UNNAMED
  --add-opens=java.base/java.util.concurrent.atomic=ALL-UNNAMED
  --add-opens=java.base/java.time=ALL-UNNAMED
  --add-opens=java.base/java.text=ALL-UNNAMED
  --add-opens=java.sql/java.sql=ALL-UNNAMED
)

start_expansion() {
  if [ -n "$(pid_of kafka-expansion)" ]; then
    return 0
  fi
  if port_open "$KAFKA_EXPANSION_PORT"; then
    echo "flink: port $KAFKA_EXPANSION_PORT is already taken by another process" >&2
    return 1
  fi
  # The ExpansionService CLI takes a bare port (it listens on all interfaces).
  nohup java -Xmx512m "${JAVA_OPENS[@]}" -cp "$LIB/*" \
    org.apache.beam.sdk.expansion.service.ExpansionService "$KAFKA_EXPANSION_PORT" \
    --javaClassLookupAllowlistFile='*' --defaultEnvironmentType=EMBEDDED \
    --experiments=use_deprecated_read \
    >>"$LOG_DIR/kafka-expansion.log" 2>&1 < /dev/null &
  echo $! > "$RUN_DIR/kafka-expansion.pid"
  if ! wait_ports 90 "$!" "$KAFKA_EXPANSION_PORT"; then
    echo "flink: Kafka expansion service failed to start; last log lines:" >&2
    tail -30 "$LOG_DIR/kafka-expansion.log" >&2
    stop_service kafka-expansion "$KAFKA_EXPANSION_PORT" || true
    return 1
  fi
  echo "flink: Kafka expansion service (EMBEDDED) on localhost:$KAFKA_EXPANSION_PORT"
}

# clean_artifacts [--unrecorded]: removes the staged artifacts no job needs.
# The job server removes a job's artifacts when it sees the job end
# (--clean-artifacts-per-job, on by default), but a job submitted detached to a
# cluster never ends for it, and the cluster's TaskManagers read the files by
# path while the job can run (an SDK worker that fetches artifacts at start).
# So a detached submission names its cluster job in its folder and the folder
# goes once that job has ended (pipeline/deployment/flink_cluster.py); folders naming no
# job go only while the job server is stopped (--unrecorded), when no
# submission can be staging or running in it.
clean_artifacts() {
  [ -d "$ARTIFACTS" ] || return 0
  (cd "$ROOT" && "$PYTHON" -m pipeline.deployment.flink_cluster clean-artifacts "$ARTIFACTS" "$@") \
    || echo "flink: could not clean $ARTIFACTS" >&2
}

start() {
  require_staged flink-job-server
  start_expansion
  if [ -n "$(pid_of flink)" ]; then
    echo "flink: job server already running (pid $(pid_of flink)) on 127.0.0.1:$JOB_PORT"
    return 0
  fi
  require_staged flink-job-server
  local port
  for port in "$JOB_PORT" "$ARTIFACT_PORT" "$EXPANSION_PORT"; do
    if port_open "$port"; then
      echo "flink: port $port is already taken by another process" >&2
      return 1
    fi
  done
  clean_artifacts --unrecorded
  mkdir -p "$STAGE/flink/tmp"
  nohup java -Xmx${FLINK_JOB_SERVER_HEAP:-3g} "${JAVA_OPENS[@]}" \
    -Djava.io.tmpdir="$STAGE/flink/tmp" -Djava.net.preferIPv4Stack=true \
    -cp "$LIB/*" org.apache.beam.runners.flink.FlinkJobServerDriver \
    --job-host=127.0.0.1 --job-port="$JOB_PORT" --artifact-port="$ARTIFACT_PORT" \
    --expansion-port="$EXPANSION_PORT" --flink-master='[local]' \
    --artifacts-dir="$ARTIFACTS" \
    >>"$LOG" 2>&1 < /dev/null &
  echo $! > "$RUN_DIR/flink.pid"
  if ! wait_ports 120 "$!" "$JOB_PORT" "$ARTIFACT_PORT" "$EXPANSION_PORT"; then
    echo "flink: job server failed to start; last log lines:" >&2
    tail -30 "$LOG" >&2
    stop_service flink "$JOB_PORT" "$ARTIFACT_PORT" "$EXPANSION_PORT" || true
    return 1
  fi
  echo "flink: job server running (pid $(pid_of flink)) on 127.0.0.1:$JOB_PORT" \
    "(artifacts $ARTIFACT_PORT, expansion $EXPANSION_PORT)"
}

case "${1:-}" in
  start) start ;;
  stop)
    rc=0
    stop_service kafka-expansion "$KAFKA_EXPANSION_PORT" || rc=1
    stop_service flink "$JOB_PORT" "$ARTIFACT_PORT" "$EXPANSION_PORT" || rc=1
    [ $rc -eq 0 ] && echo "flink: stopped"
    exit $rc ;;
  clean-artifacts)
    if [ -n "$(pid_of flink)" ] || port_open "$JOB_PORT"; then
      clean_artifacts
    else
      clean_artifacts --unrecorded
    fi ;;
  status)
    if [ -n "$(pid_of flink)" ] && [ -n "$(pid_of kafka-expansion)" ]; then
      echo "flink: job server running (pid $(pid_of flink)) on 127.0.0.1:$JOB_PORT"
    else
      echo "flink: stopped"; exit 3
    fi ;;
  *) echo "usage: $0 start|stop|status|clean-artifacts" >&2; exit 2 ;;
esac
