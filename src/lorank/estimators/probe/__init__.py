"""Rank probes: the whole rank -> validation-loss curve from one training run, by truncating
one adapter to every candidate rank and scoring each truncation on the validation set.

Two variants: the SVD probe (`svd`, the default) trains a plain rank-R adapter and truncates
its per-layer update by SVD; the nested probe (`nested`) trains one adapter whose every prefix
of components is itself a trained adapter. Both read the truncations through `truncation`,
turn the losses into a curve and a decision with `curve`, may pick their learning rate first
with `pilot`, and add `callbacks` to their run. Every name is re-exported here, so
`lorank.estimators.probe.X` keeps working for callers.
"""

from lorank.estimators.probe.callbacks import SaveEvery, _StopAt
from lorank.estimators.probe.curve import (
    RACE_FRACTIONS,
    RACE_MARGIN_SE,
    RACE_MIN_PREFIX,
    ProbeResult,
    _bootstrap,
    _subsample,
    _summarize,
    curve_se,
    default_ranks,
    race_ranks,
    raced_survivors,
    smallest_within_tolerance,
)
from lorank.estimators.probe.nested import (
    EVAL_COST_PER_EXAMPLE,
    _ProbeEvaluator,
    monitoring_pays,
    nested_probe,
)
from lorank.estimators.probe.pilot import pick_learning_rate, pilot_rank
from lorank.estimators.probe.svd import (
    SVDCurveEvaluator,
    _rotate_to_svd_basis,
    svd_truncation_curve,
)
from lorank.estimators.probe.truncation import NestedLoRA, lora_linear_layers

__all__ = [
    # public
    "EVAL_COST_PER_EXAMPLE",
    "RACE_FRACTIONS",
    "RACE_MARGIN_SE",
    "RACE_MIN_PREFIX",
    "NestedLoRA",
    "ProbeResult",
    "SVDCurveEvaluator",
    "SaveEvery",
    "curve_se",
    "default_ranks",
    "lora_linear_layers",
    "monitoring_pays",
    "nested_probe",
    "pick_learning_rate",
    "pilot_rank",
    "race_ranks",
    "raced_survivors",
    "smallest_within_tolerance",
    "svd_truncation_curve",
    # private, kept importable from here for the callers and tests that use them
    "_ProbeEvaluator",
    "_StopAt",
    "_bootstrap",
    "_rotate_to_svd_basis",
    "_subsample",
    "_summarize",
]
