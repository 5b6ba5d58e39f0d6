#!/usr/bin/env bash
# Installs Tidemark and its Python dependencies into .venv (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.tidemark-installed
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ]; then
  .venv/bin/pip install --quiet --disable-pip-version-check -e ".[test]"
  touch "$stamp"
fi

# Java classpaths for the Flink job server, Kafka IO expansion and the Kafka
# broker (integration tests); a no-op when already staged.
scripts/stage-java.sh
