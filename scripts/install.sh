#!/usr/bin/env bash
# Installs Tidemark and its Python dependencies into .venv (idempotent), at the
# versions pinned in templates/constraints.txt.
#   scripts/install.sh                        install (or bring up to date)
#   scripts/install.sh --update-constraints   resolve setup.py afresh in a new
#                                             venv and rewrite the constraints
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
CONSTRAINTS=templates/constraints.txt

if [ "${1:-}" = "--update-constraints" ]; then
  fresh=$(mktemp -d)
  trap 'rm -rf "$fresh"' EXIT
  "$PYTHON" -m venv "$fresh"
  "$fresh/bin/pip" install --quiet --disable-pip-version-check -e ".[test]"
  { sed -n '/^#/p' "$CONSTRAINTS"; "$fresh/bin/pip" freeze --exclude-editable; } > "$CONSTRAINTS.new"
  mv "$CONSTRAINTS.new" "$CONSTRAINTS"
  echo "install: $CONSTRAINTS rewritten ($(grep -vc '^#' "$CONSTRAINTS") pins)"
  exit 0
fi

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.tidemark-installed
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ] || [ "$CONSTRAINTS" -nt "$stamp" ]; then
  .venv/bin/pip install --quiet --disable-pip-version-check -c "$CONSTRAINTS" -e ".[test]"
  touch "$stamp"
fi

# Java classpaths for the Flink job server, Kafka IO expansion and the Kafka
# broker (integration tests); a no-op when already staged.
scripts/stage-java.sh
