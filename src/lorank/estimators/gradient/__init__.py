"""Gradient spectrum: how many directions per layer the data asks for, read without training.

For a target linear layer y = W x the full-weight gradient of the summed loss over a set of
tokens is G = sum_t d_t x_t^T (d_t = dL/dy_t). The calibration examples are split into disjoint
halves A and B. Directions the data really asks for appear in both halves; noise does not. For
the top singular pairs (u_i, v_i) of G_A the cross-fitted strength s_i = u_i^T G_B v_i is centred
on zero for noise directions and positive for signal (and symmetrically B -> A).

Noise spread, from an independent source (DESIGN.md point 3): s_i is a sum over the examples of
B, s_i = sum_g c_gi with c_gi = sum_{t in group g} (u_i^T d_t)(x_t^T v_i). Under "no signal in
direction i" the c_gi are independent and centred, so flipping their signs at random leaves the
distribution of s_i unchanged. The signal rank counts directions whose self-normalised strength
T_i = sum_g c_gi / sqrt(sum_g c_gi^2) exceeds the (1 - alpha) quantile of max_i T_i over random
sign flips (a max-statistic: family-wise error alpha over the directions tested, per layer).
Symmetrised: the layer's rank is floor((count A -> B + count B -> A) / 2), so a direction found
only one way does not count; the two counts are the range reported around it.

Modules, in the order the work flows: `plan` (targets, halves, chunks, groups, batches),
`streaming` (the passes and their hooks), `accumulate` (per-layer summaries and projections),
`sketch` (randomized sketches of layers too wide to hold G), `rules` (sign-flip test and the
other rank rules, growth fit), `results` (`LayerSpectrum`, `GradientSpectrum`), `driver`
(`gradient_spectrum`). The loss is `lorank.losses.summed_loss`; a classifier's head is fitted
by `lorank.heads`. Every name is re-exported here, so `lorank.estimators.gradient.X` keeps
working for callers.
"""

from lorank.estimators.gradient.accumulate import (
    INPUT_ENERGY,
    TOP_NITER,
    TOP_OVERSAMPLE,
    _feed,
    _Tap,
)
from lorank.estimators.gradient.driver import REPLAY_MB, gradient_spectrum
from lorank.estimators.gradient.plan import _Plan, _plan, _resolve_targets
from lorank.estimators.gradient.results import GradientSpectrum, LayerSpectrum, _global, _round
from lorank.estimators.gradient.rules import (
    REPLICATION_RULES,
    RULES,
    _check_rule,
    energy_rank,
    fit_growth,
    gavish_donoho_lambda,
    replicated_energy_rank,
    replication_test,
    rule_growth,
    sign_flip_testable,
)
from lorank.estimators.gradient.sketch import (
    _add_sketch,
    _gram_eigh,
    _sketch_factors,
    _svd_of_factors,
    principal_angles_deg,
    sketch_svd,
)
from lorank.estimators.gradient.streaming import _Held, _new_storage_bytes, _Streaming, _Tape
from lorank.heads import (
    HEAD_LR,
    HEAD_STEPS,
    _head_features,
    _head_input_hook,
    find_classification_head,
    fit_head_on_frozen_features,
    train_head,
)
from lorank.losses import _summed, summed_loss

__all__ = [
    # public
    "HEAD_LR",
    "HEAD_STEPS",
    "INPUT_ENERGY",
    "REPLAY_MB",
    "REPLICATION_RULES",
    "RULES",
    "TOP_NITER",
    "TOP_OVERSAMPLE",
    "GradientSpectrum",
    "LayerSpectrum",
    "energy_rank",
    "find_classification_head",
    "fit_growth",
    "fit_head_on_frozen_features",
    "gavish_donoho_lambda",
    "gradient_spectrum",
    "principal_angles_deg",
    "replicated_energy_rank",
    "replication_test",
    "rule_growth",
    "sign_flip_testable",
    "sketch_svd",
    "summed_loss",
    "train_head",
    # private, kept importable from here for the callers and tests that use them
    "_Held",
    "_Plan",
    "_Streaming",
    "_Tap",
    "_Tape",
    "_add_sketch",
    "_check_rule",
    "_feed",
    "_global",
    "_gram_eigh",
    "_head_features",
    "_head_input_hook",
    "_new_storage_bytes",
    "_plan",
    "_resolve_targets",
    "_round",
    "_sketch_factors",
    "_summed",
    "_svd_of_factors",
]
