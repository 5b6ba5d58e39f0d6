#!/usr/bin/env bash
# A private PostgreSQL 15 cluster for Tidemark's tests and local runs.
#
#   scripts/postgres.sh start    install (apt) if missing, initdb once, start, wait until ready
#   scripts/postgres.sh stop     stop it; the port is free afterwards
#   scripts/postgres.sh status   exit 0 and print the DSN if it is running, 3 if not
#   scripts/postgres.sh dsn      print the DSN
#
# Data in .stage/postgres, log in .stage/logs/postgres.log, listening on
# 127.0.0.1 only (no Unix socket). PostgreSQL refuses to run as root, so when
# run as root the server runs as the system user $TIDEMARK_PG_OS_USER
# (default postgres, created if missing) via runuser. If that user cannot
# enter the checkout (say it lies under /root), the data folder is made in
# /var/lib/tidemark and .stage/postgres links to it.
#
# Environment: TIDEMARK_PG_PORT (15433), TIDEMARK_PG_USER (tidemark),
# TIDEMARK_PG_PASSWORD (tidemark), TIDEMARK_PG_DB (tidemark),
# TIDEMARK_PG_DATA (.stage/postgres), TIDEMARK_PG_VERSION (15).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

PORT=${TIDEMARK_PG_PORT:-15433}
HOST=127.0.0.1
DB_USER=${TIDEMARK_PG_USER:-tidemark}
DB_PASSWORD=${TIDEMARK_PG_PASSWORD:-tidemark}
DB_NAME=${TIDEMARK_PG_DB:-tidemark}
VERSION=${TIDEMARK_PG_VERSION:-15}
DATA=${TIDEMARK_PG_DATA:-$ROOT/.stage/postgres}
LOGS=$ROOT/.stage/logs
LOG=$LOGS/postgres.log
OS_USER=${TIDEMARK_PG_OS_USER:-postgres}
BIN=/usr/lib/postgresql/$VERSION/bin

dsn() { echo "postgresql://$DB_USER:$DB_PASSWORD@$HOST:$PORT/$DB_NAME"; }

log() { echo "postgres.sh: $*" >&2; }

install_if_missing() {
  if [ -x "$BIN/postgres" ]; then return; fi
  log "PostgreSQL $VERSION not found in $BIN; installing postgresql-$VERSION with apt-get"
  if [ "$(id -u)" -ne 0 ]; then
    log "need root to install postgresql-$VERSION"; exit 1
  fi
  # The Debian package would start its own cluster on 5432; policy-rc.d stops that.
  local policy=/usr/sbin/policy-rc.d created_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; created_policy=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "postgresql-$VERSION" >/dev/null
  if [ "$created_policy" = 1 ]; then rm -f "$policy"; fi
  [ -x "$BIN/postgres" ] || { log "postgresql-$VERSION did not install $BIN/postgres"; exit 1; }
}

# as_server CMD...: runs CMD as the user that owns the cluster.
as_server() {
  if [ "$(id -u)" -eq 0 ]; then
    (cd / && runuser -u "$OS_USER" -- "$@")
  else
    "$@"
  fi
}

# reachable DIR: whether the server user can enter every folder down to DIR.
reachable() {
  local dir=$1
  while [ "$dir" != / ]; do
    runuser -u "$OS_USER" -- test -x "$dir" || return 1
    dir=$(dirname "$dir")
  done
}

prepare_dirs() {
  if [ "$(id -u)" -eq 0 ] && ! id -u "$OS_USER" >/dev/null 2>&1; then
    log "creating system user $OS_USER to run the server (it refuses root)"
    useradd --system --no-create-home --shell /usr/sbin/nologin "$OS_USER"
  fi
  mkdir -p "$LOGS" "$(dirname "$DATA")"
  if [ "$(id -u)" -eq 0 ] && [ ! -e "$DATA" ] && ! reachable "$(dirname "$DATA")"; then
    local real
    real=/var/lib/tidemark/postgres-$(printf '%s' "$DATA" | cksum | cut -d' ' -f1)
    log "$OS_USER cannot enter $(dirname "$DATA"); data in $real, linked from $DATA"
    mkdir -p "$real"
    ln -s "$real" "$DATA"
  fi
  mkdir -p "$DATA"
  if [ "$(id -u)" -eq 0 ]; then
    chown "$OS_USER" "$(readlink -f "$DATA")"
    reachable "$(readlink -f "$DATA")" || {
      log "$OS_USER cannot enter $(readlink -f "$DATA"); set TIDEMARK_PG_DATA"; exit 1; }
  fi
  chmod 700 "$(readlink -f "$DATA")"
}

