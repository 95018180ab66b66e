#!/usr/bin/env bash
# Set up everything and run `lorank demo`: a real stdlib dataset, recommend on SmolLM2-135M.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/lorank demo --out lorank-demo "$@"
