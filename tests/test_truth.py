"""How sure r* is: the settle rule on hand-made sweep records (a hinging rank gets one more
seed, a clear verdict none, never past 5 seeds) and r*'s stability on planted curves."""

from __future__ import annotations

import numpy as np

from lorank.scoring import MAX_SEEDS, curve_right_rank, hinging_ranks, r_star_stability
from lorank.sweep import SweepSpec, rank_loss_curve, settle_points

N = 200
RANKS = (1, 2, 4, 8)


def record(rank: int, seed: int, mean: float, lr: float = 1e-3, noise: float = 0.05,
           rng_seed: int = 0) -> dict:
    """One finished run: per-example losses around `mean` (the same examples for every run:
    a shared per-example difficulty plus run noise)."""
    difficulty = np.random.default_rng(123).normal(0, 0.5, N)
    run = np.random.default_rng(rng_seed + 1000 * rank + seed).normal(0, noise, N)
    per = mean + difficulty + run - (difficulty + run).mean()
    return {"rank": rank, "lr": lr, "seed": seed, "status": "ok", "value": float(per.mean()),
            "per_example": per.tolist(), "number": 0}


def spec(seeds=(0, 1)) -> SweepSpec:
    return SweepSpec(ranks=list(RANKS), lrs=[1e-3], seeds=list(seeds), settle=True)


def test_a_clear_curve_settles_nothing():
    # ranks 1, 2 far above the line, 4 and 8 at the best: no verdict near its tolerance
    means = {1: 2.0, 2: 1.6, 4: 1.0, 8: 1.0}
    finished = [record(r, s, means[r] + 0.001 * s) for r in RANKS for s in (0, 1)]
    assert settle_points(finished, spec()) == []


def test_a_hinging_rank_gets_one_more_seed_at_its_best_lr():
    # rank 2's two seeds straddle the tolerance line (1.0 + 1%): its verdict hinges
    means = {1: 2.0, 4: 1.0, 8: 1.0}
    finished = [record(r, s, means[r]) for r in (1, 4, 8) for s in (0, 1)]
    finished += [record(2, 0, 0.95), record(2, 1, 1.10)]
    finished += [record(r, 0, 3.0, lr=1e-2) for r in RANKS]  # a worse lr at every rank
    points = settle_points(finished, spec())
    assert [p for p, _ in points] == [{"rank": 2, "lr": 1e-3, "seed": 2}]
    assert "rank 2" in points[0][1] and "seed" in points[0][1]


def test_settle_waits_for_the_grid_and_stops_at_five_seeds():
    means = {1: 2.0, 4: 1.0, 8: 1.0}
    base = [record(r, s, means[r]) for r in (1, 4, 8) for s in (0, 1)]
    assert settle_points(base + [record(2, 0, 0.95)], spec()) == []  # grid not done yet
    five = [record(2, s, 0.95 if s % 2 == 0 else 1.10) for s in range(MAX_SEEDS)]
    assert settle_points(base + five, spec()) == []
    off = SweepSpec(ranks=list(RANKS), lrs=[1e-3], seeds=[0, 1])
    assert settle_points(base + five[:2], off) == []  # the rule runs only when asked


def test_hinging_ranks_read_the_seed_noise_of_the_mean():
    finished = [record(r, s, m) for r, m in ((1, 2.0), (4, 1.0), (8, 1.0)) for s in (0, 1)]
    finished += [record(2, 0, 0.95), record(2, 1, 1.10)]
    curve = rank_loss_curve(finished)
    right = curve_right_rank(curve)
    seeds = {r: row["seeds"] for r, row in curve.items()}
    assert set(hinging_ranks(right, seeds)) == {2}
    assert hinging_ranks(right, {r: MAX_SEEDS for r in seeds}) == {}


def test_stability_is_high_for_a_clear_knee_and_low_for_a_tie():
    clear = {1: [record(1, s, 2.0)["per_example"] for s in (0, 1)],
             2: [record(2, s, 1.5)["per_example"] for s in (0, 1)],
             4: [record(4, s, 1.0)["per_example"] for s in (0, 1)],
             8: [record(8, s, 1.0)["per_example"] for s in (0, 1)]}
    got = r_star_stability(clear, n_resamples=100)
    assert got["r_star"] == 4 and got["stable"] and got["share"] >= 0.95
    # rank 2 sits right on the tolerance line with seeds that disagree: r* flips
    tie = dict(clear)
    tie[2] = [record(2, 0, 0.96, noise=0.3)["per_example"],
              record(2, 1, 1.20, noise=0.3)["per_example"]]
    shaky = r_star_stability(tie, n_resamples=100)
    assert not shaky["stable"] and set(shaky["distribution"]) >= {"2", "4"}
    assert r_star_stability(tie, n_resamples=100) == shaky  # seeded: same answer
