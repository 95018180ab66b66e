"""The decision on hand-made curves: flat, knee, rising, still falling, noisy; trust order."""

from __future__ import annotations

import pytest

from lorank.decide import curve_shape, decide
from lorank.estimators.base import Evidence
from lorank.scoring import right_rank
from lorank.targets import resolve_targets

RANKS = [1, 2, 4, 8, 16, 32]


def curve(losses, se=0.002):
    return {r: {"loss": v, "se": se} for r, v in zip(RANKS, losses, strict=True)}


@pytest.mark.parametrize("losses,shape", [
    ([1.000, 1.001, 0.999, 1.002, 1.000, 1.001], "flat"),
    ([1.50, 1.30, 1.10, 1.00, 0.999, 1.001], "knee"),
    ([1.50, 1.20, 1.00, 1.05, 1.12, 1.20], "rising"),
    ([1.50, 1.40, 1.30, 1.20, 1.10, 1.00], "still falling"),
    ([1.50, 1.10, 1.40, 1.00, 1.35, 1.05], "noisy"),
])
def test_curve_shapes(losses, shape):
    assert curve_shape(curve(losses))[0] == shape


def test_large_se_makes_a_bumpy_curve_flat():
    assert curve_shape(curve([1.05, 1.00, 1.04, 1.01, 1.03, 1.02], se=0.03))[0] == "flat"


def probe_evidence(losses, r):
    return Evidence("probe", "curve", r, curve=curve(losses), details={"confidence": "high"})


def test_curve_beats_estimate_and_warns_on_disagreement(tiny_llama):
    targets = resolve_targets(tiny_llama)
    ev = [Evidence("capacity", "ceiling", 16),
          Evidence("gradient", "estimate", 1, interval=(1, 2)),
          probe_evidence([1.50, 1.30, 1.10, 1.00, 0.999, 1.001], 8)]
    rec = decide(ev, targets, ranks=[1, 2, 4, 8, 16])
    assert rec.rank == 8 and rec.confidence == "high"
    assert any("gradient says rank 1, probe says 8" in w for w in rec.warnings)
    assert any("flattens" in r for r in rec.rationale)


def test_still_falling_warns_and_lowers_confidence(tiny_llama):
    rec = decide([probe_evidence([1.5, 1.4, 1.3, 1.2, 1.1, 1.0], 16)],
                 resolve_targets(tiny_llama), ranks=[1, 2, 4, 8, 16])
    assert rec.rank == 16 and rec.confidence == "low"
    assert any("raise the maximum rank" in w for w in rec.warnings)


def test_estimate_capped_by_nothing_but_flagged_above_ceiling(tiny_llama):
    ev = [Evidence("capacity", "ceiling", 2), Evidence("gradient", "estimate", 8, interval=(4, 8))]
    rec = decide(ev, resolve_targets(tiny_llama), ranks=[1, 2, 4, 8, 16])
    assert rec.rank == 8 and rec.confidence == "medium"
    assert any("above the capacity ceiling 2" in w for w in rec.warnings)


def test_estimate_at_its_limit_or_far_above_ceiling_is_low_confidence(tiny_llama):
    targets = resolve_targets(tiny_llama)
    capped = Evidence("gradient", "estimate", 16, interval=(16, 16),
                      notes=["3 layer(s) reach max_rank=16 (e.g. x): the true rank may be higher"])
    assert decide([capped], targets, ranks=[1, 2, 4, 8, 16]).confidence == "low"
    far = [Evidence("capacity", "ceiling", 1), Evidence("gradient", "estimate", 8, interval=(8, 8))]
    assert decide(far, targets, ranks=[1, 2, 4, 8, 16]).confidence == "low"


def test_ceiling_alone_is_low_confidence(tiny_llama):
    rec = decide([Evidence("capacity", "ceiling", 4)], resolve_targets(tiny_llama),
                 ranks=[1, 2, 4, 8, 16])
    assert rec.rank == 4 and rec.confidence == "low"


def test_no_evidence_says_folklore(tiny_llama):
    rec = decide([], resolve_targets(tiny_llama), ranks=[1, 2, 4, 8, 16])
    assert rec.rank == 16 and any("folklore" in w for w in rec.warnings)


def test_probe_rule_is_the_scoring_rule():
    import numpy as np

    from lorank.estimators.probe import smallest_within_tolerance

    rng = np.random.default_rng(0)
    base = rng.gamma(2.0, 1.0, 300)
    losses = {r: base * (1.2 - 0.2 * min(r, 4) / 4) + rng.normal(0, 0.02, 300) for r in RANKS}
    assert smallest_within_tolerance(losses)[0] == right_rank(losses).r_star == 4


def test_alpha_matches_training_rule():
    from lorank.decide import DEFAULT_ALPHA
    from lorank.train import DEFAULT_ALPHA as TRAIN_ALPHA

    assert DEFAULT_ALPHA == TRAIN_ALPHA
