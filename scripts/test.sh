#!/usr/bin/env bash
# Set-up command 2: install everything and run the whole test suite.
# Extra arguments go to pytest (e.g. -m "not integration", -k name).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
exec .venv/bin/python -m pytest "$@"
