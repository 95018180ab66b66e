"""Scoring definitions on hand-made rank-loss curves where the right answer is known."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lorank.scoring import (
    RightRank,
    cost,
    interpolate_loss,
    paired_se,
    regret,
    right_rank,
    score,
    unpaired_se,
    waste,
)

RANKS = (1, 2, 4, 8, 16, 32, 64)
N = 400


def curve(offsets: dict[int, float], noise: float = 0.01, seed: int = 0) -> dict[int, np.ndarray]:
    """Per-example losses: a shared example difficulty + a rank offset + centred rank noise.

    The noise is centred so that mean L(r) is exactly base mean + offset; its size sets the
    paired SE.
    """
    rng = np.random.default_rng(seed)
    base = rng.gamma(2.0, 1.0, size=N)  # examples differ far more than ranks do
    out = {}
    for r, off in offsets.items():
        e = rng.normal(0, noise, size=N)
        out[r] = base + off + (e - e.mean())
    return out


KNEE = {1: 0.6, 2: 0.35, 4: 0.15, 8: 0.0, 16: -0.002, 32: -0.004, 64: -0.003}


def test_paired_se_exact() -> None:
    a, b = np.array([1.0, 2.0, 3.0, 4.0]), np.zeros(4)
    assert paired_se(a, b) == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2)
    assert paired_se(a, a + 1.0) == 0.0  # a constant shift is known exactly when paired


def test_paired_se_is_much_smaller_than_unpaired_on_correlated_losses() -> None:
    rng = np.random.default_rng(1)
    base = rng.gamma(2.0, 1.0, size=2000)
    a = base + rng.normal(0, 0.05, 2000)
    b = base + 0.02 + rng.normal(0, 0.05, 2000)
    assert unpaired_se(a, b) > 10 * paired_se(a, b)
    # independent samples: pairing buys nothing, the two agree
    c, d = rng.normal(0, 1, 2000), rng.normal(0, 1, 2000)
    assert paired_se(c, d) == pytest.approx(unpaired_se(c, d), rel=0.1)


def test_flat_curve_gives_smallest_rank() -> None:
    rr = right_rank(curve(dict.fromkeys(RANKS, 0.0)))
    assert rr.r_star == 1


def test_clear_knee_gives_the_knee() -> None:
    rr = right_rank(curve(KNEE))
    assert rr.best_rank == 32
    assert rr.r_star == 8
    assert rr.L[8] == pytest.approx(rr.L[32] + 0.004)


def test_large_paired_se_gives_smaller_rank() -> None:
    rr = right_rank(curve(KNEE, noise=3.0))
    assert rr.r_star < 8
    assert rr.tol[4] > 0.15 + 0.004  # the 0.15 gap is inside two paired SEs


def test_relative_floor_accepts_a_one_percent_gap() -> None:
    offsets = dict.fromkeys(RANKS, 0.0)
    losses = curve(offsets, noise=0.0)
    mean = float(losses[64].mean())
    losses[1] = losses[1] + 0.02 * mean  # 2% worse: rejected
    losses[2] = losses[2] + 0.009 * mean  # 0.9% worse: accepted, no noise to widen the tol
    for r in (4, 8, 16, 32):
        losses[r] = losses[r] + 0.001
    rr = right_rank(losses)
    assert rr.best_rank == 64
    assert rr.tol[2] == pytest.approx(0.01 * rr.L_best)
    assert rr.r_star == 2


def test_seed_spread_widens_the_tolerance() -> None:
    losses = curve(KNEE)
    spread = dict.fromkeys(RANKS, 0.1)
    narrow, wide = right_rank(losses), right_rank(losses, seed_spread=spread)
    for r in RANKS:
        assert wide.tol[r] >= narrow.tol[r]
        if r != wide.best_rank:
            expected = max(0.01 * wide.L_best, 2 * math.sqrt(wide.se[r] ** 2 + 0.02))
            assert wide.tol[r] == pytest.approx(expected)
    assert wide.tol[wide.best_rank] == pytest.approx(0.01 * wide.L_best)
    assert narrow.r_star == 8 and wide.r_star == 4  # 4 is 0.154 worse; tol ~ 0.28


def test_right_rank_round_trips_through_json() -> None:
    rr = right_rank(curve(KNEE), seed_spread=dict.fromkeys(RANKS, 0.01))
    back = RightRank.from_dict(json.loads(json.dumps(rr.to_dict())))
    assert back == rr


def test_right_rank_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="same non-empty"):
        right_rank({1: np.ones(3), 2: np.ones(4)})
    with pytest.raises(ValueError, match="non-finite"):
        right_rank({1: np.array([1.0, np.nan]), 2: np.ones(2)})


def test_regret_exact_and_interpolated() -> None:
    L = {1: 2.2, 2: 2.1, 4: 2.0, 8: 2.0}
    assert regret(L, 4) == 0.0
    assert regret(L, 1) == pytest.approx(0.1)
    # 2*sqrt(2) is halfway between 2 and 4 in log-rank
    assert interpolate_loss(L, 2 * math.sqrt(2)) == pytest.approx(2.05)
    assert regret(L, 2 * math.sqrt(2)) == pytest.approx(0.025)
    assert regret(L, 128) == 0.0  # above the grid: flat beyond the last swept rank


def test_waste_exact() -> None:
    table = {r: 1000 * r + 50 for r in RANKS}  # LoRA params + a trained head
    assert waste(table, 16, 4) == pytest.approx(16050 / 4050)
    assert waste(lambda r: 10 * r, 64, 8) == 8.0
    assert waste({1: 10, 2: 20, 4: 40}, 3, 1) == pytest.approx(3.0)
    assert waste({1: 10, 2: 20, 4: 40}, 8, 2) == pytest.approx(4.0)  # extrapolated


def test_cost_exact() -> None:
    assert cost(56, 7, 2, 40) == pytest.approx(0.1)
    assert cost(7 * 2 * 40, 7, 2, 40) == 1.0


def test_score_row() -> None:
    rr = right_rank(curve(KNEE))
    params = {r: 100 * r for r in RANKS}
    row = score("fixed-r16", 16, rr, params, cost_fraction=0.0)
    assert row["method"] == "fixed-r16" and row["r_star"] == 8 and row["on_grid"]
    assert row["waste"] == pytest.approx(2.0)
    assert row["regret"] == pytest.approx((rr.L[16] - rr.L_best) / rr.L_best)
    assert row["acceptable"]
    low = score("too-small", 2, rr, params, cost_fraction=0.05)
    assert not low["acceptable"] and low["regret"] > 0.1 and low["waste"] == 0.25
    json.dumps(row)
