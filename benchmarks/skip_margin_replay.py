"""Replay the sweep's second-seed skip rule on every task swept in full: what would it skip, and
would it change any rank's best learning rate or the curve's answer?

Usage: python benchmarks/skip_margin_replay.py [MARGIN ...]   (default 0.25 0.5 1.0)

For each task under benchmarks/results with a sweep.json, takes the stored trials, runs
`lorank.sweep.dominated_reason` on every later-seed point as the sweep would (with every
first-seed run finished), drops the points it skips, and compares `rank_loss_curve` and
`curve_right_rank` with and without them. Prints one line per (margin, task) and a total;
writes benchmarks/results/skip_margin_replay.json.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from lorank.scoring import curve_right_rank
from lorank.sweep import SweepSpec, dominated_reason, rank_loss_curve

RESULTS = Path(__file__).parent / "results"


def replay(sweep: dict, margin: float) -> dict:
    spec = SweepSpec(ranks=sweep["spec"]["ranks"], lrs=sweep["spec"]["lrs"],
                     seeds=sweep["spec"]["seeds"], skip_margin=margin)
    trials = sweep["trials"]
    first = [t for t in trials if t["seed"] == spec.seeds[0]]
    kept = [t for t in trials if t["seed"] == spec.seeds[0]
            or dominated_reason(first, spec, t) is None]
    later = [t for t in trials if t["seed"] != spec.seeds[0]]
    full, cut = rank_loss_curve(trials), rank_loss_curve(kept)
    changed = {r: (full[r]["lr"], cut[r]["lr"]) for r in full if full[r]["lr"] != cut[r]["lr"]}
    return {"later_seed_runs": len(later), "skipped": len(trials) - len(kept),
            "best_lr_changed": {str(r): v for r, v in changed.items()},
            "r_star": [curve_right_rank(full).r_star, curve_right_rank(cut).r_star],
            "best_rank": [curve_right_rank(full).best_rank, curve_right_rank(cut).best_rank]}


def main(margins: list[float]) -> None:
    sweeps = {p.parent.name: json.loads(p.read_text())
              for p in sorted(RESULTS.glob("*/sweep.json"))}
    sweeps = {k: v for k, v in sweeps.items() if len(v["spec"]["seeds"]) > 1
              and len(v["trials"]) == len(v["spec"]["ranks"]) * len(v["spec"]["lrs"])
              * len(v["spec"]["seeds"])}
    out = {}
    for margin in margins:
        rows = {task: replay(sweep, margin) for task, sweep in sweeps.items()}
        for task, row in rows.items():
            print(f"margin {margin:g} {task}: skips {row['skipped']} of "
                  f"{row['later_seed_runs']} later-seed runs; best lr changed at "
                  f"{row['best_lr_changed'] or 'no rank'}; r* {row['r_star'][0]} -> "
                  f"{row['r_star'][1]}, best rank {row['best_rank'][0]} -> {row['best_rank'][1]}")
        print(f"margin {margin:g} total: skips {sum(r['skipped'] for r in rows.values())} of "
              f"{sum(r['later_seed_runs'] for r in rows.values())}; "
              f"{sum(len(r['best_lr_changed']) for r in rows.values())} ranks change best lr")
        out[f"{margin:g}"] = rows
    (RESULTS / "skip_margin_replay.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main([float(m) for m in sys.argv[1:]] or [0.25, 0.5, 1.0])
