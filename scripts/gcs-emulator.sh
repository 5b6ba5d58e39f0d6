#!/usr/bin/env bash
# A Cloud Storage emulator on 127.0.0.1: start | stop | status | env (idempotent).
#
#   scripts/gcs-emulator.sh start   # builds it if missing, starts it, waits until it answers
#   scripts/gcs-emulator.sh stop    # stops it and waits until the port is free
#   scripts/gcs-emulator.sh status  # exit 0 when running and answering
#   eval "$(scripts/gcs-emulator.sh env)"   # STORAGE_EMULATOR_HOST for clients
#
# The server is fake-gcs-server (github.com/fsouza/fake-gcs-server, from the Go
# module proxy, built into .stage/bin/), storing objects under
# .stage/gcs-emulator/data. Clients that honour STORAGE_EMULATOR_HOST (the
# google-cloud-storage library, hence Beam's gs:// filesystem) talk to it.
# It does not answer batch requests the way Cloud Storage does (parts without
# a Content-ID are skipped), so batched deletes and renames fail against it.
#
# Env: GCS_EMULATOR_PORT (14443). Logs: .stage/logs/gcs-emulator.log.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib-service.sh

VERSION=v1.56.1
PORT=${GCS_EMULATOR_PORT:-14443}
BIN=$STAGE/bin/fake-gcs-server-$VERSION
DATA=$STAGE/gcs-emulator/data
LOG=$LOG_DIR/gcs-emulator.log

say() { echo "gcs-emulator: $*" >&2; }

build() {
  [ -x "$BIN" ] && return 0
  if ! command -v go >/dev/null && [ -x /usr/local/go/bin/go ]; then PATH=$PATH:/usr/local/go/bin; fi
  command -v go >/dev/null || { say "go is not installed: cannot build fake-gcs-server"; return 1; }
  say "building fake-gcs-server $VERSION into $BIN"
  local gobin
  gobin=$(mktemp -d)
  if ! GOBIN=$gobin go install "github.com/fsouza/fake-gcs-server@$VERSION" >>"$LOG" 2>&1; then
    rm -rf "$gobin"; say "error: go install failed (see $LOG)"; return 1
  fi
  mkdir -p "$(dirname "$BIN")"
  mv "$gobin/fake-gcs-server" "$BIN"
  rm -rf "$gobin"
}

answers() { curl -fsS -o /dev/null "http://127.0.0.1:$PORT/storage/v1/b" 2>/dev/null; }

start() {
  local pid
  pid=$(pid_of gcs-emulator)
  if [ -n "$pid" ] && answers; then say "already running (pid $pid) on 127.0.0.1:$PORT"; return 0; fi
  if port_open "$PORT"; then say "error: 127.0.0.1:$PORT is already in use by another process"; return 1; fi
  build
  mkdir -p "$DATA"
  echo "=== $(date -u +%FT%TZ) start" >>"$LOG"
  setsid "$BIN" -scheme http -host 127.0.0.1 -port "$PORT" -public-host "127.0.0.1:$PORT" \
    -backend filesystem -filesystem-root "$DATA" -log-level warn >>"$LOG" 2>&1 </dev/null &
  echo $! >"$RUN_DIR/gcs-emulator.pid"
  wait_ports 60 "$!" "$PORT" || { say "error: did not start (see $LOG)"; return 1; }
  for _ in $(seq 1 100); do answers && break; sleep 0.1; done
  answers || { say "error: listening but not answering (see $LOG)"; return 1; }
  say "ready on 127.0.0.1:$PORT (pid $(pid_of gcs-emulator), data $DATA)"
}

status() {
  local pid
  pid=$(pid_of gcs-emulator)
  if [ -n "$pid" ] && answers; then echo "running (pid $pid) on 127.0.0.1:$PORT"; return 0; fi
  echo "not running"; return 1
}

case "${1:-}" in
  start) start ;;
  stop) stop_service gcs-emulator "$PORT"; say "stopped" ;;
  status) status ;;
  env) echo "export STORAGE_EMULATOR_HOST=http://127.0.0.1:$PORT" ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
