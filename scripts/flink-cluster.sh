#!/usr/bin/env bash
# A Flink 1.19 session cluster on 127.0.0.1: a JobManager and a TaskManager as
# separate JVMs, configured by templates/flink/config.yaml, and the Python
# worker pool the TaskManager asks for SDK workers (Beam's EXTERNAL
# environment). Jobs reach it through the Beam job server (scripts/flink.sh)
# with --flink_master=127.0.0.1:18081.
#   scripts/flink-cluster.sh start|stop|status
#   scripts/flink-cluster.sh start-taskmanager   (another TaskManager, e.g. after one died)
#   scripts/flink-cluster.sh clean-stale         (remove what dead TaskManagers and
#                                                a dead JobManager left)
# start is idempotent: it starts whatever is not running and waits until the
# TaskManager has registered its slots. Ports: REST FLINK_REST_PORT (18081),
# worker pool FLINK_WORKER_POOL_PORT (18050), Prometheus 19249-19259.
# Checkpoints and savepoints in .stage/flink-cluster/{checkpoints,savepoints};
# temporary files in .stage/flink-cluster/tmp/flink-jobmanager (the
# JobManager's) and tmp/NAME (TaskManager NAME's); logs in
# .stage/logs/flink-{jobmanager,taskmanager,worker-pool}.log.
set -euo pipefail
source "$(dirname "$0")/lib-service.sh"

REST_PORT=${FLINK_REST_PORT:-18081}
RPC_PORT=16123
POOL_PORT=${FLINK_WORKER_POOL_PORT:-18050}
LIB=$STAGE/java/flink-cluster/lib
CONF=$ROOT/templates/flink
DATA=$STAGE/flink-cluster
PYTHON=${TIDEMARK_PYTHON:-$ROOT/.venv/bin/python}
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
# Paths that depend on the checkout, as dynamic properties (-D key=value); each
# process adds its io.tmp.dirs.
DYNAMIC=(
  -D "state.checkpoints.dir=file://$DATA/checkpoints"
  -D "state.savepoints.dir=file://$DATA/savepoints"
)
# slf4j-simple logging: INFO, without a line per Kryo serializer created.
LOGGING=(
  -Dorg.slf4j.simpleLogger.showDateTime=true
  -Dorg.slf4j.simpleLogger.log.org.apache.flink.api.java.typeutils.runtime.kryo=warn
)

# Flink's start scripts size the JVM with BashJavaUtils; so do we. Prints the
# JVM flags (line 1) and the derived memory settings as -D flags (line 2).
resource_params() {
  java -cp "$LIB/*" org.apache.flink.runtime.util.bash.BashJavaUtils "$1" \
    --configDir "$CONF" "${DYNAMIC[@]}" 2>/dev/null \
    | sed -n 's/^BASH_JAVA_UTILS_EXEC_RESULT://p' | tail -2
}

rest() {
  curl -fsS --max-time 5 "http://127.0.0.1:$REST_PORT$1"
}

# clean_jobmanager_tmp: removes the temporary files of JobManagers that no longer
# run (called only when none does): tmp/flink-jobmanager, and what JobManagers
# that shared tmp/ with the TaskManagers left directly in it.
clean_jobmanager_tmp() {
  local path
  for path in "$DATA/tmp/flink-jobmanager" "$DATA"/tmp/jm_* "$DATA"/tmp/flink-rpc-akka*.jar \
      "$DATA"/tmp/jaas-*.conf "$DATA"/tmp/executionGraphStore-*; do
    [ -e "$path" ] || continue
    remove_stale "$path" "no JobManager is running"
  done
}