initdb_once() {
  if [ -f "$DATA/PG_VERSION" ]; then return; fi
  log "initdb $DATA"
  local pwfile
  pwfile=$(mktemp)
  printf '%s\n' "$DB_PASSWORD" > "$pwfile"
  [ "$(id -u)" -eq 0 ] && chown "$OS_USER" "$pwfile"
  as_server "$BIN/initdb" -D "$(readlink -f "$DATA")" -U "$DB_USER" --pwfile="$pwfile" \
    --auth-local=scram-sha-256 --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 \
    >>"$LOG" 2>&1 || { rm -f "$pwfile"; log "initdb failed, see $LOG"; exit 1; }
  rm -f "$pwfile"
  cat >>"$DATA/postgresql.conf" <<EOF
# Tidemark: private test cluster
listen_addresses = '$HOST'
port = $PORT
unix_socket_directories = ''
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 100
EOF
}

ready() { "$BIN/pg_isready" -q -h "$HOST" -p "$PORT" -d "$DB_NAME" -U "$DB_USER"; }

running() { as_server "$BIN/pg_ctl" -D "$(readlink -f "$DATA")" status >/dev/null 2>&1; }

port_in_use() {
  (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null
}

create_database() {
  local psql=("$BIN/psql" -h "$HOST" -p "$PORT" -U "$DB_USER" -d postgres -tAq)
  if [ "$(PGPASSWORD=$DB_PASSWORD "${psql[@]}" -c \
      "SELECT 1 FROM pg_database WHERE datname = '$DB_NAME'")" != 1 ]; then
    PGPASSWORD=$DB_PASSWORD "${psql[@]}" -c "CREATE DATABASE \"$DB_NAME\"" >/dev/null
  fi
}

# A libpq password file for processes that get no password in their DSN (a
# customer file never holds one): the Flink cluster's worker pool reads it.
write_passfile() {
  local passfile=$ROOT/.stage/pgpass
  ( umask 077; printf '%s:%s:*:%s:%s\n' "$HOST" "$PORT" "$DB_USER" "$DB_PASSWORD" > "$passfile" )
}

start() {
  install_if_missing
  prepare_dirs
  initdb_once
  if ! running; then
    if port_in_use; then
      log "port $HOST:$PORT is taken by another process; set TIDEMARK_PG_PORT"; exit 1
    fi
    log "starting on $HOST:$PORT (log: $LOG)"
    # Without -l the server writes to pg_ctl's stdout: this shell opens the
    # log, so the server user needs no access to .stage/logs.
    as_server "$BIN/pg_ctl" -D "$(readlink -f "$DATA")" -o "-p $PORT" start -W >>"$LOG" 2>&1 </dev/null
  fi
  local waited=0
  until ready; do
    if [ "$waited" -ge 60 ]; then
      log "not ready after 60 s, see $LOG"; tail -20 "$LOG" >&2; exit 1
    fi
    sleep 0.5; waited=$((waited + 1))
  done
  create_database
  write_passfile
  dsn
}

stop() {
  if [ -f "$DATA/PG_VERSION" ] && running; then
    log "stopping"
    as_server "$BIN/pg_ctl" -D "$(readlink -f "$DATA")" stop -m fast -w -t 60 >/dev/null
  fi
  local waited=0
  while port_in_use; do
    if [ "$waited" -ge 40 ]; then log "port $HOST:$PORT is still bound"; exit 1; fi
    sleep 0.25; waited=$((waited + 1))
  done
}

status() {
  if [ -x "$BIN/pg_ctl" ] && [ -f "$DATA/PG_VERSION" ] && running && ready; then
    dsn
  else
    echo "not running" >&2
    exit 3
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  dsn) dsn ;;
  *) echo "usage: $0 start|stop|status|dsn" >&2; exit 2 ;;
esac
