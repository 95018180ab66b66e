"""From per-example validation losses at each candidate rank to a decision, shared by both
probes: the decision rule (the smallest rank within tolerance of the best,
`lorank.scoring.right_rank`), the race that scores ranks on growing prefixes of the validation
set and stops those that cannot change the decision, the paired bootstrap of the curve and of
the decision, and the `ProbeResult` both probes return.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from lorank.estimators.base import Evidence
from lorank.scoring import right_rank

# Racing the final curve: prefixes of the validation set at which ranks that cannot change the
# decision stop, how many extra standard errors "clearly" asks for beyond the decision rule's
# tolerance, and the fewest examples a prefix needs before anything is judged on it.
# Replayed on the 24 complete single-lr curves of the five swept tasks (per-example losses in
# sweep.json; benchmarks/race_replay.py), (1/8, 1/4, 1/2) with both stopping rules scores 66%
# of the full curves' pairs ((1/4, 1/2) and clear losers only: 76%); no decision changes.
RACE_FRACTIONS = (0.125, 0.25, 0.5)
RACE_MARGIN_SE = 2.0
RACE_MIN_PREFIX = 16


def smallest_within_tolerance(
    per_example_losses: dict[int, np.ndarray],
    *,
    rel_tol: float = 0.01,
    n_se: float = 2.0,
    extra_sd: float = 0.0,
) -> tuple[int, float, dict[str, Any]]:
    """The smallest rank whose loss is within tolerance of the best rank's (DESIGN.md).

    The rule itself is `lorank.scoring.right_rank` (the one every benchmark result is judged
    by); this wrapper first drops examples that are NaN at any rank so the comparison stays
    paired, and widens the tolerance by `extra_sd` (seed spread, when known) on every rank.
    Returns (rank, tol at that rank, details).
    """
    ranks = sorted(per_example_losses)
    L = np.vstack([np.asarray(per_example_losses[r], dtype=np.float64) for r in ranks])
    keep = np.all(np.isfinite(L), axis=0)
    L = L[:, keep]
    if L.shape[1] == 0:
        raise ValueError("no example has a finite loss at every rank")
    spread = {r: extra_sd / math.sqrt(2) for r in ranks} if extra_sd else None
    right = right_rank({r: L[i] for i, r in enumerate(ranks)}, seed_spread=spread,
                       rel_tol=rel_tol, z=n_se)
    per_rank = {r: {"loss": right.L[r], "diff": right.L[r] - right.L_best,
                    "se_diff": right.se[r], "tol": right.tol[r],
                    "within": bool(right.L[r] <= right.L_best + right.tol[r])} for r in ranks}
    details = {"best_rank": right.best_rank, "min_loss": right.L_best, "n_examples": L.shape[1],
               "n_dropped": int((~keep).sum()), "rel_tol": rel_tol, "n_se": n_se,
               "per_rank": per_rank}
    return right.r_star, float(right.tol[right.r_star]), details


def _bootstrap(
    L: np.ndarray,
    ranks: list[int],
    *,
    n_boot: int,
    seed: int,
    rel_tol: float = 0.01,
    n_se: float = 2.0,
    chunk: int = 100,
    anchor: int = 0,
    gaps: dict[int, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, tuple[float, float]]]:
    """Resample examples (paired across ranks): 95% intervals of each rank's mean loss and the
    rank the decision rule picks in each resample (how sure the decision is).

    `gaps` (ranks raced out on a prefix): per rank, its paired gap to row `anchor` of L on the
    examples it was scored on, NaN elsewhere (length n). In each resample its loss is the
    anchor's mean plus the mean gap over the resampled examples of its prefix, so its interval
    comes from the same resamples as the others' (paired) rather than a normal approximation.
    """
    k, n = L.shape
    rng = np.random.default_rng(seed)
    gaps = gaps or {}
    gap_rows = {r: (np.nan_to_num(g), np.isfinite(g).astype(np.float64)) for r, g in gaps.items()}
    gap_means: dict[int, list[np.ndarray]] = {r: [] for r in gaps}
    pair_d2 = ((L[:, None, :] - L[None, :, :]) ** 2).reshape(k * k, n)  # squared paired diffs
    means_all, picks = [], []
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=m).astype(np.float64)
        means = counts @ L.T / n  # [m, k]
        e_d2 = (counts @ pair_d2.T / n).reshape(m, k, k)
        mean_d = means[:, :, None] - means[:, None, :]
        var = np.clip(e_d2 - mean_d**2, 0.0, None) * (n / max(n - 1, 1))
        best = means.argmin(axis=1)
        rows = np.arange(m)
        se = np.sqrt(var[rows, :, best] / n)  # [m, k]: se of (rank - best)
        min_loss = means[rows, best]
        tol = np.maximum(rel_tol * min_loss[:, None], n_se * se)
        within = means - min_loss[:, None] <= tol
        picks.append(np.asarray(ranks)[within.argmax(axis=1)])
        means_all.append(means)
        for r, (g, w) in gap_rows.items():
            weight = counts @ w
            with np.errstate(invalid="ignore", divide="ignore"):
                gap_means[r].append(means[:, anchor] + (counts @ g) / weight)
    means_all_arr = np.concatenate(means_all)
    lo, hi = np.percentile(means_all_arr, [2.5, 97.5], axis=0)
    raced = {}
    for r, v in gap_means.items():
        v = np.concatenate(v)
        v = v[np.isfinite(v)]
        raced[r] = tuple(float(x) for x in np.percentile(v, [2.5, 97.5])) if len(v) else (
            math.nan, math.nan)
    return lo, hi, np.concatenate(picks), raced


def race_ranks(
    losses_of: Callable[[int, Sequence[dict]], np.ndarray],
    ranks: Sequence[int],
    examples: Sequence[dict],
    *,
    known: dict[int, np.ndarray] | None = None,
    fractions: Sequence[float] = RACE_FRACTIONS,
    rel_tol: float = 0.01,
    n_se: float = 2.0,
    margin_se: float = RACE_MARGIN_SE,
    stop_above_answer: bool = True,
) -> dict[int, np.ndarray]:
    """Score every rank on growing prefixes of `examples`, dropping ranks that can no longer
    change the decision, so a curve of k ranks costs less than k full evaluations.

    After each prefix (of at least `RACE_MIN_PREFIX` examples), two kinds of rank stop:
    - clearly outside: its paired gap to the current best minus `margin_se` standard errors
      still exceeds the decision rule's tolerance (neither the decision nor the best);
    - above a clear answer: a smaller rank (not the best itself) is within tolerance even
      with `margin_se` standard errors added to its gap, so the decision is that rank or a
      smaller one, and the margin absorbs the small shifts of the best's loss still to come.
    The current best and the largest rank are never stopped (the notes on the curve's shape,
    still falling or overfitting, compare against it). Survivors are scored on every example
    (the decision is theirs, paired as before); a dropped rank keeps its prefix's losses.
    `known` holds losses already measured on the first examples (the nested probe's last
    monitoring pass), in the order of `examples`.
    """
    n = len(examples)
    start = min(len(v) for v in known.values()) if known else 0
    got = {r: np.asarray(known[r][:start], np.float64) if known else np.empty(0) for r in ranks}
    cuts = sorted({c for c in (int(round(f * n)) for f in fractions) if start < c < n} | {n})
    alive = list(ranks)
    for cut in cuts:
        if start >= RACE_MIN_PREFIX:  # the decision rule on the prefix, with a margin
            _, _, details = smallest_within_tolerance({r: got[r] for r in alive},
                                                      rel_tol=rel_tol, n_se=n_se)
            per_rank = details["per_rank"]
            best = details["best_rank"]
            clear = [r for r, d in per_rank.items()
                     if r != best and d["diff"] + margin_se * d["se_diff"] <= d["tol"]]
            answer = min(clear, default=math.inf) if stop_above_answer else math.inf
            for r, d in per_rank.items():
                if r in (best, ranks[-1]):  # r_max anchors the curve's shape
                    continue
                if d["diff"] - margin_se * d["se_diff"] > d["tol"] or r > answer:
                    alive.remove(r)
        chunk = examples[start:cut]
        for r in alive:
            got[r] = np.concatenate([got[r], np.asarray(losses_of(r, chunk), np.float64)])
        start = cut
    return got


def raced_survivors(losses: dict[int, Sequence[float]]) -> list[int]:
    """Ranks `race_ranks` scored on every example (the decision is theirs), in rank order."""
    n_full = max(len(v) for v in losses.values())
    return [r for r in sorted(losses) if len(losses[r]) == n_full]


def default_ranks(max_rank: int) -> list[int]:
    """1, 2, 4, ... up to max_rank (max_rank included even if not a power of two)."""
    ranks = [1 << i for i in range(max_rank.bit_length()) if (1 << i) <= max_rank]
    if ranks[-1] != max_rank:
        ranks.append(max_rank)
    return ranks


@dataclass
class ProbeResult:
    """A rank -> loss curve measured by truncating one adapter, and what it suggests."""

    method: str  # "nested" or "svd"
    ranks: list[int]
    max_rank: int
    curve: dict[int, dict[str, float]]  # rank -> loss, se, lo, hi, train_loss, gap
    decision: int | None  # smallest rank within tolerance of the best
    tol: float
    decision_details: dict[str, Any]
    rank_interval: tuple[int, int] | None  # 5th-95th percentile of bootstrap decisions
    rank_distribution: dict[int, float]  # share of bootstrap resamples choosing each rank
    val_losses: dict[int, list[float]]  # per-example val loss per rank (final adapter)
    history: list[dict[str, Any]] = field(default_factory=list)  # per eval point
    steps_done: int = 0
    budget_steps: int = 0
    early_stopped: bool = False
    status: str = "ok"
    wall_seconds: float = 0.0
    eval_seconds: float = 0.0  # of wall_seconds, spent evaluating
    scored: int = 0  # (example, rank) pairs evaluated
    n_val: int = 0
    n_monitor: int = 0
    n_train_eval: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def confidence(self) -> str:
        """From the share of bootstrap resamples that pick the same rank; "low" when the
        curve is unfinished (the answer may lie above r_max) or the probe failed."""
        if self.decision is None or any(n.startswith("unfinished") for n in self.notes):
            return "low"
        share = self.rank_distribution.get(self.decision, 0.0)
        return "high" if share >= 0.8 else "medium" if share >= 0.5 else "low"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("curve", "rank_distribution", "val_losses"):
            d[key] = {str(k): v for k, v in d[key].items()}
        return d

    def to_evidence(self) -> Evidence:
        # names as lorank.decide's trust order knows them
        name = "probe" if self.method == "nested" else "svd-probe"
        per_rank = {r: f"{c['loss']:.4f} ±{c['se']:.4f}" for r, c in self.curve.items()}
        assumptions = [
            "a truncation of one adapter behaves like an independently trained adapter of that rank",
            f"scaling rule: lora_alpha fixed at {self.config.get('lora_alpha')}, "
            + (
                "rsLoRA scale alpha/sqrt(r)"
                if self.config.get("use_rslora", True)
                else "scale alpha/r"
            ),
            "curve measured on the final adapter, not the best checkpoint per rank",
        ]
        if self.method == "nested":
            assumptions.append(
                "truncations share their first components with smaller ones; on planted-rank "
                "tests this put the knee one power-of-two step high (2k for a rank-k truth)"
            )
        else:
            assumptions.append(
                "rank-r truncation = best rank-r approximation of each layer's update"
            )
        return Evidence(
            name=name,
            kind="curve",
            suggested_rank=self.decision,
            interval=self.rank_interval,
            per_rank=per_rank,
            curve=self.curve,
            assumptions=assumptions,
            notes=list(self.notes),
            details={
                "confidence": self.confidence,
                "tol": self.tol,
                "decision": self.decision_details,
                "rank_distribution": self.rank_distribution,
                "history": self.history,
                "steps_done": self.steps_done,
                "budget_steps": self.budget_steps,
                "early_stopped": self.early_stopped,
                "status": self.status,
                "n_val": self.n_val,
                "wall_seconds": self.wall_seconds,
                "eval_seconds": self.eval_seconds,
                "scored": self.scored,
                "n_monitor": self.n_monitor,
                "n_train_eval": self.n_train_eval,
                "config": self.config,
            },
            cost_seconds=self.wall_seconds,
        )


def _summarize(
    method: str,
    ranks: list[int],
    val: dict[int, np.ndarray],
    train: dict[int, np.ndarray] | None,
    *,
    n_boot: int,
    seed: int,
) -> dict[str, Any]:
    """Curve (mean, SE, bootstrap interval, train loss), decision, bootstrap rank spread, notes.

    Ranks raced out early (`race_ranks`: fewer losses than the others) are placed on the
    survivors' scale by their paired gap to the best rank on their prefix (the best's mean
    over all examples plus that gap, SE of the gap): a prefix mean alone is not comparable
    (an easy prefix can sit below the best's full mean); their intervals come from the same
    paired bootstrap resamples (`_bootstrap`'s `gaps`). The decision and its rank spread are
    the survivors'.
    """
    full = raced_survivors({r: val[r] for r in ranks})
    decision, tol, details = smallest_within_tolerance({r: val[r] for r in full})
    best = details["best_rank"]
    L = np.vstack([val[r] for r in full])
    keep = np.all(np.isfinite(L), axis=0)
    # a raced-out rank's paired gap to the best on its prefix; for the bootstrap, padded with
    # NaN past the prefix to the survivors' examples
    prefix_gap = {r: np.asarray(val[r], np.float64) - L[full.index(best), : len(val[r])]
                  for r in ranks if r not in full}
    gaps = {r: np.pad(g, (0, L.shape[1] - len(g)), constant_values=np.nan)[keep]
            for r, g in prefix_gap.items()}
    L = L[:, keep]
    lo, hi, picks, raced_bounds = _bootstrap(L, full, n_boot=n_boot, seed=seed,
                                             anchor=full.index(best), gaps=gaps)
    curve: dict[int, dict[str, float]] = {}
    for r in ranks:
        tr = float(np.nanmean(train[r])) if train is not None and r in train else math.nan
        if r in full:
            v = L[full.index(r)]
            n, mean, se = len(v), float(v.mean()), curve_se(v)
            bounds = lo[full.index(r)], hi[full.index(r)]
        else:  # outside tolerance with margin on its prefix: not a candidate
            gap = prefix_gap[r][np.isfinite(prefix_gap[r])]
            n = len(gap)
            diff = float(gap.mean()) if n else math.nan
            mean = details["min_loss"] + diff
            se_gap = curve_se(gap)
            se = math.hypot(se_gap, curve_se(L[full.index(best)]))
            bounds = raced_bounds[r]
            details["per_rank"][r] = {"loss": mean, "diff": diff, "se_diff": se_gap,
                                      "within": False, "raced_out_after": n}
        curve[r] = {"loss": mean, "se": se, "lo": float(bounds[0]), "hi": float(bounds[1]),
                    "n": n, "train_loss": tr, "gap": mean - tr}
    details["per_rank"] = dict(sorted(details["per_rank"].items()))
    dist = {r: float(np.mean(picks == r)) if r in full else 0.0 for r in ranks}
    interval = (
        int(np.percentile(picks, 5, method="lower")),
        int(np.percentile(picks, 95, method="higher")),
    )

    notes = []
    per = details["per_rank"]
    top = ranks[-1]
    if decision == top and len(ranks) > 1:
        notes.append(
            f"unfinished: loss still falling at r_max={top} (no smaller rank within tolerance); "
            "raise max_rank"
        )
    if best < top and not per[top]["within"]:
        notes.append(
            f"overfitting: validation loss rises from r={best} ({per[best]['loss']:.4f}) "
            f"to r={top} ({per[top]['loss']:.4f})"
        )
    if (
        train is not None
        and math.isfinite(curve[top]["gap"])
        and math.isfinite(curve[decision]["gap"])
    ):
        growth = curve[top]["gap"] - curve[decision]["gap"]
        if growth > tol:
            notes.append(
                f"overfitting: train/validation gap grows by {growth:.4f} from r={decision} "
                f"to r={top}"
            )
    return {
        "curve": curve,
        "decision": decision,
        "tol": tol,
        "decision_details": details,
        "rank_interval": interval,
        "rank_distribution": dist,
        "notes": notes,
        "method": method,
    }


def curve_se(losses: np.ndarray) -> float:
    """Standard error of a mean loss over validation examples (0 for a single example)."""
    n = len(losses)
    return float(losses.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0


def _subsample(examples: Sequence[dict], n: int, seed: int) -> list[dict]:
    if n <= 0:
        return []
    if len(examples) <= n:
        return list(examples)
    idx = np.random.default_rng(seed).choice(len(examples), size=n, replace=False)
    return [examples[i] for i in sorted(idx)]
