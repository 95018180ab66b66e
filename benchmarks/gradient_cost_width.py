"""Gradient-spectrum cost on one decoder layer of real model shapes, up to Llama-3-8B's.

Why: the packaged models are 0.1B, where the hooks' matmuls cost as much as a weight gradient
and the per-layer decompositions are a large fixed share. An 8B model is 32 layers of the
same shape, so the ratio measured on one such layer (random weights, random tokens: the cost
does not depend on their values) at a given token count is that model's ratio, the
embeddings and LM head aside (they add to the forward+backward only, so leaving them out
makes the ratio larger, not smaller). Two calibration sizes separate the fixed part
(decompositions, timed directly) from the per-token part. The target-gradient and LoRA-16
baselines of `gradient_cost.py` run after the analysis, each in a fresh process of this script.
`--head-fit` times only a forward without gradients against the frozen pass, in one process:
what fitting a sequence classifier's new head on frozen features first would add (that fit
is one such forward plus a few Adam steps of the head on the cached features).

Usage (one process per row, idle machine, 1 torch thread):
  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gradient_cost_width.py --shape llama3-8b --examples 16 > benchmarks/results/gradient_cost_width_llama3-8b_16.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorank.api import versions
from lorank.estimators.gradient import gradient_spectrum

sys.path.insert(0, str(Path(__file__).parent))
from gradient_cost import (  # noqa: E402
    BASELINES,
    one_pass_seconds,
    other_baselines,
    peak_rss_mib,
)

# hidden, intermediate, attention heads, key-value heads (head dim 64 or 128, as released)
SHAPES = {
    "smollm2-135m": (576, 1536, 9, 3),
    "llama3.2-1b": (2048, 8192, 32, 8),
    "llama3-8b": (4096, 14336, 32, 8),
}


def measure(shape: str, n_examples: int, length: int, max_rank: int, seed: int = 0,
            backward: str | None = None, head_fit: bool = False) -> dict:
    """The analysis against the frozen baseline; with `backward`, only that baseline; with
    `head_fit`, a forward without gradients against the frozen baseline (after a warm-up)."""
    hidden, inter, heads, kv = SHAPES[shape]
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=2048, hidden_size=hidden, intermediate_size=inter,
                         num_hidden_layers=1, num_attention_heads=heads,
                         num_key_value_heads=kv, max_position_embeddings=length)
    model = LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n_examples):
        ids = torch.randint(1, config.vocab_size, (length,), generator=gen).tolist()
        examples.append({"input_ids": ids, "labels": list(ids)})
    targets = [name for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.startswith("model.layers.")]
    if head_fit:
        one_pass_seconds(model, examples[:8], 0, 8)  # warm-up
        forward = one_pass_seconds(model, examples, 0, 8, backward="none")
        base = one_pass_seconds(model, examples, 0, 8)
        return {"shape": shape, "examples": n_examples, "tokens": n_examples * length,
                "forward_no_grad_s": round(forward, 2), "one_forward_backward_s": round(base, 2),
                "head_fit_share": round(forward / base, 3), "peak_rss_mib": round(peak_rss_mib())}
    base = one_pass_seconds(model, examples, 0, 8, backward or "frozen", targets)
    if backward is not None:
        return {"backward": backward, "one_forward_backward_s": base}
    start = time.perf_counter()
    # replay off: one layer stands for a model whose half-A tape would be n_layers times
    # larger (Llama-3.2-1B: 16 x 1.2 GB at these tokens), which never fits replay_mb
    spectrum = gradient_spectrum(model, examples, targets, pad_token_id=0, max_rank=max_rank,
                                 batch_size=8, replay_mb=0, progress=False)
    seconds = time.perf_counter() - start
    timings = spectrum.settings["timings"]
    methods = [layer.method for layer in spectrum.layers]
    return {
        "shape": shape, "hidden": hidden, "intermediate": inter, "heads": heads, "kv_heads": kv,
        "layers": 1, "examples": n_examples, "tokens": n_examples * length, "max_rank": max_rank,
        "targets": len(targets), "sketched_layers": methods.count("sketch"),
        "one_forward_backward_s": round(base, 2), "gradient_spectrum_s": round(seconds, 2),
        "ratio": round(seconds / base, 3),
        "ratio_without_decompositions": round((seconds - timings["decompositions"]) / base, 3),
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "peak_rss_mib": round(peak_rss_mib()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--max-rank", type=int, default=64)
    parser.add_argument("--backward", choices=BASELINES,
                        help="time only this baseline pass (see gradient_cost.one_pass_seconds)")
    parser.add_argument("--frozen-only", action="store_true",
                        help="skip the target-gradient and LoRA baselines")
    parser.add_argument("--head-fit", action="store_true",
                        help="time only a forward without gradients against the frozen pass")
    args = parser.parse_args()
    row = measure(args.shape, args.examples, args.length, args.max_rank, backward=args.backward,
                  head_fit=args.head_fit)
    if args.head_fit:
        json.dump({"command": " ".join(sys.argv), "row": row, "threads": torch.get_num_threads(),
                   "versions": versions()}, sys.stdout, indent=1)
        return
    if args.backward is not None:
        json.dump(row, sys.stdout)
        return
    if not args.frozen_only:
        other_baselines(__file__, ["--shape", args.shape, "--examples", str(args.examples),
                                   "--length", str(args.length), "--max-rank",
                                   str(args.max_rank)], row)
    json.dump({"command": " ".join(sys.argv), "row": row, "threads": torch.get_num_threads(),
               "versions": versions()}, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
