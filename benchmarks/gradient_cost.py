"""Time and peak memory of the gradient spectrum against one forward+backward pass.

Usage (one process per model, so peak RSS is that model's; --calib 64 and 256 on each):
  .venv/bin/python benchmarks/gradient_cost.py --model smollm2-135m --calib 256 > benchmarks/results/gradient_cost_smollm2_calib256.json
  .venv/bin/python benchmarks/gradient_cost.py --model minilm-l6 --calib 256 > benchmarks/results/gradient_cost_minilm_calib256.json
The ratio compares two timings taken in the same process one after the other; load on the
other core moves both, but not always equally (a one-pass timing under load ran 2.7x the idle
one), so the recorded runs ran one at a time on an idle machine, OMP_NUM_THREADS=1.
SmolLM2-135M reads the demo's stdlib data, MiniLM-L6 the wordnet-lexname task; targets are all
linear layers, max_rank 64. The analysis timed is the whole of what `lorank analyze` runs on the
calibration set: on MiniLM (classification) the head fit on frozen features first (timings_s
"head_fit"; part of `gradient_spectrum(fit_head=True)`, which reads the features from passes
1-2's own forward, whose graphs are held until the head is fitted, when they fit in
--replay-mb: "head_fit_features"), then the gradient spectrum.

Three baselines, since "one forward+backward pass" depends on what the backward computes
(`one_pass_seconds`): frozen weights (the headline `ratio`, the strictest), the target layers'
full-weight gradients (the quantity the analysis reads), and a rank-16 LoRA step's backward.
The last two run afterwards, each in a fresh process (`--backward`; `--frozen-only` skips them).
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lorank.api import prepare_inputs, versions
from lorank.bench.tasks import build_task
from lorank.data import collate
from lorank.demo import build_demo_data
from lorank.estimators.gradient import REPLAY_MB, gradient_spectrum
from lorank.targets import resolve_targets


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


BASELINES = ("frozen", "target_grads", "lora16")


def one_pass_seconds(model, examples, pad_token_id, batch_size, backward: str = "frozen",
                     targets: list[str] | None = None) -> float:
    """One forward + backward pass over the calibration set (summed loss), batched in length
    order: the analysis sorts each chunk by length to cut padding, so an unsorted baseline
    would be slower than need be and flatter the ratio. What the backward computes:

    - frozen: input gradients only (one linear layer's weight requires grad so that there is
      something to differentiate): the cheapest backward there is, the headline ratio's base;
    - target_grads: also every target layer's full-weight gradient sum_t d_t x_t^T, the very
      quantity the gradient spectrum reads (the bulk of a full fine-tuning step's backward);
    - lora16: a LoRA step's backward, rank 16 on every target (peft, on a copy of the model);
    - none: the forward alone, without gradients (what a classifier's head fit on frozen
      features costs beside its few Adam steps; `gradient_cost_width.py --head-fit`).
    """
    examples = sorted(examples, key=lambda e: len(e["input_ids"]))
    if backward == "lora16":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(copy.deepcopy(model), LoraConfig(r=16, lora_alpha=16,
                                                                target_modules=targets))
    for p in model.parameters():
        p.requires_grad_(False)
    if backward == "none":
        chosen = []
    elif backward == "frozen":
        chosen = [next(m for m in model.modules() if isinstance(m, torch.nn.Linear)).weight]
    elif backward == "target_grads":
        chosen = [model.get_submodule(name).weight for name in targets]
    else:
        chosen = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in chosen:
        p.requires_grad_(True)
    start = time.perf_counter()
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i:i + batch_size], pad_token_id)
        if backward == "none":
            with torch.no_grad():
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        else:
            model(**batch).loss.backward()
    seconds = time.perf_counter() - start
    for p in chosen:
        p.grad = None
        p.requires_grad_(False)
    return seconds


def measure(name: str, model_source: str, data: str, val: str | None, calib: int,
            max_length: int, batch_size: int = 8, replay_mb: float = REPLAY_MB,
            backward: str | None = None, max_rank: int = 64,
            fractions: tuple[float, ...] = (0.25, 0.5, 1.0)) -> dict:
    """The analysis against the frozen baseline, both in this process; with `backward`, only
    that baseline (the other baselines run in processes of their own, so that a LoRA copy of
    the model or the targets' weight gradients do not change the heap the analysis runs in: on this VM
    a larger resident set slows matmuls, SmolLM2 at 64 examples by 15%)."""
    loaded, prepared = prepare_inputs(model_source, data, val_data=val, max_length=max_length)
    targets = resolve_targets(loaded.model)
    sample = prepared.train[:calib]
    rss_loaded = peak_rss_mib()
    names = [t.name for t in targets.layers]
    one_pass_seconds(loaded.model, sample[:2 * batch_size], loaded.pad_token_id, batch_size)
    base = one_pass_seconds(loaded.model, sample, loaded.pad_token_id, batch_size,
                            backward or "frozen", names)
    if backward is not None:
        return {"backward": backward, "one_forward_backward_s": base}
    # on a classification model the analysis begins with the head fit (as `lorank analyze`
    # does), inside the timed call: timings_s "head_fit"
    start = time.perf_counter()
    spectrum = gradient_spectrum(loaded.model, sample, names,
                                 pad_token_id=loaded.pad_token_id, max_rank=max_rank,
                                 fractions=fractions, batch_size=batch_size, replay_mb=replay_mb,
                                 fit_head=prepared.task == "classification", progress=False)
    seconds = time.perf_counter() - start
    methods = [layer.method for layer in spectrum.layers]
    return {"model": name, "calib_examples": len(sample), "targets": len(targets.layers),
            "sketched_layers": methods.count("sketch"), "exact_layers": methods.count("exact"),
            "one_forward_backward_s": round(base, 3), "gradient_spectrum_s": round(seconds, 3),
            "ratio": round(seconds / base, 2), "peak_rss_after_load_mib": round(rss_loaded),
            "peak_rss_after_analysis_mib": round(peak_rss_mib()),
            "max_rank": max_rank, "fractions": list(fractions),
            "global_rank": spectrum.global_rank()[0], "pass_3": spectrum.settings["pass_3"],
            "head_fit_features": (spectrum.settings["head_fit"] or {}).get("features"),
            "timings_s": {k: round(v, 3) for k, v in spectrum.settings["timings"].items()}}


def other_baselines(script: str, argv: list[str], row: dict) -> None:
    """Time the target-gradient and LoRA backward, each in a fresh process of `script` (which
    prints {"one_forward_backward_s": ...} when given `--backward`), one after the other, and
    add the analysis's ratio to each (the frozen one is `row`'s own)."""
    row["one_forward_backward_s_by_backward"] = {"frozen": row["one_forward_backward_s"]}
    for backward in BASELINES[1:]:
        out = subprocess.run([sys.executable, script, *argv, "--backward", backward],
                             check=True, capture_output=True, text=True).stdout
        row["one_forward_backward_s_by_backward"][backward] = round(
            json.loads(out)["one_forward_backward_s"], 3)
    row["ratio_by_backward"] = {g: round(row["gradient_spectrum_s"] / b, 2)
                                for g, b in row["one_forward_backward_s_by_backward"].items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=("smollm2-135m", "minilm-l6"), required=True)
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--replay-mb", type=float, default=REPLAY_MB,
                        help="as in `lorank analyze` (0: pass 3 always runs as a pass)")
    parser.add_argument("--backward", choices=BASELINES,
                        help="time only this baseline pass (see one_pass_seconds)")
    parser.add_argument("--frozen-only", action="store_true",
                        help="skip the target-gradient and LoRA baselines")
    parser.add_argument("--max-rank", type=int, default=64,
                        help="largest rank read per layer (64: what `lorank analyze` reads)")
    parser.add_argument("--fractions", default="0.25,0.5,1.0",
                        help="data fractions the signal rank is read at (the default's three)")
    args = parser.parse_args()
    variant = {"max_rank": args.max_rank,
               "fractions": tuple(float(f) for f in args.fractions.split(","))}
    tmp = Path(tempfile.mkdtemp())
    if args.model == "smollm2-135m":
        demo = build_demo_data(tmp / "demo.jsonl", n=400)
        row = measure(args.model, args.model, str(demo), None, args.calib, 192,
                      replay_mb=args.replay_mb, backward=args.backward, **variant)
    else:
        task = build_task("wordnet-lexname", tmp / "lexname")
        row = measure(args.model, args.model, str(task["train"]), str(task["val"]),
                      args.calib, 64, replay_mb=args.replay_mb, backward=args.backward,
                      **variant)
    if args.backward is not None:
        json.dump(row, sys.stdout)
        return
    if not args.frozen_only:
        other_baselines(__file__, ["--model", args.model, "--calib", str(args.calib)], row)
    json.dump({"command": " ".join(sys.argv), "row": row, "threads": torch.get_num_threads(),
               "versions": versions()}, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
