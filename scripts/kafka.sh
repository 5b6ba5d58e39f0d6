#!/usr/bin/env bash
# A single-node Kafka 4.1.0 broker (KRaft, broker+controller) on 127.0.0.1.
#   scripts/kafka.sh start|stop|status
# Ports: KAFKA_PORT (19092), KAFKA_CONTROLLER_PORT (19093). Data in
# .stage/kafka/, log in .stage/logs/kafka.log. start is idempotent and waits
# until the broker serves; stop frees both ports.
set -euo pipefail
source "$(dirname "$0")/lib-service.sh"

PORT=${KAFKA_PORT:-19092}
CONTROLLER_PORT=${KAFKA_CONTROLLER_PORT:-19093}
HOME_DIR=$STAGE/kafka
LIB=$STAGE/java/kafka-broker/lib
LOG=$LOG_DIR/kafka.log

write_config() {
  mkdir -p "$HOME_DIR/data"
  cat > "$HOME_DIR/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$PORT
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs=$HOME_DIR/data
num.partitions=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
log.message.timestamp.type=CreateTime
log.retention.ms=-1
PROPS
}

start() {
  if [ -n "$(pid_of kafka)" ]; then
    echo "kafka: already running (pid $(pid_of kafka)) on 127.0.0.1:$PORT"
    return 0
  fi
  require_staged kafka-broker
  write_config
  # A data folder formatted for other ports or another cluster is started afresh.
  if [ ! -f "$HOME_DIR/data/meta.properties" ] || \
      [ "$(cat "$HOME_DIR/formatted-for" 2>/dev/null)" != "$PORT/$CONTROLLER_PORT" ]; then
    rm -rf "$HOME_DIR/data"
    mkdir -p "$HOME_DIR/data"
    local cid
    cid=$(java -cp "$LIB/*" kafka.tools.StorageTool random-uuid 2>>"$LOG" | tail -1)
    java -cp "$LIB/*" kafka.tools.StorageTool format --standalone -t "$cid" \
      -c "$HOME_DIR/server.properties" >>"$LOG" 2>&1
    echo "$PORT/$CONTROLLER_PORT" > "$HOME_DIR/formatted-for"
  fi
  if port_open "$PORT" || port_open "$CONTROLLER_PORT"; then
    echo "kafka: port $PORT or $CONTROLLER_PORT is already taken by another process" >&2
    return 1
  fi
  local offset
  offset=$(stat -c %s "$LOG" 2>/dev/null || echo 0)
  nohup java -Xmx768m -Djava.net.preferIPv4Stack=true -cp "$LIB/*" kafka.Kafka \
    "$HOME_DIR/server.properties" >>"$LOG" 2>&1 < /dev/null &
  echo $! > "$RUN_DIR/kafka.pid"
  if ! wait_ports 90 "$!" "$CONTROLLER_PORT" "$PORT"; then
    echo "kafka: failed to start; last log lines:" >&2
    tail -30 "$LOG" >&2
    stop_service kafka "$PORT" "$CONTROLLER_PORT" || true
    return 1
  fi
  # The listener opens before the broker is unfenced; wait for the log line
  # (up to 2 min: with many topics on a busy machine it loads logs for long).
  local i
  for i in $(seq 1 240); do
    if tail -c +"$((offset + 1))" "$LOG" | grep -q 'Kafka Server started'; then
      echo "kafka: running (pid $(pid_of kafka)) on 127.0.0.1:$PORT"
      return 0
    fi
    sleep 0.5
  done
  echo "kafka: listening but not started after 120 s; see $LOG" >&2
  return 1
}

case "${1:-}" in
  start) start ;;
  stop) stop_service kafka "$PORT" "$CONTROLLER_PORT" && echo "kafka: stopped" ;;
  status)
    if [ -n "$(pid_of kafka)" ]; then
      echo "kafka: running (pid $(pid_of kafka)) on 127.0.0.1:$PORT"
    else
      echo "kafka: stopped"; exit 3
    fi ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
