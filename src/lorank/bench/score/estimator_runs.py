"""Running lorank's estimators on a benchmark task's data and storing their Evidence in
`RESULTS/<task>/estimators/<name>.json`, where scoring reads it.

Each estimator runs through `lorank.api.recommend` with the task's recipe; the probes train at
the task's largest rank with its steps and batch, on the lr of the task's grid that their
pilot picks.
"""

from __future__ import annotations

import json
from pathlib import Path

from lorank.errors import LorankError
from lorank.util import atomic_write_text

# bench name -> (recommend's estimator, probe method)
BENCH_ESTIMATORS = {"capacity": ("capacity", None), "gradient": ("gradient", None),
                    "svd-probe": ("probe", "svd"), "nested-probe": ("probe", "nested")}


def run_task_estimators(task_dir: Path, names: list[str], *, progress: bool = True) -> list[Path]:
    """Run lorank's estimators on a task's data and store their Evidence.

    capacity and gradient train nothing; the probe trains one run at the task's largest rank
    with the task's steps and batch, at the lr of the task's grid that its pilot picks (a
    quarter of the schedule per lr, charged to the probe's cost: see `lorank.runs.probe.run_probe`).
    """
    from lorank.api import recommend

    task_dir = Path(task_dir)
    info = json.loads((task_dir / "data" / "task.json").read_text())["task"]
    written = []
    for name in names:
        if name not in BENCH_ESTIMATORS:
            raise LorankError(f"--run {name}: unknown; known: {', '.join(BENCH_ESTIMATORS)}")
        estimator, method = BENCH_ESTIMATORS[name]
        probe = {"budget": str(info["steps"]), "probe_rank": max(info["ranks"]),
                 "lr": list(info["lrs"]),
                 "batch_size": info["batch_size"], "probe_method": method} if method else {}
        if name == "capacity":  # the task's recipe is the planned run
            probe = {"steps": info["steps"], "batch_size": info["batch_size"]}
        rec = recommend(info["model"], task_dir / "data" / "train.jsonl",
                        val_data=task_dir / "data" / "val.jsonl", max_length=info["max_length"],
                        targets=info.get("targets", "all-linear"), estimators=(estimator,),
                        max_rank=max(info["ranks"]), progress=progress, **probe)
        evidence = rec.evidence[-1]
        evidence["recommended_rank"] = rec.rank
        (task_dir / "estimators").mkdir(exist_ok=True)
        path = task_dir / "estimators" / f"{name}.json"
        atomic_write_text(path, json.dumps(evidence, indent=1, default=str))
        written.append(path)
    return written
