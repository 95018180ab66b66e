"""A task's stored sweep and the ground truth it gives: r* by the DESIGN.md rule, how sure
that r* is, and whether the sweep is complete enough to judge by.

Reads only `RESULTS/<task>/sweep.json`. A sweep is ground truth once every rank of its grid
has a finished run and each rank's best lr has the grid's seeds (`sweep_gap`); the others are
listed as pending, not scored. The sweep's cost figures (steps of the full grid, measured
seconds per step) price every method's spending.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from lorank.errors import LorankError
from lorank.scoring import (
    RightRank,
    acceptable_set,
    curve_right_rank,
    hinging_ranks,
    r_star_stability,
)


def load_sweep(task_dir: Path) -> dict[str, Any]:
    path = Path(task_dir) / "sweep.json"
    if not path.exists():
        raise LorankError(f"{path}: no sweep results (run `lorank sweep --task ...` first)")
    return json.loads(path.read_text())


def truth(sweep: dict[str, Any]) -> RightRank:
    """r* by the DESIGN.md rule: paired SE across examples, widened by the seed spread."""
    return curve_right_rank({int(r): row for r, row in sweep["curve"].items() if row})


def params_table(sweep: dict[str, Any]) -> dict[int, float]:
    return {int(r): float(p) for r, p in sweep["meta"]["params"].items()}


def seconds_per_step(sweep: dict[str, Any]) -> float:
    """Measured wall seconds per training step in the sweep (evaluation included)."""
    runs = [t for t in sweep["trials"] if t.get("steps_done")]
    return float(np.median([t["wall_seconds"] / t["steps_done"] for t in runs]))


def full_sweep_steps(sweep: dict[str, Any]) -> int:
    spec = sweep["spec"]
    return len(spec["ranks"]) * len(spec["lrs"]) * int(spec["recipe"]["steps"])


def sweep_gap(sweep: dict[str, Any]) -> str | None:
    """Why a sweep cannot be ground truth yet (None when it can): a rank of its grid with no
    finished run, or whose best lr has fewer seeds than the grid. A worker that stops early
    still writes sweep.json; scoring its partial curve would judge methods by a wrong r*."""
    spec = sweep.get("spec") or {}
    ranks, n_seeds = spec.get("ranks") or [], len(spec.get("seeds") or [])
    curve = {int(r): row for r, row in (sweep.get("curve") or {}).items() if row}
    missing = [str(r) for r in ranks if r not in curve]
    thin = [str(r) for r in ranks if r in curve and curve[r].get("seeds", 0) < n_seeds]
    parts = []
    if missing:
        parts.append(f"no finished run at rank {', '.join(missing)}")
    if thin:
        parts.append(f"fewer than {n_seeds} seeds at the best lr of rank {', '.join(thin)}")
    return "; ".join(parts) or None


def pending_tasks(results: Path) -> dict[str, str]:
    """Tasks whose sweep.json exists but is not ground truth yet, with the reason."""
    return {p.name: gap for p in sorted(Path(results).iterdir())
            if (p / "sweep.json").exists() and (gap := sweep_gap(load_sweep(p)))}


def seed_losses(sweep: dict[str, Any]) -> dict[int, list[np.ndarray]]:
    """Per rank, one per-example loss vector per seed at that rank's best lr (the curve's)."""
    out = {}
    for r, row in sweep["curve"].items():
        if not row:
            continue
        runs = [t for t in sweep["trials"] if t["rank"] == int(r) and t["status"] == "ok"
                and t.get("per_example") and math.isclose(t["lr"], row["lr"], rel_tol=1e-9)]
        out[int(r)] = [np.asarray(t["per_example"], float) for t in sorted(
            runs, key=lambda t: t["seed"])]
    return out


def truth_report(sweep: dict[str, Any]) -> dict[str, Any]:
    """How sure r* is: the acceptable set, r*'s stability under resampling of seeds and
    validation examples, the ranks whose verdict hinges on seed noise, the seeds per rank."""
    right = truth(sweep)
    seeds = {int(r): int(row["seeds"]) for r, row in sweep["curve"].items() if row}
    return {"acceptable": acceptable_set(right), "stability": r_star_stability(seed_losses(sweep)),
            "hinging": {str(r): why for r, why in hinging_ranks(right, seeds).items()},
            "seeds": {str(r): k for r, k in sorted(seeds.items())}}
