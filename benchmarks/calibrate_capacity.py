"""Fit the capacity estimate's efficiency (bits stored per adapter parameter at r*) from the
stored sweeps, and write it with the rows it was fitted on and its leave-one-task-out record.

    .venv/bin/python benchmarks/calibrate_capacity.py [--results benchmarks/results]

Reads every complete `RESULTS/<task>/sweep.json` with an `estimators/capacity.json` (from
`lorank bench --run capacity`); writes `src/lorank/estimators/capacity_fit.json`, which
`lorank recommend` ships and `lorank bench` scores held-out (each task with the fit made
without it). Nothing is set by hand: rerun this after a sweep or a capacity measurement changes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lorank.bench.score import calibration_rows
from lorank.estimators.capacity import CALIBRATION_FILE, calibrate
from lorank.util import atomic_write_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--out", type=Path, default=CALIBRATION_FILE)
    args = parser.parse_args()
    fit = calibrate(calibration_rows(args.results))
    atomic_write_text(args.out, json.dumps(fit, indent=1) + "\n")
    s = fit["loto_summary"]
    for kind, f in fit["fits"].items():
        print(f"{kind}: 2^{f['efficiency']['log2_e']} = {2 ** f['efficiency']['log2_e']:.4f} "
              f"bits/param (epochs slope {f['efficiency']['epochs_slope']}) from "
              f"{', '.join(f['tasks'])}" + (" (borrowed)" if f["borrowed"] else ""))
    print("held out: "
          f"{s['within_tolerance']}/{s['tasks']} within tolerance, {s['within_tolerance_and_2x']}"
          f" also within 2x r*, {s['exact']} exact")
    for task, v in fit["leave_one_task_out"].items():
        print(f"  {task:18s} pick {v['pick']:3d}  r* {v['r_star']:3d}  "
              f"{'ok' if v['acceptable'] else 'MISS'}")


if __name__ == "__main__":
    main()
