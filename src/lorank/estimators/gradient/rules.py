"""The rules that turn one layer's measurements into a rank, and the growth fit that carries a
rank from the calibration set to the training set's size.

Besides the replication count (`replication_test`, the sign-flip test of the package
docstring), per layer: the Gavish-Donoho hard threshold (noise level from the halves'
difference G_A - G_B, pure noise in expectation), energy ranks at 90% / 95% and the stable
rank ||G||_F^2 / ||G||_2^2, and the replicated-energy ranks at 90% / 95%: among the replicated
directions, the fewest that hold that share of the cross-fitted signal energy
max(s_AB,i, 0) * max(s_BA,i, 0) (the product of the two halves' independent estimates, whose
noise has mean zero). The replication count answers "how many directions are real"; with
enough data nearly every direction is, however weak, so it grows with n toward max_rank. The
replicated energy answers "how many carry the signal". Every rule is computed for every layer;
`RULES` names them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

RULES = ("replication", "gavish_donoho", "energy90", "energy95", "stable",
         "replicated_energy90", "replicated_energy95")
REPLICATION_RULES = ("replication", "replicated_energy90", "replicated_energy95")  # sign flips


def _check_rule(rule: str) -> str:
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}: choose one of {', '.join(RULES)}")
    return rule


def replication_test(
    c: torch.Tensor, alpha: float, n_flips: int, gen: torch.Generator
) -> dict[str, Any]:
    """Count directions replicated in the held-out half. c: (groups, directions), the per-group
    contributions to s_i = u_i^T G_heldout v_i. Statistic T_i = sum_g c_gi / sqrt(sum_g c_gi^2);
    threshold = (1 - alpha) quantile of max_i T_i over random sign flips of the groups."""
    c = c.double().cpu()
    n = c.shape[0]
    norm = (c**2).sum(0).sqrt().clamp_min(1e-300)
    t_obs = c.sum(0) / norm
    signs = torch.randint(0, 2, (n_flips, n), generator=gen).double() * 2 - 1
    t_null = ((signs @ c) / norm).max(1).values
    threshold = float(torch.quantile(t_null, 1 - alpha))
    count = int((t_obs > threshold).sum())

    def to_t(x: torch.Tensor) -> torch.Tensor:  # self-normalised sum -> one-sample t, df n - 1
        return x * math.sqrt(n - 1) / (n - x**2).clamp_min(1e-12).sqrt()

    return {
        "count": count,
        "t": [round(float(x), 4) for x in to_t(t_obs)],
        "s": [float(x) for x in c.sum(0)],
        "threshold_t": float(to_t(torch.tensor(threshold, dtype=torch.float64))),
    }


def gavish_donoho_lambda(beta: float) -> float:
    """Optimal hard threshold coefficient for known noise (Gavish and Donoho 2014): singular
    values above lambda(beta) * sqrt(n) * sigma are kept, beta = m / n <= 1."""
    return math.sqrt(2 * (beta + 1) + 8 * beta / (beta + 1 + math.sqrt(beta**2 + 14 * beta + 1)))


def energy_rank(s: np.ndarray, total: float, p: float, cap: int) -> int:
    """Smallest r whose top-r singular values hold a fraction p of ||G||_F^2 (capped)."""
    cum = np.cumsum(np.asarray(s, dtype=np.float64) ** 2) / max(total, 1e-300)
    hit = np.nonzero(cum >= p - 1e-12)[0]
    return int(min(cap, hit[0] + 1 if len(hit) else cap))


def replicated_energy_rank(s_ab: list[float], s_ba: list[float], replicated: int,
                           p: float) -> int:
    """Fewest of the first `replicated` directions holding a fraction p of their cross-fitted
    signal energy max(s_ab, 0) * max(s_ba, 0); 0 when nothing replicated."""
    k = int(replicated)
    e = np.clip(np.asarray(s_ab[:k], float), 0, None) * np.clip(np.asarray(s_ba[:k], float), 0, None)
    if k == 0 or e.sum() <= 0:
        return 0
    return int(np.searchsorted(np.cumsum(e) / e.sum(), p - 1e-12) + 1)


def sign_flip_testable(groups: list[int] | None, alpha: float, n_fractions: int) -> list[bool]:
    """Fractions at which the sign-flip test can find anything. With g groups per half the
    identity flip alone comes up with probability 2^-g, and its max statistic is the observed
    maximum, so no direction clears the (1 - alpha) quantile unless 2^-g < alpha (g >= 5 at
    alpha 0.05): a count of 0 there is by construction, not a measurement. Unknown groups
    (results stored before they were) count as testable."""
    if not groups:
        return [True] * n_fractions
    return [2.0 ** -g < alpha for g in groups]


def rule_growth(n: list[int], r: list[float], rule: str, n_target: int, max_rank: int, *,
                groups: list[int] | None = None, alpha: float = 0.05,
                spread: tuple[float, float] | None = None) -> dict[str, Any]:
    """`fit_growth` of one layer's ranks under `rule`; the rules that count replicated
    directions leave out the fractions whose test could not reject (`sign_flip_testable`),
    which would otherwise read as rank 0 and steepen the growth (a 16-example calibration set:
    [0, 0, 28] extrapolated as linear growth, to max_rank)."""
    keep = list(range(len(n)))
    if rule in REPLICATION_RULES:
        keep = [j for j, ok in enumerate(sign_flip_testable(groups, alpha, len(n))) if ok] or keep
    return fit_growth([n[j] for j in keep], [r[j] for j in keep], n_target, max_rank, spread)


def fit_growth(
    n: list[int],
    r: list[float],
    n_target: int,
    max_rank: int,
    r_range: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """Power law in examples, 1 + r(n) = a n^b, least squares in log-log, anchored at the
    largest n (the best-measured point) and extrapolated to n_target.

    Why 1 + r: a layer can show rank 0 on little data. Why b clipped to [0, 1]: more data does
    not hide a real direction, and a rank cannot grow faster than the data. The interval spans
    the exponents of every pair of fractions (clipped the same way) and `r_range`, the spread
    of the rank measured at the largest n (for the replication rule: A -> B versus B -> A).
    """
    x, y = np.log(np.asarray(n, dtype=np.float64)), np.log1p(np.asarray(r, dtype=np.float64))
    if len(x) >= 2:
        b = float(np.polyfit(x, y, 1)[0])
        slopes = [
            (y[j] - y[i]) / (x[j] - x[i]) for i in range(len(x)) for j in range(i + 1, len(x))
        ]
    else:  # one point: no growth claimed, and none ruled out
        b, slopes = 0.0, [0.0, 1.0]
    b = float(np.clip(b, 0.0, 1.0))
    slopes = [float(np.clip(s, 0.0, 1.0)) for s in slopes]
    r_lo, r_hi = r_range if r_range is not None else (r[-1], r[-1])

    def predict(at_n: float, exponent: float) -> float:
        value = (1.0 + at_n) * (n_target / n[-1]) ** exponent - 1.0
        return float(np.clip(value, 0.0, max_rank))

    point = predict(r[-1], b)
    ends = [predict(at, e) for at in (r_lo, r_hi) for e in (min(slopes), max(slopes))]
    return {
        "model": "1 + r = a * n^b",
        "exponent": b,
        "exponent_range": [min(slopes), max(slopes)],
        "n": [int(v) for v in n],
        "observed": [float(v) for v in r],
        "n_target": int(n_target),
        "rank": point,
        "interval": [min(ends + [point]), max(ends + [point])],
    }