start_jobmanager() {
  if [ -n "$(pid_of flink-jobmanager)" ]; then return 0; fi
  for port in "$REST_PORT" "$RPC_PORT"; do
    if port_open "$port"; then
      echo "flink-cluster: port $port is already taken by another process" >&2
      return 1
    fi
  done
  local params jvm dyn
  params=$(resource_params GET_JM_RESOURCE_PARAMS)
  jvm=$(sed -n 1p <<<"$params"); dyn=$(sed -n 2p <<<"$params")
  # No JobManager runs: what an earlier one left (a killed one keeps its jm_*
  # working folder with every job's jars, ~190 MB a job) goes. Its own
  # temporary folder, so nothing of a TaskManager's is touched.
  clean_jobmanager_tmp
  mkdir -p "$DATA/tmp/flink-jobmanager"
  # shellcheck disable=SC2086  # word-split the computed flags
  nohup java $jvm "${JAVA_OPENS[@]}" -Djava.net.preferIPv4Stack=true "${LOGGING[@]}" \
    -Dlog.file="$LOG_DIR/flink-jobmanager.log" -cp "$LIB/*" \
    org.apache.flink.runtime.entrypoint.StandaloneSessionClusterEntrypoint \
    --configDir "$CONF" "${DYNAMIC[@]}" -D "io.tmp.dirs=$DATA/tmp/flink-jobmanager" $dyn \
    >>"$LOG_DIR/flink-jobmanager.log" 2>&1 </dev/null &
  echo $! > "$RUN_DIR/flink-jobmanager.pid"
  if ! wait_ports 90 "$!" "$REST_PORT" "$RPC_PORT"; then
    echo "flink-cluster: JobManager failed to start; last log lines:" >&2
    tail -30 "$LOG_DIR/flink-jobmanager.log" >&2
    return 1
  fi
  echo "flink-cluster: JobManager (pid $(pid_of flink-jobmanager)), REST on 127.0.0.1:$REST_PORT"
}

# A TaskManager keeps its working directory (tm_<resource id>: blob cache,
# local state; Flink puts it in io.tmp.dirs unless process.working-dir or
# process.taskmanager.working-dir says otherwise) and its spill files in
# io.tmp.dirs, and deletes them when it shuts down, not when it is killed. Each
# TaskManager NAME gets its own io.tmp.dirs, tmp/NAME, so what a dead one left
# is known by its name: tmp/NAME of a NAME whose pid file names no live process.

# remove_stale DIR WHY
remove_stale() {
  if rm -rf -- "$1"; then
    echo "flink-cluster: removed $1 ($2)"
  else
    echo "flink-cluster: could not remove $1" >&2
  fi
}

# clean_stale: removes tmp/NAME of every TaskManager NAME that is not running,
# and the tm_* folders directly in tmp/ (whose owner is unknown) once no
# TaskManager runs. The JobManager's files in tmp/ are kept.
clean_stale() {
  local dir name pidfile live=0
  for dir in "$DATA"/tmp/flink-taskmanager*; do
    [ -d "$dir" ] || continue
    name=$(basename "$dir")
    if [ -z "$(pid_of "$name")" ]; then
      remove_stale "$dir" "TaskManager $name is not running"
    fi
  done
  for pidfile in "$RUN_DIR"/flink-taskmanager*.pid; do
    [ -e "$pidfile" ] || continue
    if [ -n "$(pid_of "$(basename "$pidfile" .pid)")" ]; then live=1; fi
  done
  if [ "$live" -eq 0 ]; then
    for dir in "$DATA"/tmp/tm_*; do
      [ -d "$dir" ] || continue
      remove_stale "$dir" "no TaskManager is running"
    done
  fi
}

