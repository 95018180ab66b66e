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
    # a note, not a warning: the benchmark's r* sits above the ceiling on most tasks
    assert any("above the capacity ceiling 2, a loose bound" in r and "not used to cap" in r
               for r in rec.rationale), rec.rationale
    assert not rec.warnings


def test_forced_rank_replaces_the_pattern_and_its_warnings_are_about_it(tiny_llama):
    """`--rank 1` below the estimate: the ceiling warning was about the estimate's rank 8
    (the forced rank used to be patched in after the warnings were written)."""
    targets = resolve_targets(tiny_llama)
    name = targets.layers[0].name
    ev = [Evidence("capacity", "ceiling", 2),
          Evidence("gradient", "estimate", 8, interval=(4, 8), rank_pattern={name: 4})]
    rec = decide(ev, targets, forced_rank=1)
    assert rec.rank == 1 and rec.rank_pattern == {}
    assert rec.rationale[0] == "rank 1 forced by the user (evidence suggested 8)"
    assert not any("above the capacity ceiling" in r for r in rec.rationale), rec.rationale
    assert rec.trainable_params == targets.params(1)
    assert any(r.startswith("rank 4 is above the capacity ceiling 2")
               for r in decide(ev, targets, forced_rank=4).rationale)


def test_estimate_at_its_limit_or_far_above_ceiling_is_low_confidence(tiny_llama):
    targets = resolve_targets(tiny_llama)
    capped = Evidence("gradient", "estimate", 16, interval=(16, 16),
                      notes=["3 layer(s) reach max_rank=16 (e.g. x): the true rank may be higher"])
    assert decide([capped], targets, ranks=[1, 2, 4, 8, 16]).confidence == "low"
    far = [Evidence("capacity", "ceiling", 1), Evidence("gradient", "estimate", 8, interval=(8, 8))]
    rec = decide(far, targets, ranks=[1, 2, 4, 8, 16])
    assert rec.confidence == "low"
    assert any("more than 4x above it is given low confidence" in r for r in rec.rationale)


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


# ------------------------------------------------ decide() on curves measured as estimators do


def measured(means, *, spread=0.5, noise=0.01, n=300, config=None, ranks=RANKS) -> Evidence:
    """Probe evidence built as `nested_probe` builds it: per-example losses per rank (each
    example's difficulty shared by every rank, as on one validation set) through the probe's
    own summary, so the rank, tolerance and confidence are computed, not hand-set."""
    import numpy as np

    from lorank.estimators.probe import ProbeResult, _summarize

    rng = np.random.default_rng(0)
    base = 1.0 + rng.uniform(-spread, spread, n)
    val = {r: base + (m - 1.0) + rng.normal(0, noise, n) for r, m in zip(ranks, means,
                                                                          strict=True)}
    summary = _summarize("nested", ranks, val, None, n_boot=200, seed=0)
    summary.pop("method")
    return ProbeResult(method="nested", ranks=ranks, max_rank=ranks[-1],
                       val_losses={r: v.tolist() for r, v in val.items()},
                       config=config or {"lora_alpha": 8.0, "use_rslora": True},
                       **summary).to_evidence()


def test_flat_curve_takes_the_smallest_rank(tiny_llama):
    rec = decide([measured([1.000, 1.001, 0.999, 1.002, 1.000, 1.001])],
                 resolve_targets(tiny_llama), ranks=RANKS)
    assert rec.rank == 1 and rec.confidence == "high"
    assert any("curve is flat" in r and "smallest is enough" in r for r in rec.rationale)
    assert not rec.warnings


def test_rising_curve_takes_the_best_and_says_overfitting(tiny_llama):
    rec = decide([measured([1.50, 1.20, 1.00, 1.05, 1.12, 1.20])], resolve_targets(tiny_llama),
                 ranks=RANKS)
    assert rec.rank == 4 and rec.confidence == "high"
    assert any("rises above rank 4 (overfitting)" in r for r in rec.rationale)


def test_noisy_curve_is_low_confidence(tiny_llama):
    rec = decide([measured([1.50, 1.10, 1.40, 1.00, 1.35, 1.05])], resolve_targets(tiny_llama),
                 ranks=RANKS)
    assert rec.rank == 8 and rec.confidence == "low"
    assert any("zig-zags" in r for r in rec.rationale)


def test_shape_uses_the_rules_paired_tolerance(tiny_llama):
    """Hard and easy examples spread the per-rank losses (unpaired SE 0.02) while rank 1 is
    worse on every example by 0.03 (paired SE ~0.001): the rule picks 2, and the shape must
    not call the curve flat ("the smallest is enough") on the unpaired SE."""
    from lorank.decide import rule_tolerance

    ev = measured([1.03, 1.0, 1.0, 1.0, 1.0, 1.0], spread=0.6)
    assert curve_shape(ev.curve)[0] == "flat"  # the unpaired SE alone would say so
    assert curve_shape(ev.curve, rule_tolerance(ev))[0] == "knee"
    rec = decide([ev], resolve_targets(tiny_llama), ranks=RANKS)
    assert rec.rank == 2 and not any("curve is flat" in r for r in rec.rationale)


# ------------------------------------------------------------------------- scaling rule


