#!/usr/bin/env bash
# The Pub/Sub emulator on 127.0.0.1: start | stop | status | env (idempotent).
#
#   scripts/pubsub-emulator.sh start   # installs if missing, starts, waits until ready
#   scripts/pubsub-emulator.sh stop    # stops it and waits until the port is free
#   scripts/pubsub-emulator.sh status  # exit 0 when running and answering
#   eval "$(scripts/pubsub-emulator.sh env)"   # PUBSUB_EMULATOR_HOST for clients
#
# Which server: Google's emulator from the Debian package
# google-cloud-cli-pubsub-emulator (installed with apt-get when its repository is
# reachable); otherwise a tiny Go server on cloud.google.com/go/pubsub/v2/pstest
# (source in scripts/pstest-server/, modules from the Go module proxy, built into
# .stage/bin/). PUBSUB_EMULATOR_IMPL=java|pstest forces one.
#
# Env: PUBSUB_EMULATOR_PORT (18085), PUBSUB_EMULATOR_READY_TIMEOUT (90 s).
# Logs: .stage/logs/pubsub-emulator.log; pid: .stage/run/pubsub-emulator.pid.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

HOST=127.0.0.1
PORT=${PUBSUB_EMULATOR_PORT:-18085}
READY_TIMEOUT=${PUBSUB_EMULATOR_READY_TIMEOUT:-90}
STAGE=$ROOT/.stage
LOG=$STAGE/logs/pubsub-emulator.log
PIDFILE=$STAGE/run/pubsub-emulator.pid
PSTEST_BIN=$STAGE/bin/pstest-server
JAVA_LAUNCHER=/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator
mkdir -p "$STAGE/logs" "$STAGE/run" "$STAGE/bin"

say() { echo "pubsub-emulator: $*" >&2; }

port_open() {  # is something listening on HOST:PORT?
  (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null
}

running_pid() {
  [ -f "$PIDFILE" ] || return 1
  local pid
  pid=$(cat "$PIDFILE")
  kill -0 "$pid" 2>/dev/null && echo "$pid"
}

java_launcher() {
  if [ -x "$JAVA_LAUNCHER" ]; then echo "$JAVA_LAUNCHER"; return 0; fi
  local found
  found=$(dpkg -L google-cloud-cli-pubsub-emulator 2>/dev/null | grep '/bin/cloud-pubsub-emulator$' | head -1 || true)
  [ -n "$found" ] && [ -x "$found" ] && echo "$found"
}

install_java() {
  # Only Google's own apt repository serves this package; it may not be reachable.
  command -v apt-get >/dev/null || return 1
  [ "$(id -u)" = 0 ] || return 1
  say "installing google-cloud-cli-pubsub-emulator with apt-get"
  if ! apt-get install -y -q google-cloud-cli-pubsub-emulator >>"$LOG" 2>&1; then
    apt-get update -q >>"$LOG" 2>&1 || true
    apt-get install -y -q google-cloud-cli-pubsub-emulator >>"$LOG" 2>&1 || return 1
  fi
  command -v java >/dev/null || apt-get install -y -q default-jre-headless >>"$LOG" 2>&1 || return 1
  java_launcher >/dev/null
}

build_pstest() {
  if [ -x "$PSTEST_BIN" ] && [ "$PSTEST_BIN" -nt scripts/pstest-server/main.go ] &&
     [ "$PSTEST_BIN" -nt scripts/pstest-server/go.sum ]; then
    return 0
  fi
  if ! command -v go >/dev/null && [ -x /usr/local/go/bin/go ]; then PATH=$PATH:/usr/local/go/bin; fi
  command -v go >/dev/null || { say "go is not installed: cannot build the pstest fallback"; return 1; }
  say "building the pstest fallback server into $PSTEST_BIN"
  (cd scripts/pstest-server && GOFLAGS=-mod=mod go build -buildvcs=false -o "$PSTEST_BIN" .) >>"$LOG" 2>&1
}

# Prints the command that starts the server.
server_command() {
  local impl=${PUBSUB_EMULATOR_IMPL:-auto} launcher
  if [ "$impl" != pstest ]; then
    launcher=$(java_launcher || true)
    if [ -z "$launcher" ] && [ "$impl" != pstest ] && install_java; then
      launcher=$(java_launcher || true)
    fi
    if [ -n "$launcher" ] && command -v java >/dev/null; then
      echo "$launcher --host=$HOST --port=$PORT"
      return 0
    fi
    [ "$impl" = java ] && { say "the Java emulator cannot be installed here"; return 1; }
    say "the Java emulator is not installable here; falling back to pstest"
  fi
  build_pstest || return 1
  echo "$PSTEST_BIN --host=$HOST --port=$PORT"
}

start() {
  if pid=$(running_pid); then
    if port_open; then say "already running (pid $pid) on $HOST:$PORT"; return 0; fi
  fi
  if port_open; then
    say "error: $HOST:$PORT is already in use by another process"; return 1
  fi
  local cmd
  cmd=$(server_command) || { say "error: no emulator available (see $LOG)"; return 1; }
  : >"$LOG.start"
  say "starting: $cmd"
  echo "=== $(date -u +%FT%TZ) $cmd" >>"$LOG"
  # setsid: its own process group, so stop can end the JVM and its launcher together.
  setsid bash -c "exec $cmd" >"$LOG.start" 2>&1 </dev/null &
  echo $! >"$PIDFILE"
  local deadline=$((SECONDS + READY_TIMEOUT))
  while :; do
    if grep -q 'Server started' "$LOG.start" && port_open; then break; fi
    if ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
      cat "$LOG.start" >>"$LOG"; say "error: the emulator exited during start-up (see $LOG)"
      rm -f "$PIDFILE"; return 1
    fi
    if [ $SECONDS -ge $deadline ]; then
      say "error: not ready after ${READY_TIMEOUT}s (see $LOG)"
      stop; return 1
    fi
    sleep 0.2
  done
  say "ready on $HOST:$PORT (pid $(cat "$PIDFILE"), log $LOG.start)"
}

stop() {
  local pid
  if pid=$(running_pid); then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$PIDFILE"
  if [ -f "$LOG.start" ]; then cat "$LOG.start" >>"$LOG"; echo >>"$LOG"; rm -f "$LOG.start"; fi
  for _ in $(seq 1 100); do
    port_open || { say "stopped; $HOST:$PORT is free"; return 0; }
    sleep 0.1
  done
  say "error: $HOST:$PORT is still bound by a process this script did not start"
  return 1
}

status() {
  if pid=$(running_pid) && port_open; then
    echo "running (pid $pid) on $HOST:$PORT"; return 0
  fi
  echo "not running"; return 1
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) echo "export PUBSUB_EMULATOR_HOST=$HOST:$PORT" ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
