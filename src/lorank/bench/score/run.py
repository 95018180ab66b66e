"""`lorank bench`'s scoring pass: score every task under RESULTS whose sweep is complete, and
write scores.json, each task's bench.png and, when asked, the markdown tables.

A task's plot overlays the stored probes' rank-loss curves on the sweep's and marks every
method's pick and r*.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from lorank.bench.score.method_rows import score_task
from lorank.bench.score.tables import markdown_tables
from lorank.bench.score.truth import load_sweep, pending_tasks
from lorank.errors import LorankError
from lorank.plots import plot_rank_curve
from lorank.util import atomic_write_text


def run_bench(results: Path, out_md: Path | None = None) -> list[dict[str, Any]]:
    """Score every task under `results` whose sweep is complete (see `sweep_gap`) and write
    BENCHMARKS tables, JSON and plots."""
    results = Path(results)
    swept = sorted(p for p in results.iterdir() if (p / "sweep.json").exists())
    if not swept:
        raise LorankError(f"{results}: no task has sweep.json yet")
    pending = pending_tasks(results)
    tasks = [p for p in swept if p.name not in pending]
    if not tasks:
        raise LorankError(f"{results}: no sweep is complete yet ("
                          + "; ".join(f"{k}: {v}" for k, v in pending.items()) + ")")
    scored = [score_task(t) for t in tasks]
    for s, t in zip(scored, tasks, strict=True):
        sweep = load_sweep(t)
        curve = {int(r): row for r, row in sweep["curve"].items() if row}
        picks = {row["method"]: row["r_rec"] for row in s["rows"]}
        plot_rank_curve({"sweep (best lr)": curve} | probe_curves(t), t / "bench.png",
                        picks=picks | {"r*": s["truth"]["r_star"]}, title=f"{t.name}")
    atomic_write_text(results / "scores.json", json.dumps(scored, indent=1))
    if out_md is not None:
        atomic_write_text(Path(out_md), markdown_tables(scored, results))
    return scored


def probe_curves(task_dir: Path) -> dict[str, dict[int, dict[str, float]]]:
    """The stored probes' rank-loss curves, to overlay on the sweep's (one run each)."""
    curves = {}
    for name in ("nested-probe", "svd-probe"):
        path = Path(task_dir) / "estimators" / f"{name}.json"
        if path.exists() and (curve := json.loads(path.read_text()).get("curve")):
            curves[f"{name} (one run)"] = {int(r): row for r, row in curve.items()
                                           if row and np.isfinite(row.get("loss", np.nan))}
    return curves
