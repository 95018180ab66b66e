"""How the best learning rate moves with rank in the stored sweeps, and the slope lorank ships.

The sweeps train with a fixed alpha and rsLoRA's scale alpha/sqrt(r). Per task and rank, the
best lr is read from the seed-mean validation loss over the lr grid, refined by a parabola in
log2(lr) through the best grid point and its two neighbours (the grid point itself at the
grid's edge). The slope of log2(best lr) on log2(r) says how the lr must move with rank; the
mean over tasks is shipped in `lorank/lr_slope.json` (`lorank.planned_run.lr_at_rank` reads
it) with each task's slope and its leave-one-task-out regret.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from lorank.bench.score import load_sweep, pending_tasks

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


def lr_rule_regrets(results: Path) -> dict[str, Any]:
    """Each complete task's best lr per rank and slope, and three one-lr rules scored held out
    (the slope fitted on the other tasks): rank 8's lr everywhere, the same moved as plain
    LoRA's alpha/r would move it ((r/8)^-0.5), and moved by the fitted slope."""
    pending = pending_tasks(results)
    tasks = sorted(p for p in Path(results).iterdir()
                   if (p / "sweep.json").exists() and p.name not in pending)
    per_task = {}
    for task_dir in tasks:
        losses = seed_mean_losses(load_sweep(task_dir))
        best = best_lrs(losses)
        if REFERENCE_RANK in best and len(best) > 1:
            per_task[task_dir.name] = {"losses": losses, "best_lr": best, "slope": slope(best)}
    rows = []
    for name, t in per_task.items():
        k = float(np.mean([o["slope"] for n, o in per_task.items() if n != name]))
        ranks, ref = sorted(t["best_lr"]), t["best_lr"][REFERENCE_RANK]
        rules = {"one lr (rsLoRA)": {r: ref for r in ranks},
                 "one lr, plain LoRA scale": {r: ref * (r / REFERENCE_RANK) ** -0.5
                                              for r in ranks},
                 "fitted slope": {r: ref * (r / REFERENCE_RANK) ** k for r in ranks}}
        rows.append({"task": name, "slope": round(t["slope"], 4), "held_out_slope": round(k, 4),
                     "best_lr": {str(r): round(v, 6) for r, v in t["best_lr"].items()},
                     "regret": {rule: round(rule_regret(t["losses"], at), 4)
                                for rule, at in rules.items()}})
    slopes = [r["slope"] for r in rows]
    return {"slope": round(float(np.mean(slopes)), 2),
            "slope_range": [min(slopes), max(slopes)],
            "mean_regret": {rule: round(float(np.mean([r["regret"][rule] for r in rows])), 4)
                            for rule in rows[0]["regret"]},
            "reference_rank": REFERENCE_RANK, "rows": rows}
