"""How the best learning rate moves with rank: the slope read from sweeps, the rule that applies
it, and the shipped slope reproduced from the stored sweeps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lorank.bench.lr_rank import best_lrs, lr_rule_regrets, slope
from lorank.planned_run import LR_SLOPE_FILE, lr_at_rank, lr_slope

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def planted_losses(k: float) -> dict[tuple[int, float], float]:
    """Loss parabolic in log2(lr) around a best lr of 4e-3 * (r/8)^k, on a 2x grid that
    brackets it at every rank."""
    grid = [2.5e-4 * 2 ** i for i in range(10)]
    return {(r, lr): 1.0 + (math.log2(lr) - math.log2(4e-3 * (r / 8) ** k)) ** 2
            for r in (1, 2, 4, 8, 16, 32, 64) for lr in grid}


@pytest.mark.parametrize("k", [0.0, -0.27, -0.5])
def test_slope_of_a_planted_sweep_is_recovered_between_grid_points(k):
    best = best_lrs(planted_losses(k))
    assert best[8] == pytest.approx(4e-3, rel=1e-6)
    assert slope(best) == pytest.approx(k, abs=1e-6)


def test_lr_at_rank_moves_by_the_shipped_slope():
    k = lr_slope()
    assert -1.0 < k < 0.0  # lower lr at higher rank under rsLoRA, less than alpha/r's move
    assert lr_at_rank(4e-3, 8, 8) == 4e-3
    assert lr_at_rank(4e-3, 64, 8) == pytest.approx(4e-3 * 8 ** -k)
    assert lr_at_rank(4e-3, 8, 64) < 4e-3


def test_shipped_slope_is_reproduced_from_the_stored_sweeps():
    if not any(RESULTS.glob("*/sweep.json")):
        pytest.skip("no stored sweeps in this checkout")
    shipped = json.loads(LR_SLOPE_FILE.read_text())
    assert lr_rule_regrets(RESULTS) == shipped
