"""Time and peak memory of the gradient spectrum against one forward+backward pass.

Usage (one process per model, so peak RSS is that model's; --calib 64 and 256 on each):
  .venv/bin/python benchmarks/gradient_cost.py --model smollm2-135m --calib 256 > benchmarks/results/gradient_cost_smollm2_calib256.json
  .venv/bin/python benchmarks/gradient_cost.py --model minilm-l6 --calib 256 > benchmarks/results/gradient_cost_minilm_calib256.json
The ratio compares two timings taken in the same process one after the other; load on the
other core moves both, but not always equally (a one-pass timing under load ran 2.7x the idle
one), so the recorded runs ran one at a time on an idle machine, OMP_NUM_THREADS=1.
SmolLM2-135M reads the demo's stdlib data, MiniLM-L6 the wordnet-lexname task; targets are all
linear layers, max_rank 64.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from lorank.api import prepare_inputs, versions
from lorank.data import collate
from lorank.demo import build_demo_data
from lorank.estimators.gradient import (
    REPLAY_MB,
    fit_head_on_frozen_features,
    gradient_spectrum,
)
from lorank.targets import resolve_targets
from lorank.tasks import build_task


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_pass_seconds(model, examples, pad_token_id, batch_size) -> float:
    """One forward + backward pass over the calibration set (summed loss, weights frozen),
    batched in length order: the analysis sorts each chunk by length to cut padding, so an
    unsorted baseline would be slower than need be and flatter the ratio."""
    examples = sorted(examples, key=lambda e: len(e["input_ids"]))
    for p in model.parameters():
        p.requires_grad_(False)
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    first.weight.requires_grad_(True)  # something to differentiate, like a LoRA step would
    start = time.perf_counter()
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i:i + batch_size], pad_token_id)
        model(**batch).loss.backward()
    first.weight.grad = None
    first.weight.requires_grad_(False)
    return time.perf_counter() - start


def measure(name: str, model_source: str, data: str, val: str | None, calib: int,
            max_length: int, batch_size: int = 8, replay_mb: float = REPLAY_MB) -> dict:
    loaded, prepared = prepare_inputs(model_source, data, val_data=val, max_length=max_length)
    targets = resolve_targets(loaded.model)
    sample = prepared.train[:calib]
    if prepared.task == "classification":
        fit_head_on_frozen_features(loaded.model, sample, pad_token_id=loaded.pad_token_id)
    rss_loaded = peak_rss_mib()
    base = one_pass_seconds(loaded.model, sample, loaded.pad_token_id, batch_size)
    start = time.perf_counter()
    spectrum = gradient_spectrum(loaded.model, sample, [t.name for t in targets.layers],
                                 pad_token_id=loaded.pad_token_id, max_rank=64,
                                 batch_size=batch_size, replay_mb=replay_mb, progress=False)
    seconds = time.perf_counter() - start
    methods = [layer.method for layer in spectrum.layers]
    return {"model": name, "calib_examples": len(sample), "targets": len(targets.layers),
            "sketched_layers": methods.count("sketch"), "exact_layers": methods.count("exact"),
            "one_forward_backward_s": round(base, 2), "gradient_spectrum_s": round(seconds, 2),
            "ratio": round(seconds / base, 2), "peak_rss_after_load_mib": round(rss_loaded),
            "peak_rss_after_analysis_mib": round(peak_rss_mib()),
            "global_rank": spectrum.global_rank()[0], "pass_3": spectrum.settings["pass_3"],
            "timings_s": {k: round(v, 2) for k, v in spectrum.settings["timings"].items()}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=("smollm2-135m", "minilm-l6"), required=True)
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--replay-mb", type=float, default=REPLAY_MB,
                        help="as in `lorank analyze` (0: pass 3 always runs as a pass)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    if args.model == "smollm2-135m":
        demo = build_demo_data(tmp / "demo.jsonl", n=400)
        row = measure(args.model, args.model, str(demo), None, args.calib, 192,
                      replay_mb=args.replay_mb)
    else:
        task = build_task("wordnet-lexname", tmp / "lexname")
        row = measure(args.model, args.model, str(task["train"]), str(task["val"]),
                      args.calib, 64, replay_mb=args.replay_mb)
    json.dump({"command": " ".join(sys.argv), "row": row, "threads": torch.get_num_threads(),
               "versions": versions()}, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
