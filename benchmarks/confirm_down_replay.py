"""Replay "confirm downwards" on the sweeps' recorded runs: does checking the probe's pick with
real runs at lower ranks fix its overshoot, and at what cost?

Usage: python benchmarks/confirm_down_replay.py   (writes benchmarks/results/confirm_down_replay.json)

The procedure: the SVD probe picks p from one run at the largest rank R. Then a bisection over
the candidate ranks below p: an independent run at the middle rank m (the probe's learning
rate, seed 0, the task's recipe) is accepted when its validation loss is within tolerance of
the run at R (tol = max(1% of L(R), 2 paired SE over validation examples), DESIGN.md's rule);
accepted: search below m, else above. The pick is the smallest accepted rank (p if none).
Every run is deterministic from its seed, so the sweep's recorded run at (m, lr, seed 0) is
what the procedure would have trained; its cost is the probe's plus the steps of the runs it
started, as a fraction of the full sweep (ranks x lrs x steps), as `lorank bench` counts cost.

Variants: "probe lr" as above; "probe lr, early stop" stops a run at its middle evaluation
when it trails R's run there by more than three tolerances (counted as half its steps); "best
lr per rank" runs every lr of the grid at each tested rank, and at R for the reference, and
takes the best (the lr the truth uses: an upper bound on what choosing the lr better could
give, at len(lrs) times the cost; the reference's extra runs are not charged).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from lorank.api import versions
from lorank.bench.score import (
    full_sweep_steps,
    load_sweep,
    pending_tasks,
    truth,
)
from lorank.scoring import acceptable_set

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("probe lr", "probe lr, early stop", "best lr per rank")


def _runs(sweep: dict, seed: int = 0) -> dict[tuple[int, float], dict]:
    return {(t["rank"], t["lr"]): t for t in sweep["trials"]
            if t["seed"] == seed and t["status"] == "ok" and t.get("per_example")}


def _mean(x: np.ndarray) -> float:
    return float(np.nanmean(x))


def accepted(run: dict, ref: dict) -> tuple[bool, float]:
    """Is `run` within tolerance of the reference run (paired over validation examples)?"""
    x, y = np.asarray(run["per_example"], float), np.asarray(ref["per_example"], float)
    d = (x - y)[np.isfinite(x - y)]
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0
    tol = max(0.01 * _mean(y), 2 * se)
    return _mean(x) <= _mean(y) + tol, tol


def trails_at_middle(run: dict, ref: dict, tol: float) -> bool:
    """At the run's middle evaluation, its loss exceeds the reference's there by > 3 tol."""
    curve, ref_curve = run.get("curve") or [], {c[0]: c[2] for c in ref.get("curve") or []}
    if len(curve) < 2:
        return False
    step, _, loss = curve[(len(curve) - 1) // 2]
    return step in ref_curve and loss > ref_curve[step] + 3 * tol


def replay(task_dir: Path, variant: str) -> dict | None:
    probe_path = task_dir / "estimators" / "svd-probe.json"
    if not probe_path.exists():
        return None
    sweep, probe = load_sweep(task_dir), json.loads(probe_path.read_text())
    right = truth(sweep)
    ranks, lrs = sorted(right.L), sweep["spec"]["lrs"]
    runs = _runs(sweep)
    lr, pick = probe["details"]["learning_rate"], int(probe["suggested_rank"])
    ref = runs.get((ranks[-1], lr))
    if variant == "best lr per rank":  # the reference at R takes its best lr too
        at_top = [runs[(ranks[-1], x)] for x in lrs if (ranks[-1], x) in runs]
        ref = min(at_top, key=lambda t: _mean(np.asarray(t["per_example"], float)))
    if ref is None or pick not in ranks:
        return None
    steps, tested = 0.0, []
    lo, hi = 0, ranks.index(pick)
    while lo < hi:
        m = ranks[(lo + hi) // 2]
        candidates = [runs[(m, x)] for x in lrs if (m, x) in runs] \
            if variant == "best lr per rank" else [runs[(m, lr)]] if (m, lr) in runs else []
        if not candidates:
            break
        run = min(candidates, key=lambda t: _mean(np.asarray(t["per_example"], float)))
        ok, tol = accepted(run, ref)
        for c in candidates:
            early = variant == "probe lr, early stop" and not ok and trails_at_middle(c, ref, tol)
            steps += c["steps_done"] / (2 if early else 1)
        tested.append({"rank": m, "accepted": ok, "loss": _mean(np.asarray(run["per_example"],
                                                                           float))})
        lo, hi = (lo, ranks.index(m)) if ok else (ranks.index(m) + 1, hi)
    final = ranks[hi]
    full = full_sweep_steps(sweep)
    acceptable = acceptable_set(right)
    return {"task": task_dir.name, "variant": variant, "probe_pick": pick, "probe_lr": lr,
            "pick": final, "r_star": right.r_star, "acceptable": final in acceptable,
            "within_2x": final in acceptable and final <= 2 * right.r_star,
            "regret": (right.L[final] - right.L_best) / right.L_best, "tested": tested,
            "cost": (probe["details"]["cost"]["cost_steps"] + steps) / full,
            "probe_cost": probe["details"]["cost"]["cost_steps"] / full}


def main() -> None:
    pending = pending_tasks(RESULTS)
    tasks = sorted(p for p in RESULTS.iterdir()
                   if (p / "sweep.json").exists() and p.name not in pending)
    rows = [r for v in VARIANTS for t in tasks if (r := replay(t, v)) is not None]
    summary = {}
    for v in VARIANTS:
        mine = [r for r in rows if r["variant"] == v]
        summary[v] = {"tasks": len(mine), "within_tolerance": sum(r["acceptable"] for r in mine),
                      "within_2x": sum(r["within_2x"] for r in mine),
                      "exact": sum(r["pick"] == r["r_star"] for r in mine),
                      "mean_regret": float(np.mean([r["regret"] for r in mine])),
                      "mean_cost": float(np.mean([r["cost"] for r in mine])),
                      "max_cost": float(np.max([r["cost"] for r in mine]))}
        print(f"{v:22s} " + "  ".join(f"{k} {val:.3g}" if isinstance(val, float) else
                                      f"{k} {val}" for k, val in summary[v].items()))
        for r in mine:
            print(f"    {r['task']:16s} probe {r['probe_pick']:3d} -> {r['pick']:3d} "
                  f"(r* {r['r_star']}, {'ok' if r['acceptable'] else 'MISS'}) "
                  f"cost {r['cost']:.3f}")
    out = {"summary": summary, "rows": rows, "versions": versions()}
    (RESULTS / "confirm_down_replay.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
