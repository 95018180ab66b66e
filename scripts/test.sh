#!/usr/bin/env bash
# Set up everything and run the whole test suite (unit + integration on the packaged models).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -f scripts/install-task-data.sh ]; then
  bash scripts/install-task-data.sh
fi
.venv/bin/ruff check src tests
set +e
.venv/bin/python -m pytest "$@"
code=$?
set -e
if [ "$code" -eq 5 ]; then
  echo "pytest collected no tests"; exit 0
fi
exit "$code"
