# Shared helpers for scripts/kafka.sh and scripts/flink.sh (sourced, not run).
# A service is a background java process with a pid file under .stage/run/
# and a log under .stage/logs/.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STAGE=${TIDEMARK_STAGE:-$ROOT/.stage}
RUN_DIR=$STAGE/run
LOG_DIR=$STAGE/logs
mkdir -p "$RUN_DIR" "$LOG_DIR"

# pid_of NAME: the pid of a live service, or nothing.
pid_of() {
  local pidfile=$RUN_DIR/$1.pid pid
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    echo "$pid"
  fi
}

# port_open PORT: is something listening on 127.0.0.1:PORT?
port_open() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# wait_ports TIMEOUT_S PID PORT...: waits until every port listens; fails if
# the process dies or time runs out.
wait_ports() {
  local timeout=$1 pid=$2 deadline port
  shift 2
  deadline=$(( $(date +%s) + timeout ))
  for port in "$@"; do
    until port_open "$port"; do
      if ! kill -0 "$pid" 2>/dev/null; then
        echo "process $pid exited before port $port listened" >&2
        return 1
      fi
      if [ "$(date +%s)" -ge "$deadline" ]; then
        echo "port $port did not listen within ${timeout}s" >&2
        return 1
      fi
      sleep 0.5
    done
  done
}

# stop_service NAME PORT...: SIGTERM, wait (then SIGKILL), wait for ports to free.
stop_service() {
  local name=$1 pid i port
  shift
  pid=$(pid_of "$name")
  if [ -n "$pid" ]; then
    kill "$pid" 2>/dev/null || true
    for i in $(seq 1 60); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.5
    done
    if kill -0 "$pid" 2>/dev/null; then
      echo "$name: pid $pid ignored SIGTERM for 30 s; killing it" >&2
      kill -9 "$pid" 2>/dev/null || true
      sleep 1
    fi
  fi
  rm -f "$RUN_DIR/$name.pid"
  for port in "$@"; do
    for i in $(seq 1 40); do
      port_open "$port" || break
      sleep 0.5
    done
    if port_open "$port"; then
      echo "$name: port $port is still bound by another process" >&2
      return 1
    fi
  done
}

require_staged() {
  if [ ! -d "$STAGE/java/$1/lib" ]; then
    "$ROOT/scripts/stage-java.sh" "$1"
  fi
}
