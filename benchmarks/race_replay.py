"""Replay the probe's raced final curve on the sweeps' stored per-example losses.

Usage: python benchmarks/race_replay.py

Every complete single-lr, single-seed curve of every swept task (7 ranks, per-example
validation losses in benchmarks/results/TASK/sweep.json) is raced with `race_ranks` under a
few settings; for each: scored (example, rank) pairs as a share of scoring every rank on every
example, and how many decisions differ from the full curve's. Writes
benchmarks/results/race_replay.json.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lorank.api import versions
from lorank.estimators.probe import race_ranks, raced_survivors, smallest_within_tolerance

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = {
    "(1/4, 1/2), clear losers stop (the first rule)": {"fractions": (0.25, 0.5),
                                                   "stop_above_answer": False},
    "(1/8, 1/4, 1/2), clear losers stop": {"fractions": (0.125, 0.25, 0.5),
                                           "stop_above_answer": False},
    "(1/4, 1/2), losers and ranks above a clear answer stop": {"fractions": (0.25, 0.5)},
    "(1/8, 1/4, 1/2), losers and ranks above a clear answer stop (default)": {},
}


def curves() -> list[tuple[str, int, float, dict[int, np.ndarray]]]:
    out = []
    for path in sorted(RESULTS.glob("*/sweep.json")):
        trials = [t for t in json.loads(path.read_text())["trials"]
                  if t["status"] == "ok" and t["per_example"]]
        for seed in sorted({t["seed"] for t in trials}):
            for lr in sorted({t["lr"] for t in trials}):
                full = {t["rank"]: np.asarray(t["per_example"], float) for t in trials
                        if t["seed"] == seed and t["lr"] == lr}
                if len(full) == 7 and all(np.all(np.isfinite(v)) for v in full.values()):
                    out.append((path.parent.name, seed, lr, full))
    return out


def main() -> dict:
    found = curves()
    report = {"curves": len(found), "settings": {}, "versions": versions()}
    for name, kwargs in SETTINGS.items():
        pairs = total = changed = 0
        for _, _, _, full in found:
            ranks = sorted(full)
            n = len(full[ranks[-1]])
            examples = list(range(n))
            raced = race_ranks(lambda r, chunk, full=full: full[r][chunk], ranks, examples,
                               **kwargs)
            decision = smallest_within_tolerance(
                {r: raced[r] for r in raced_survivors(raced)})[0]
            changed += decision != smallest_within_tolerance(full)[0]
            pairs += sum(len(v) for v in raced.values())
            total += len(ranks) * n
        report["settings"][name] = {"share_of_pairs": round(pairs / total, 3),
                                    "decisions_changed": changed}
        print(f"{name}: {pairs / total:.0%} of the pairs, {changed} of {len(found)} decisions "
              "changed")
    (RESULTS / "race_replay.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
