"""Fit how the best learning rate moves with rank from the stored sweeps, and ship the slope.

    .venv/bin/python benchmarks/lr_by_rank.py [--results benchmarks/results]

Writes `src/lorank/lr_slope.json` (the slope `lorank.planned_run.lr_at_rank` applies, with
each task's slope and the held-out regret of three one-lr rules; see `lorank.bench.lr_rank`).
Under rsLoRA (alpha/sqrt r), a slope k means alpha/r^(0.5 - k) would keep the best lr in place
to first order (Adam's update to B A scales with scale x lr); k = -0.5 is plain LoRA's alpha/r.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lorank.bench.lr_rank import lr_rule_regrets
from lorank.planned_run import LR_SLOPE_FILE
from lorank.util import atomic_write_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--out", type=Path, default=LR_SLOPE_FILE)
    args = parser.parse_args()
    fit = lr_rule_regrets(args.results)
    atomic_write_text(args.out, json.dumps(fit, indent=1) + "\n")
    print(f"slope of log2(best lr) on log2(r) under rsLoRA: {fit['slope']:+.2f} "
          f"(tasks {fit['slope_range'][0]:+.2f} to {fit['slope_range'][1]:+.2f})")
    for r in fit["rows"]:
        print(f"  {r['task']:16s} {r['slope']:+.2f}  " + "  ".join(
            f"{rule}: {v:.1%}" for rule, v in r["regret"].items()))
    print("held-out mean regret: " + "  ".join(f"{k}: {v:.1%}"
                                               for k, v in fit["mean_regret"].items()))


if __name__ == "__main__":
    main()
