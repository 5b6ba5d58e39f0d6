#!/usr/bin/env bash
# Prometheus (with Tidemark's alerting rules) and headless Chromium, for the
# monitoring tests and for looking at a run locally.
#
#   scripts/monitoring.sh install         apt-get the Debian packages prometheus and chromium if missing
#   scripts/monitoring.sh start [CONFIG]  start Prometheus on 127.0.0.1:$PROMETHEUS_PORT (19090)
#                                         with CONFIG (default templates/monitoring/prometheus.yml)
#   scripts/monitoring.sh stop|status
#
# Data in .stage/prometheus/ (wiped at each start: a scrape of this run only),
# log in .stage/logs/prometheus.log. start is idempotent only for the same
# CONFIG; a running Prometheus with another config is restarted.
set -euo pipefail
source "$(dirname "$0")/lib-service.sh"

PORT=${PROMETHEUS_PORT:-19090}
DATA=$STAGE/prometheus
LOG=$LOG_DIR/prometheus.log

install() {
  local missing=()
  command -v prometheus >/dev/null && command -v promtool >/dev/null || missing+=(prometheus)
  command -v chromium >/dev/null || missing+=(chromium)
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "monitoring: need root to install ${missing[*]} (apt-get)" >&2; return 1
  fi
  echo "monitoring: installing ${missing[*]} with apt-get" >&2
  # The Debian package would start its own Prometheus on 9090; policy-rc.d stops that.
  local policy=/usr/sbin/policy-rc.d created_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; created_policy=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if [ "$created_policy" = 1 ]; then rm -f "$policy"; fi
}

start() {
  local config
  config=$(realpath "${1:-$ROOT/templates/monitoring/prometheus.yml}")
  if [ -n "$(pid_of prometheus)" ]; then
    if [ "$(cat "$RUN_DIR/prometheus.config" 2>/dev/null)" = "$config" ]; then
      echo "prometheus: already running (pid $(pid_of prometheus)) on 127.0.0.1:$PORT"
      return 0
    fi
    stop_service prometheus "$PORT"
  fi
  install
  promtool check config "$config" >>"$LOG" 2>&1 || {
    echo "prometheus: $config does not check:" >&2; promtool check config "$config" >&2; return 1; }
  if port_open "$PORT"; then
    echo "prometheus: port $PORT is already taken by another process" >&2
    return 1
  fi
  rm -rf "$DATA"; mkdir -p "$DATA"
  cd "$ROOT"
  nohup prometheus --config.file="$config" --storage.tsdb.path="$DATA" \
    --web.listen-address="127.0.0.1:$PORT" >>"$LOG" 2>&1 < /dev/null &
  echo $! > "$RUN_DIR/prometheus.pid"
  echo "$config" > "$RUN_DIR/prometheus.config"
  if ! wait_ports 60 "$!" "$PORT"; then
    echo "prometheus: failed to start; last log lines:" >&2
    tail -30 "$LOG" >&2
    return 1
  fi
  echo "prometheus: running (pid $(pid_of prometheus)) on 127.0.0.1:$PORT with $config"
}

case "${1:-}" in
  install) install ;;
  start) start "${2:-}" ;;
  stop) stop_service prometheus "$PORT"; rm -f "$RUN_DIR/prometheus.config"; echo "prometheus: stopped" ;;
  status)
    if [ -n "$(pid_of prometheus)" ]; then
      echo "prometheus: running (pid $(pid_of prometheus)) on 127.0.0.1:$PORT"
    else
      echo "prometheus: stopped"; exit 3
    fi ;;
  *) echo "usage: $0 install|start [CONFIG]|stop|status" >&2; exit 2 ;;
esac
