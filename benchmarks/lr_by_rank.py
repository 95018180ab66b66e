"""How the best learning rate moves with rank in the sweeps: can one lr serve every rank?

Usage: python benchmarks/lr_by_rank.py   (writes benchmarks/results/lr_by_rank.json)

The sweeps train with a fixed alpha and rsLoRA's scale alpha/sqrt(r). Per task and rank, the
best lr is read from the seed-mean validation loss over the lr grid, refined by a parabola in
log2(lr) through the best grid point and its two neighbours (the grid point itself where it
sits at the grid's edge). The slope k of log2(best lr) against log2(r) says how the lr must
move: k = 0 means one lr serves every rank under rsLoRA. To first order, Adam's update to
B A scales with scale x lr, so a slope k under alpha/sqrt(r) means alpha/r^(0.5 - k) would
keep the best lr in place; k = -0.5 is the plain LoRA scale alpha/r.

Each rule is scored leave-one-task-out (k fitted on the other tasks) by the regret of
training every rank at the rule's lr, snapped to the nearest grid lr that was run, against
that rank's best grid lr:
- "one lr (rsLoRA)": rank 8's best lr at every rank;
- "one lr, plain LoRA scale": the same lr moved by (r/8)^-0.5 (what alpha/r would do);
- "fitted slope": rank 8's best lr moved by (r/8)^k.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from lorank.api import versions
from lorank.bench.score import load_sweep, pending_tasks

RESULTS = Path(__file__).resolve().parent / "results"
REFERENCE_RANK = 8


def seed_mean_losses(sweep: dict) -> dict[tuple[int, float], float]:
    """Mean validation loss over seeds at each (rank, lr) that finished."""
    losses = defaultdict(list)
    for t in sweep["trials"]:
        if t["status"] == "ok" and t.get("per_example"):
            losses[(int(t["rank"]), float(t["lr"]))].append(float(np.nanmean(t["per_example"])))
    return {k: float(np.mean(v)) for k, v in losses.items()}


def best_lrs(losses: dict[tuple[int, float], float]) -> dict[int, float]:
    """Per rank the best lr, refined between grid points by a parabola in log2(lr)."""
    out = {}
    for r in sorted({r for r, _ in losses}):
        lrs = sorted(lr for rank, lr in losses if rank == r)
        at = {lr: losses[(r, lr)] for lr in lrs}
        best = min(at, key=at.get)
        i, x = lrs.index(best), math.log2(best)
        if 0 < i < len(lrs) - 1:
            xs = np.log2(lrs[i - 1 : i + 2])
            a, b, _ = np.polyfit(xs, [at[lr] for lr in lrs[i - 1 : i + 2]], 2)
            if a > 0:
                x = float(np.clip(-b / (2 * a), xs[0], xs[-1]))
        out[r] = 2.0 ** x
    return out


def slope(best: dict[int, float]) -> float:
    """Least-squares slope of log2(best lr) against log2(rank)."""
    ranks = sorted(best)
    return float(np.polyfit(np.log2(ranks), np.log2([best[r] for r in ranks]), 1)[0])


def rule_regret(losses: dict[tuple[int, float], float], lr_at: dict[int, float]) -> float:
    """Mean over ranks of (loss at the grid lr nearest the rule's lr) / (best loss) - 1."""
    regrets = []
    for r, want in lr_at.items():
        grid = {lr: loss for (rank, lr), loss in losses.items() if rank == r}
        near = min(grid, key=lambda lr: abs(math.log(lr / want)))
        regrets.append(grid[near] / min(grid.values()) - 1)
    return float(np.mean(regrets))


def main() -> None:
    pending = pending_tasks(RESULTS)
    tasks = sorted(p for p in RESULTS.iterdir()
                   if (p / "sweep.json").exists() and p.name not in pending)
    per_task = {}
    for task_dir in tasks:
        losses = seed_mean_losses(load_sweep(task_dir))
        best = best_lrs(losses)
        per_task[task_dir.name] = {"losses": losses, "best_lr": best, "slope": slope(best)}
    rows = []
    for name, t in per_task.items():
        k = float(np.mean([o["slope"] for n, o in per_task.items() if n != name]))
        ranks, ref = sorted(t["best_lr"]), t["best_lr"][REFERENCE_RANK]
        rules = {"one lr (rsLoRA)": {r: ref for r in ranks},
                 "one lr, plain LoRA scale": {r: ref * (r / REFERENCE_RANK) ** -0.5
                                              for r in ranks},
                 "fitted slope": {r: ref * (r / REFERENCE_RANK) ** k for r in ranks}}
        rows.append({"task": name, "slope": t["slope"], "held_out_k": k,
                     "best_lr": {str(r): v for r, v in t["best_lr"].items()},
                     "regret": {rule: rule_regret(t["losses"], at) for rule, at in rules.items()}})
    summary = {"mean_slope": float(np.mean([r["slope"] for r in rows])),
               "slope_range": [float(min(r["slope"] for r in rows)),
                               float(max(r["slope"] for r in rows))],
               "mean_regret": {rule: float(np.mean([r["regret"][rule] for r in rows]))
                               for rule in rows[0]["regret"]}}
    print(f"slope of log2(best lr) on log2(r) under rsLoRA: mean {summary['mean_slope']:.2f}, "
          f"range {summary['slope_range'][0]:.2f} to {summary['slope_range'][1]:.2f}")
    for r in rows:
        print(f"  {r['task']:16s} slope {r['slope']:+.2f}  " + "  ".join(
            f"{rule}: {v:.1%}" for rule, v in r["regret"].items()))
    print("mean regret: " + "  ".join(f"{k}: {v:.1%}" for k, v in summary["mean_regret"].items()))
    out = {"summary": summary, "rows": rows, "reference_rank": REFERENCE_RANK,
           "versions": versions()}
    (RESULTS / "lr_by_rank.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
