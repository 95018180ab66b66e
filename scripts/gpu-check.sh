#!/usr/bin/env bash
# The GPU path, end to end, in a few minutes on one CUDA GPU: recommend in bf16 with a probe
# budget on the packaged SmolLM2-135M, then a 2-worker sweep sharing one study, each step timed,
# with the peak GPU memory of each. Prints one summary block to paste into BENCHMARKS.md.
#   bash scripts/gpu-check.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-check}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
mkdir -p "$OUT"
"$PY" - <<'EOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu-check: no CUDA device visible to torch")
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__,
      "| CUDA", torch.version.cuda)
EOF
"$PY" -c "from lorank.demo import build_demo_data; build_demo_data('$OUT/data.jsonl', n=300, seed=0)"

run() {  # run NAME CMD...: wall time and peak GPU memory of one command
  local name=$1; shift
  local start end
  start=$(date +%s.%N)
  "$PY" - "$name" "$@" <<'EOF'
import runpy, sys, threading, time
import torch
name, argv = sys.argv[1], sys.argv[2:]
sys.argv = ["lorank", *argv]
try:
    runpy.run_module("lorank.cli", run_name="__main__")
except SystemExit as exit_:
    if exit_.code not in (0, None):
        raise
peak = torch.cuda.max_memory_allocated() / 2**30
print(f"gpu-check: {name}: peak GPU memory {peak:.2f} GiB")
EOF
  end=$(date +%s.%N)
  echo "gpu-check: $name: $(awk "BEGIN{print $end - $start}") s wall"
}

run "recommend bf16 + probe" recommend --model smollm2-135m --data "$OUT/data.jsonl" \
  --max-length 160 --dtype bfloat16 --device cuda --budget 60 --lr 2e-3 \
  --out "$OUT/recommend" --quiet
run "analyze bf16" analyze --model smollm2-135m --data "$OUT/data.jsonl" --max-length 160 \
  --dtype bfloat16 --device cuda --out "$OUT/analyze" --quiet
sweep=(sweep --model smollm2-135m --data "$OUT/data.jsonl" --max-length 160 --ranks 4,16
       --lrs 2e-3 --seeds 0 --steps 30 --batch-size 8 --dtype bfloat16 --device cuda
       --out "$OUT/sweep" --quiet)
start=$(date +%s.%N)
run "sweep worker 1" "${sweep[@]}" & first=$!
run "sweep worker 2" "${sweep[@]}"
wait "$first"
echo "gpu-check: 2-worker sweep: $(awk "BEGIN{print $(date +%s.%N) - $start}") s wall"
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rec = json.loads((out / "recommend" / "recommendation.json").read_text())
sweep = json.loads((out / "sweep" / "sweep.json").read_text())
print(f"gpu-check: recommend picked rank {rec['rank']} ({rec['confidence']}); evidence "
      + ", ".join(f"{e['name']} {e['cost_seconds']:.1f} s" for e in rec["evidence"]))
print(f"gpu-check: sweep finished {len(sweep['trials'])} trials, each point once: "
      f"{len({(t['rank'], t['lr'], t['seed']) for t in sweep['trials']}) == len(sweep['trials'])}")
EOF