# start_taskmanager NAME: a TaskManager with its own pid file, log and
# temporary folder, after removing what dead TaskManagers left.
start_taskmanager() {
  local name=$1 params jvm dyn
  if [ -n "$(pid_of "$name")" ]; then return 0; fi
  params=$(resource_params GET_TM_RESOURCE_PARAMS)
  jvm=$(sed -n 1p <<<"$params"); dyn=$(sed -n 2p <<<"$params")
  clean_stale
  mkdir -p "$DATA/tmp/$name"
  # shellcheck disable=SC2086
  nohup java $jvm "${JAVA_OPENS[@]}" -Djava.net.preferIPv4Stack=true "${LOGGING[@]}" \
    -Dlog.file="$LOG_DIR/$name.log" -cp "$LIB/*" \
    org.apache.flink.runtime.taskexecutor.TaskManagerRunner \
    --configDir "$CONF" "${DYNAMIC[@]}" -D "io.tmp.dirs=$DATA/tmp/$name" $dyn \
    >>"$LOG_DIR/$name.log" 2>&1 </dev/null &
  echo $! > "$RUN_DIR/$name.pid"
  echo "flink-cluster: TaskManager $name (pid $!)"
}

start_worker_pool() {
  if [ -n "$(pid_of flink-worker-pool)" ]; then return 0; fi
  if port_open "$POOL_PORT"; then
    echo "flink-cluster: port $POOL_PORT is already taken by another process" >&2
    return 1
  fi
  # The workers' database credentials: a libpq password file (on Kubernetes a
  # mounted secret); scripts/postgres.sh writes the test database's.
  PGPASSFILE=${PGPASSFILE:-$STAGE/pgpass} \
    setsid nohup "$PYTHON" -m pipeline.launch.worker_pool --host 127.0.0.1 --port "$POOL_PORT" \
      >>"$LOG_DIR/flink-worker-pool.log" 2>&1 </dev/null &
  echo $! > "$RUN_DIR/flink-worker-pool.pid"
  if ! wait_ports 60 "$!" "$POOL_PORT"; then
    echo "flink-cluster: worker pool failed to start; last log lines:" >&2
    tail -30 "$LOG_DIR/flink-worker-pool.log" >&2
    return 1
  fi
  echo "flink-cluster: Python worker pool on 127.0.0.1:$POOL_PORT"
}

# wait_slots TIMEOUT_S: until the cluster offers at least one free slot per
# running TaskManager.
wait_slots() {
  local deadline=$(( $(date +%s) + $1 )) overview
  while :; do
    overview=$(rest /overview 2>/dev/null || true)
    if grep -q '"taskmanagers":[1-9]' <<<"$overview"; then return 0; fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      echo "flink-cluster: no TaskManager registered within $1 s; last log lines:" >&2
      tail -20 "$LOG_DIR/flink-taskmanager.log" >&2
      return 1
    fi
    sleep 1
  done
}

start() {
  require_staged flink-cluster
  mkdir -p "$DATA/checkpoints" "$DATA/savepoints" "$DATA/tmp"
  start_worker_pool
  start_jobmanager
  start_taskmanager flink-taskmanager
  wait_slots 90
  echo "flink-cluster: running: $(rest /overview)"
}

stop() {
  local rc=0 pidfile name
  for pidfile in "$RUN_DIR"/flink-taskmanager*.pid; do
    [ -e "$pidfile" ] || continue
    name=$(basename "$pidfile" .pid)
    stop_service "$name" || rc=1
  done
  stop_service flink-jobmanager "$REST_PORT" "$RPC_PORT" || rc=1
  stop_service flink-worker-pool "$POOL_PORT" || rc=1
  [ $rc -eq 0 ] && echo "flink-cluster: stopped"
  return $rc
}

case "${1:-}" in
  start) start ;;
  start-taskmanager)
    require_staged flink-cluster
    start_taskmanager "flink-taskmanager-$(date +%s%N)"
    wait_slots 90 ;;
  stop) stop ;;
  clean-stale)
    clean_stale
    if [ -z "$(pid_of flink-jobmanager)" ]; then clean_jobmanager_tmp; fi ;;
  status)
    if [ -n "$(pid_of flink-jobmanager)" ] && rest /overview >/dev/null 2>&1; then
      echo "flink-cluster: running: $(rest /overview)"
    else
      echo "flink-cluster: stopped"; exit 3
    fi ;;
  *) echo "usage: $0 start|stop|status|start-taskmanager|clean-stale" >&2; exit 2 ;;
esac