def test_alpha_and_rslora_come_from_the_deciding_curve(tiny_llama):
    targets = resolve_targets(tiny_llama)
    probe = measured([1.50, 1.30, 1.10, 1.00, 0.999, 1.001],
                     config={"lora_alpha": 16.0, "use_rslora": False})
    rec = decide([Evidence("gradient", "estimate", 2, interval=(2, 2)), probe], targets,
                 ranks=RANKS)
    assert (rec.lora_alpha, rec.use_rslora) == (16.0, False)
    assert any("lora_alpha 16 (scale alpha/r)" in r for r in rec.rationale)
    assert decide([probe], targets, ranks=RANKS, lora_alpha=4.0).lora_alpha == 4.0  # explicit


def test_sweep_recipe_sets_alpha_and_its_truth_sets_the_tolerance(tiny_llama):
    """A sweep run with --lora-alpha 16 exports alpha 16; evidence shaped as `sweep_evidence`
    makes it (curve rows + the rule's `truth`, the recipe beside it)."""
    import numpy as np

    rng = np.random.default_rng(1)
    base = rng.gamma(2.0, 0.5, 300)
    losses = {r: base + (0.03 if r == 1 else 0.0) + rng.normal(0, 0.01, 300) for r in RANKS}
    right = right_rank(losses)
    ev = Evidence("sweep", "curve", right.r_star,
                  curve={r: {"loss": float(v.mean()), "se": float(v.std(ddof=1) / 300 ** 0.5)}
                         for r, v in losses.items()},
                  details={"truth": right.to_dict(),
                           "recipe": {"lora_alpha": 16.0, "use_rslora": True}})
    rec = decide([ev], resolve_targets(tiny_llama), ranks=RANKS)
    assert right.r_star == 2 and rec.rank == 2
    assert (rec.lora_alpha, rec.use_rslora) == (16.0, True)
    assert not any("curve is flat" in r for r in rec.rationale)


def test_no_scaling_rule_in_the_evidence_keeps_the_default(tiny_llama):
    from lorank.decide import DEFAULT_ALPHA

    rec = decide([Evidence("gradient", "estimate", 4, interval=(4, 4),
                           rank_pattern={"model.layers.0.self_attn.q_proj": 8})],
                 resolve_targets(tiny_llama), ranks=RANKS)
    assert (rec.lora_alpha, rec.use_rslora) == (DEFAULT_ALPHA, True)
    # rsLoRA with one alpha already scales each pattern layer by its own rank
    assert rec.rank_pattern and rec.alpha_pattern == {}


def test_terminal_shows_every_rank_of_a_measured_curve():
    """The probe's curve in the terminal: every rank it read (6 is not a candidate), the
    chosen one marked, bars from the best loss (none) to the worst (full width)."""
    from rich.console import Console

    from lorank.decide import Recommendation
    from lorank.report import print_recommendation

    curve = {1: {"loss": 2.0, "se": 0.05}, 2: {"loss": 1.5, "se": 0.05},
             6: {"loss": 1.2, "se": 0.04}, 8: {"loss": 1.21, "se": 0.04}}
    rec = Recommendation(
        rank=6, lora_alpha=8.0, use_rslora=True, target_modules=["q_proj"], modules_to_save=[],
        rank_pattern={}, alpha_pattern={}, trainable_params=1000, adapter_bytes=4000,
        memory={"total": 10**6}, confidence="medium", rationale=[], warnings=[],
        evidence=[{"name": "svd-probe", "curve": curve}, {"name": "capacity", "curve": {}}],
        candidates=[])
    console = Console(record=True, width=120)
    print_recommendation(rec, console)
    text = console.export_text()
    assert "svd-probe: validation loss by rank" in text and "capacity:" not in text
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in text.splitlines()
             if line.count("│") == 5]
    rows = {c[0].split()[0]: c for c in cells if "." in c[1]}
    assert list(rows) == ["1", "2", "6", "8"] and rows["6"][0] == "6 ←"
    assert [rows[r][3].count("▇") for r in rows] == [30, 11, 0, 0]  # (L - 1.2) / 0.8 x 30


def test_a_measured_rank_is_not_snapped_to_an_unmeasured_candidate(tiny_llama):
    """A probe at max rank 6 whose knee is 6 recommends 6, not the unmeasured candidate 8."""
    rec = decide([measured([1.50, 1.30, 1.15, 1.00], ranks=[1, 2, 3, 6])],
                 resolve_targets(tiny_llama), ranks=RANKS)
    assert rec.rank == 6


def test_sweep_beats_probe_and_says_why(tiny_llama):
    sweep = probe_evidence([1.50, 1.30, 1.00, 0.999, 1.001, 1.000], 4)
    sweep.name = "sweep"
    probe = probe_evidence([1.50, 1.30, 1.10, 1.00, 0.999, 1.001], 8)
    rec = decide([probe, sweep], resolve_targets(tiny_llama), ranks=RANKS)
    assert rec.rank == 4
    assert any(w.startswith("probe says rank 8, sweep says 4: trusting sweep, whose curve "
                            "comes from independent runs") for w in rec.warnings)
    agree = decide([probe_evidence([1.5, 1.3, 1.0, 0.999, 1.001, 1.0], 4), sweep],
                   resolve_targets(tiny_llama), ranks=RANKS)
    assert not any("trusting sweep" in w for w in agree.warnings)
