"""The capacity fit's data: one row per complete sweep with a stored capacity measurement.

A row holds the task's bits to learn, adapter sizes, acceptable ranks, r*, losses and the
recipe's epochs, read from sweep.json and estimators/capacity.json; a pending sweep gives no
row. `benchmarks/calibrate_capacity.py` fits the capacity estimator's efficiency on them.
"""

from __future__ import annotations

import json
from pathlib import Path

from lorank.bench.score.truth import load_sweep, pending_tasks, truth
from lorank.estimators.capacity import CalibrationRow
from lorank.scoring import acceptable_set


def calibration_rows(results: Path) -> list[CalibrationRow]:
    """The capacity fit's data: per complete sweep with a stored capacity measurement, its
    bits to learn, adapter sizes, acceptable ranks, r* and the recipe's epochs."""
    rows = []
    pending = pending_tasks(results)
    for task_dir in sorted(p for p in Path(results).iterdir() if (p / "sweep.json").exists()):
        cap_path = task_dir / "estimators" / "capacity.json"
        if task_dir.name in pending or not cap_path.exists():
            continue
        sweep, cap = load_sweep(task_dir), json.loads(cap_path.read_text())
        right = truth(sweep)
        recipe, meta = sweep["spec"]["recipe"], sweep["meta"]
        rows.append(CalibrationRow(
            task=task_dir.name,
            kind="classification" if meta.get("format") == "classification" else "generation",
            bits=float(cap["details"]["total_bits"]),
            params={int(r): float(p) for r, p in cap["details"]["adapter_params"].items()},
            acceptable=acceptable_set(right), r_star=right.r_star,
            epochs=round(recipe["steps"] * recipe["batch_size"] / meta["n_train"], 4),
            losses=dict(right.L),
            data_hash=meta.get("data_hash", "")))
    return rows
