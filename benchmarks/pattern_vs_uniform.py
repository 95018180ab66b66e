"""Does a per-layer rank pattern beat the uniform rank of equal parameters?

Usage: python benchmarks/pattern_vs_uniform.py   (writes benchmarks/results/pattern_vs_uniform.json)

Every per-layer method of `lorank bench --baselines` (lorank's gradient pattern, Fisher, EVA,
AdaLoRA) spends the parameters of rank 8 everywhere and trains with the task's recipe at the
sweep's best lr for rank 8, once per sweep seed. The sweep's own rank-8 runs at that lr with
the same seeds are the uniform arm. Per task and method: the difference of seed-mean losses
(pattern - uniform) and its standard error, sqrt(paired SE over validation examples^2 + each
arm's seed SD^2 / seeds), the same parts as DESIGN.md's tolerance. A pattern "beats uniform"
when the difference is below -2 SE, "loses" above +2 SE, else it is a tie.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from lorank.api import versions
from lorank.bench.score import load_sweep
from lorank.scoring import paired_se, seed_se

RESULTS = Path(__file__).resolve().parent / "results"
UNIFORM_RANK = 8


def seed_sd(runs: list[np.ndarray]) -> float:
    """`scoring.seed_se` of the runs' mean losses."""
    return seed_se([float(np.nanmean(r)) for r in runs])


def compare(task_dir: Path, baseline: dict, sweep: dict) -> dict | None:
    seeds = [r["seed"] for r in baseline["runs"]]
    uniform = {t["seed"]: np.asarray(t["per_example"], float) for t in sweep["trials"]
               if t["rank"] == UNIFORM_RANK and math.isclose(t["lr"], baseline["lr"])
               and t["status"] == "ok" and t.get("per_example") and t["seed"] in seeds}
    if sorted(uniform) != sorted(seeds):
        return None
    pattern = [np.asarray(r["per_example"], float) for r in baseline["runs"]]
    flat = [uniform[s] for s in seeds]
    a, b = np.mean(pattern, axis=0), np.mean(flat, axis=0)
    diff = float(np.nanmean(a) - np.nanmean(b))
    se = math.sqrt(paired_se(a, b) ** 2 + seed_sd(pattern) ** 2 + seed_sd(flat) ** 2)
    verdict = "beats uniform" if diff < -2 * se else "loses" if diff > 2 * se else "tie"
    ranks = list(baseline["rank_pattern"].values())
    return {"task": task_dir.name, "method": baseline["name"], "lr": baseline["lr"],
            "seeds": seeds, "pattern_loss": float(np.nanmean(a)),
            "uniform_loss": float(np.nanmean(b)), "diff": diff, "se": se, "verdict": verdict,
            "ranks_min_max": [min(ranks), max(ranks)] if ranks else None}


def main() -> None:
    rows = []
    for task_dir in sorted(RESULTS.iterdir()):
        if not (task_dir / "sweep.json").exists() or not (task_dir / "baselines").is_dir():
            continue
        sweep = load_sweep(task_dir)
        for path in sorted((task_dir / "baselines").glob("*.json")):
            row = compare(task_dir, json.loads(path.read_text()), sweep)
            if row is not None:
                rows.append(row)
    for r in rows:
        print(f"{r['task']:16s} {r['method']:9s} pattern {r['pattern_loss']:.3f} uniform "
              f"{r['uniform_loss']:.3f} diff {r['diff']:+.3f} +- {r['se']:.3f}  {r['verdict']}")
    out = {"uniform_rank": UNIFORM_RANK, "rows": rows, "versions": versions()}
    (RESULTS / "pattern_vs_uniform.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
