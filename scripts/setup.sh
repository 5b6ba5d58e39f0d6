#!/usr/bin/env bash
# Set-up command 1: install everything, then run the main job on its embedded
# default (the bundled incident replay, DirectRunner, local files + SQLite).
# Extra arguments go to `python -m pipeline run`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
exec .venv/bin/python -m pipeline run "$@"
