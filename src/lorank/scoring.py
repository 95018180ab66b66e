"""The definitions every benchmark result is judged by (DESIGN.md, "The problem, stated so it
can be measured"): the right rank r*, and regret, waste and cost of a recommendation.

Pure numpy so that scoring never depends on the training stack that produced the losses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

REL_TOL = 0.01  # a 1% loss difference is never worth more parameters
Z = 2.0  # "clearly worse" = more than two standard errors


def paired_se(a: np.ndarray, b: np.ndarray) -> float:
    """Standard error of the mean of the per-example differences a - b.

    Both arrays hold losses of the same validation examples in the same order; pairing
    removes the example-to-example spread, which dwarfs the difference between ranks.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_se needs two 1-d arrays of one length, got {a.shape}, {b.shape}")
    if a.size < 2:
        return 0.0
    return float(np.std(a - b, ddof=1) / math.sqrt(a.size))


def seed_se(seed_means: Sequence[float]) -> float:
    """Seed-to-seed SD of a mean loss divided by sqrt(seeds): the seed part of the tolerance
    (0 with one seed)."""
    if len(seed_means) < 2:
        return 0.0
    return float(np.std(seed_means, ddof=1) / math.sqrt(len(seed_means)))


def unpaired_se(a: np.ndarray, b: np.ndarray) -> float:
    """Standard error of mean(a) - mean(b) as if a and b were independent samples.

    Only for comparison: on per-example losses it is several times `paired_se`, and a
    tolerance built from it would call almost any rank right.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(math.sqrt(np.var(a, ddof=1) / a.size + np.var(b, ddof=1) / b.size))


@dataclass
class RightRank:
    """The smallest rank whose validation loss is within tolerance of the best rank's.

    Dict keys are ranks; `to_dict` turns them into strings for JSON and `from_dict` back.
    """

    r_star: int
    best_rank: int
    L_best: float
    L: dict[int, float]  # mean validation loss per rank
    tol: dict[int, float]  # tolerance rank r was judged with
    se: dict[int, float]  # paired SE of rank r vs the best rank
    seed_sd: dict[int, float] | None = None

    @property
    def ranks(self) -> list[int]:
        return sorted(self.L)

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("L", "tol", "se", "seed_sd"):
            if d[key] is not None:
                d[key] = {str(r): v for r, v in sorted(d[key].items())}
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> RightRank:
        def keyed(m: Mapping | None) -> dict[int, float] | None:
            return None if m is None else {int(r): float(v) for r, v in m.items()}

        return cls(
            r_star=int(d["r_star"]),
            best_rank=int(d["best_rank"]),
            L_best=float(d["L_best"]),
            L=keyed(d["L"]),
            tol=keyed(d["tol"]),
            se=keyed(d["se"]),
            seed_sd=keyed(d.get("seed_sd")),
        )


def right_rank(
    per_rank_losses: Mapping[int, np.ndarray],
    seed_spread: Mapping[int, float] | None = None,
    rel_tol: float = REL_TOL,
    z: float = Z,
) -> RightRank:
    """r* from per-example validation losses of the best run at each rank.

    With L(r) the mean loss at rank r, best = argmin_r L(r) (smallest rank on ties),
    SE_r = paired_se(losses[r], losses[best]) and s_r = seed_spread[r] (0 when not given):

        tol_r = max(rel_tol * L_best, z * sqrt(SE_r^2 + s_r^2 + s_best^2))
        r*    = smallest r with L(r) <= L_best + tol_r

    s_r is the seed-to-seed standard deviation of one run's L(r) (pass sd / sqrt(k) if L(r)
    is already a mean over k seeds). Seeds are independent runs, so their variances add to
    the example-sampling variance of the difference. The best rank always qualifies, so r*
    exists and r* <= best.
    """
    if not per_rank_losses:
        raise ValueError("right_rank needs losses for at least one rank")
    losses = {int(r): np.asarray(v, dtype=float) for r, v in per_rank_losses.items()}
    lengths = {v.shape for v in losses.values()}
    if len(lengths) != 1 or next(iter(lengths)) == (0,) or len(next(iter(lengths))) != 1:
        raise ValueError(f"every rank needs the same non-empty 1-d validation set, got {lengths}")
    for r, v in losses.items():
        if not np.all(np.isfinite(v)):
            raise ValueError(f"rank {r} has non-finite losses; drop that rank or fix the run")
    ranks = sorted(losses)
    L = {r: float(losses[r].mean()) for r in ranks}
    best = min(ranks, key=lambda r: (L[r], r))
    sd = {r: float(seed_spread.get(r, 0.0)) for r in ranks} if seed_spread else None
    se, tol = {}, {}
    for r in ranks:
        se[r] = paired_se(losses[r], losses[best])
        seed_var = (sd[r] ** 2 + sd[best] ** 2) if sd and r != best else 0.0
        tol[r] = max(rel_tol * L[best], z * math.sqrt(se[r] ** 2 + seed_var))
    r_star = next(r for r in ranks if L[r] <= L[best] + tol[r])
    return RightRank(r_star=r_star, best_rank=best, L_best=L[best], L=L, tol=tol, se=se, seed_sd=sd)


def interpolate_loss(L: Mapping[int, float], r: float) -> float:
    """L at any rank: exact on the grid, linear in log2(rank) between swept neighbours.

    Outside the swept range the nearest end is used (the curve is taken as flat beyond it),
    which for a rank above the grid assumes the sweep reached the plateau.
    """
    ranks = sorted(L)
    if r in L:
        return float(L[r])
    if r <= ranks[0]:
        return float(L[ranks[0]])
    if r >= ranks[-1]:
        return float(L[ranks[-1]])
    hi = next(k for k in ranks if k > r)
    lo = max(k for k in ranks if k < r)
    w = (math.log2(r) - math.log2(lo)) / (math.log2(hi) - math.log2(lo))
    return float((1 - w) * L[lo] + w * L[hi])


def _L(curve: Mapping[int, float] | RightRank) -> Mapping[int, float]:
    return curve.L if isinstance(curve, RightRank) else curve


def regret(L: Mapping[int, float] | RightRank, r_rec: float) -> float:
    """(L(r_rec) - min_r L(r)) / min_r L(r): quality lost by following the recommendation.

    Off-grid ranks use `interpolate_loss` (linear in log-rank between swept neighbours).
    """
    curve = _L(L)
    L_min = min(curve.values())
    return (interpolate_loss(curve, r_rec) - L_min) / L_min


def _params(params: Mapping[int, float] | Callable[[int], float], r: float) -> float:
    """params(r): called if callable; from a table, interpolated linearly in r.

    LoRA parameters are affine in r (r * sum(d_in + d_out), plus any trained head), so
    linear interpolation, and extrapolation from the two nearest entries, is exact.
    """
    if callable(params):
        return float(params(r))
    if r in params:
        return float(params[r])
    ranks = sorted(params)
    if len(ranks) < 2:
        raise ValueError(f"need params for rank {r} or at least two ranks to interpolate")
    below = [k for k in ranks if k < r]
    above = [k for k in ranks if k > r]
    if below and above:
        lo, hi = below[-1], above[0]
    elif above:
        lo, hi = above[0], above[1]
    else:
        lo, hi = below[-2], below[-1]
    slope = (params[hi] - params[lo]) / (hi - lo)
    return float(params[lo] + slope * (r - lo))


def waste(params: Mapping[int, float] | Callable[[int], float], r_rec: float, r_star: int) -> float:
    """params(r_rec) / params(r*): capacity paid for and not needed (1 = exact; < 1 = too small,
    which shows up as regret instead)."""
    return _params(params, r_rec) / _params(params, r_star)


def cost(steps_spent: float, n_ranks: int, n_lrs: int, steps: int) -> float:
    """Compute spent, in training steps, as a fraction of one seed's full sweep
    (n_ranks x n_lrs runs of `steps` steps). Evaluation-only work should be converted to
    step equivalents by the caller before it is passed in."""
    full = n_ranks * n_lrs * steps
    if full <= 0:
        raise ValueError("the full sweep must have a positive number of steps")
    return steps_spent / full


def score(
    method_name: str,
    r_rec: float,
    right: RightRank,
    params_per_rank: Mapping[int, float] | Callable[[int], float],
    cost_fraction: float,
) -> dict:
    """One benchmark row: how a method's recommendation compares with the sweep's truth.

    `acceptable` says whether L(r_rec) is within the tolerance of the best (tolerance
    interpolated like L for an off-grid rank), i.e. the recommendation loses no measurable
    quality; waste then says how much it overpays.
    """
    L_rec = interpolate_loss(right.L, r_rec)
    tol_rec = interpolate_loss(right.tol, r_rec)
    return {
        "method": method_name,
        "r_rec": r_rec,
        "on_grid": r_rec in right.L,
        "r_star": right.r_star,
        "best_rank": right.best_rank,
        "L_rec": L_rec,
        "L_min": right.L_best,
        "regret": regret(right, r_rec),
        "waste": waste(params_per_rank, r_rec, right.r_star),
        "cost": float(cost_fraction),
        "acceptable": bool(L_rec <= right.L_best + tol_rec),
    }


def score_run(
    method_name: str,
    per_example: np.ndarray,
    trainable_params: float,
    right: RightRank,
    best_per_example: np.ndarray,
    params_per_rank: Mapping[int, float],
    cost_fraction: float,
    seed_sd: float = 0.0,
) -> dict:
    """One benchmark row for a method that trained its own adapter (per-layer ranks).

    Judged like a swept rank: its mean loss against L_best with the same tolerance rule
    (paired SE against the best rank's per-example losses, widened by both seed spreads).
    `r_rec` is its parameter-equivalent global rank, so waste compares parameters directly.
    """
    per_example = np.asarray(per_example, dtype=float)
    L_run = float(np.nanmean(per_example))
    se = paired_se(per_example, best_per_example)
    best_sd = (right.seed_sd or {}).get(right.best_rank, 0.0)
    tol = max(REL_TOL * right.L_best, Z * math.sqrt(se**2 + seed_sd**2 + best_sd**2))
    ranks = sorted(params_per_rank)
    lo, hi = ranks[0], ranks[-1]
    slope = (params_per_rank[hi] - params_per_rank[lo]) / (hi - lo)
    r_eq = lo + (trainable_params - params_per_rank[lo]) / slope
    return {
        "method": method_name,
        "r_rec": round(float(r_eq), 2),
        "on_grid": False,
        "r_star": right.r_star,
        "best_rank": right.best_rank,
        "L_rec": L_run,
        "L_min": right.L_best,
        "regret": (L_run - right.L_best) / right.L_best,
        "waste": float(trainable_params) / _params(params_per_rank, right.r_star),
        "cost": float(cost_fraction),
        "acceptable": bool(L_run <= right.L_best + tol),
    }


def curve_right_rank(curve: dict[int, dict[str, Any]]) -> RightRank:
    """r* of a `rank_loss_curve` by the DESIGN.md rule (paired SE across examples, widened by
    the seed spread of each rank's mean)."""
    losses = {int(r): np.asarray(row["per_example"], float) for r, row in curve.items() if row}
    spread = {int(r): row["seed_sd"] / math.sqrt(max(row["seeds"], 1))
              for r, row in curve.items() if row}
    return right_rank(losses, seed_spread=spread)


# --------------------------------------------------------------------------- how sure r* is

STABLE_SHARE = 0.8  # r* is "stable" when at least this share of resamples give the same r*
MAX_SEEDS = 5  # the settle rule adds seeds at a hinging rank's best lr up to this many


def acceptable_set(right: RightRank) -> list[int]:
    """Every rank within tolerance of the best: where a pick loses no measurable quality."""
    return [r for r in right.ranks if right.L[r] <= right.L_best + right.tol[r]]


def r_star_stability(seed_losses: Mapping[int, list[np.ndarray]], n_resamples: int = 200,
                     seed: int = 0) -> dict[str, Any]:
    """How often r* comes out the same when both noise sources are resampled.

    `seed_losses[r]` holds one per-example loss vector per seed at rank r's best lr. Each
    resample draws the validation examples with replacement (the same draw for every rank:
    the comparison stays paired) and, per rank, its seeds with replacement; r* is then
    recomputed by `right_rank` with the resampled seeds' spread. Returns the share that
    matches the point r*, the distribution of r* over resamples, and `stable` (share >=
    STABLE_SHARE).
    """
    rng = np.random.default_rng(seed)
    ranks = sorted(seed_losses)
    runs = {r: [np.asarray(x, float) for x in seed_losses[r]] for r in ranks}

    def r_star_of(index: np.ndarray | None, picks: dict[int, list[int]] | None) -> int:
        losses, spread = {}, {}
        for r in ranks:
            chosen = [runs[r][i] for i in (picks[r] if picks else range(len(runs[r])))]
            means = [float(np.nanmean(x if index is None else x[index])) for x in chosen]
            per = np.mean(chosen, axis=0)
            losses[r] = per if index is None else per[index]
            spread[r] = seed_se(means)
        return right_rank(losses, seed_spread=spread).r_star

    point = r_star_of(None, None)
    n_examples = len(runs[ranks[0]][0])
    counts: dict[int, int] = {}
    for _ in range(n_resamples):
        index = rng.integers(0, n_examples, n_examples)
        picks = {r: list(rng.integers(0, len(runs[r]), len(runs[r]))) for r in ranks}
        got = r_star_of(index, picks)
        counts[got] = counts.get(got, 0) + 1
    share = counts.get(point, 0) / n_resamples
    return {"r_star": point, "share": share, "stable": share >= STABLE_SHARE,
            "distribution": {str(r): counts[r] / n_resamples for r in sorted(counts)},
            "resamples": n_resamples}


def hinging_ranks(right: RightRank, seeds: Mapping[int, int], z: float = Z
                  ) -> dict[int, str]:
    """Ranks whose verdict (within tolerance or not) could flip within their seed noise, with
    the reason. `right.seed_sd[r]` is the standard error of rank r's seed mean (as
    `curve_right_rank` passes it); `seeds[r]` how many seeds that mean has. A rank hinges when
    its distance to the tolerance line is less than `z` of those standard errors, or less than
    one seed's SD (the spread exceeds the gap it is judged by). With one seed there is no
    measured seed noise: it hinges when it lies within its tolerance's width of the line.
    The best rank and ranks already at MAX_SEEDS are left out (the rule stops there)."""
    out = {}
    for r in right.ranks:
        k = max(int(seeds.get(r, 1)), 1)
        if k >= MAX_SEEDS or r == right.best_rank:
            continue
        margin = right.L_best + right.tol[r] - right.L[r]
        se = (right.seed_sd or {}).get(r, 0.0)
        verdict = "within tolerance" if margin >= 0 else "outside tolerance"
        if k == 1 and abs(margin) < right.tol[r]:
            out[r] = (f"{verdict} by {abs(margin):.4f} with one seed (less than its "
                      f"tolerance {right.tol[r]:.4f})")
        elif k > 1 and (abs(margin) < z * se or se * math.sqrt(k) > abs(margin)):
            out[r] = (f"{verdict} by {abs(margin):.4f}: within {z:g} seed standard errors or "
                      f"one seed SD ({se * math.sqrt(k):.4f}, {k} seeds)")
    return out
