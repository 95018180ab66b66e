"""Nested-rank probe: the whole rank -> validation-loss curve from ONE training run.

One adapter is trained at `max_rank` R, but each optimizer step uses only its first `b`
components, `b` drawn from the candidate ranks (nested dropout / DyLoRA). Component i is then
trained to be useful together with components < i only, so every truncation r <= R is itself a
usable rank-r adapter, and the probe evaluates all of them at the same point of training.

Mechanics, on top of PEFT's LoRA modules (no fork of the layer code):
  - a forward hook on each `lora_A[adapter]` multiplies its output by
    `[c(b)] * b + [0] * (R - b)` with `c(b) = scale(b) / scale(R)` (= sqrt(R / b) under rsLoRA),
    so a truncated adapter is exactly a rank-b adapter with the same alpha under the scaling
    rule, in training and in evaluation;
  - gradients of the components >= b are then zero, but AdamW would still move them
    (momentum, weight decay), so the inactive slices of `lora_A`/`lora_B` *and of their
    optimizer state* are snapshot before `optimizer.step()` and restored after it: a step at b
    leaves components >= b bitwise untouched.

`svd_truncation_curve` is the no-extra-training variant: a plain rank-R adapter whose per-layer
update is truncated by SVD to each candidate rank.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel, TrainerCallback, TrainerControl, TrainerState

from lorank.estimators.base import Evidence
from lorank.scoring import right_rank
from lorank.train import (
    EvalPoint,
    TrainConfig,
    lora_scale,
    per_example_losses,
    train_lora,
)

# ---------------------------------------------------------------------------- decision rule

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


# ---------------------------------------------------------------------------- nested LoRA


def default_ranks(max_rank: int) -> list[int]:
    """1, 2, 4, ... up to max_rank (max_rank included even if not a power of two)."""
    ranks = [1 << i for i in range(max_rank.bit_length()) if (1 << i) <= max_rank]
    if ranks[-1] != max_rank:
        ranks.append(max_rank)
    return ranks


def lora_linear_layers(model: nn.Module, adapter: str = "default") -> list[tuple[str, nn.Module]]:
    """PEFT LoRA layers whose `lora_A[adapter]` is a plain Linear (the layers we can nest)."""
    layers = []
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, nn.ModuleDict) or adapter not in lora_a:
            continue
        if not isinstance(lora_a[adapter], nn.Linear):
            raise NotImplementedError(f"nested LoRA supports Linear layers only, not {name}")
        if adapter in getattr(module, "lora_variant", {}):
            raise NotImplementedError(
                f"nested LoRA does not support LoRA variants (DoRA...) at {name}"
            )
        layers.append((name, module))
    if not layers:
        raise ValueError("model has no LoRA layers for adapter " + repr(adapter))
    return layers


class NestedLoRA(TrainerCallback):
    """Controls the active truncation rank of every LoRA layer (training and evaluation).

    As a Trainer callback it draws `b` each optimizer step (deterministically from
    (seed, step), so a resumed run draws the same ranks) and keeps the components >= b, and
    their AdamW state, bitwise untouched by that step. `rank = None` means the full adapter.
    `correct_scale=False` applies a plain truncation mask (used by the SVD variant, whose
    factors already carry the scale).
    """

    def __init__(
        self,
        ranks: Sequence[int],
        *,
        lora_alpha: float,
        use_rslora: bool = True,
        seed: int = 0,
        adapter: str = "default",
        freeze_inactive: bool = True,
        correct_scale: bool = True,
    ):
        self.ranks = sorted(int(r) for r in ranks)
        self.lora_alpha = lora_alpha
        self.use_rslora = use_rslora
        self.seed = seed
        self.adapter = adapter
        self.freeze_inactive = freeze_inactive
        self.correct_scale = correct_scale
        self.rank: int | None = None
        self._model: nn.Module | None = None
        self._handles: list[Any] = []
        self._pairs: list[tuple[nn.Parameter, nn.Parameter]] = []  # (A weight, B weight)
        self._masks: dict[tuple[int, int, torch.device, torch.dtype], torch.Tensor] = {}
        self._saved: list[tuple[torch.Tensor, tuple, torch.Tensor, dict[str, torch.Tensor]]] = []
        self._opt_state: dict | None = None

    # -- hooks ------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> NestedLoRA:
        """Install the truncation hooks on `model` (idempotent)."""
        if self._model is model:
            return self
        self.detach()
        for _, module in lora_linear_layers(model, self.adapter):
            lora_a = module.lora_A[self.adapter]
            self._handles.append(lora_a.register_forward_hook(self._hook))
            self._pairs.append((lora_a.weight, module.lora_B[self.adapter].weight))
        self._model = model
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._pairs, self._model = [], [], None

    def factor(self, b: int, full: int) -> float:
        """Multiplier turning the rank-`full` scale into the rank-`b` scale of the rule."""
        if not self.correct_scale:
            return 1.0
        return lora_scale(b, self.lora_alpha, self.use_rslora) / lora_scale(
            full, self.lora_alpha, self.use_rslora
        )

    def _mask(self, full: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        b = min(self.rank, full)
        key = (b, full, device, dtype)
        if key not in self._masks:
            m = torch.zeros(full, dtype=torch.float32)
            m[:b] = self.factor(b, full)
            self._masks[key] = m.to(device=device, dtype=dtype)
        return self._masks[key]

    def _hook(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        if self.rank is None or self.rank >= output.shape[-1]:
            return None  # full adapter: factor(R, R) == 1, nothing to mask
        return output * self._mask(output.shape[-1], output.device, output.dtype)

    @contextmanager
    def truncated(self, rank: int | None) -> Iterator[None]:
        """Evaluate the adapter truncated to `rank` (None: full)."""
        previous, self.rank = self.rank, rank
        try:
            yield
        finally:
            self.rank = previous

    # -- rank schedule ----------------------------------------------------------------------
    def sample_rank(self, step: int) -> int:
        """Uniform over the candidate ranks, a pure function of (seed, step)."""
        rng = np.random.default_rng([self.seed, step])
        return self.ranks[int(rng.integers(len(self.ranks)))]

    # -- Trainer events ---------------------------------------------------------------------
    def on_train_begin(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        self.attach(kwargs["model"])
        return control

    def on_step_begin(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        self.rank = self.sample_rank(state.global_step)
        return control

    def on_pre_optimizer_step(self, args, state, control: TrainerControl, **kwargs):
        self.snapshot(kwargs.get("optimizer"))
        return control

    def on_optimizer_step(self, args, state, control: TrainerControl, **kwargs):
        self.restore()
        return control

    def on_step_end(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        self.rank = None
        return control

    # -- the "untouched" guarantee ----------------------------------------------------------
    def snapshot(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Copy components >= rank of every A (rows) / B (columns) and of their optimizer
        state tensors (exp_avg, exp_avg_sq, ...; state that does not exist yet is restored as
        zeros, i.e. as if the step had never seen those components)."""
        self._saved = []
        b = self.rank
        if not self.freeze_inactive or b is None:
            return
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
        self._opt_state = inner.state if inner is not None else None
        for a_w, b_w in self._pairs:
            if b >= a_w.shape[0]:
                continue
            # A is [R, in]: components are rows; B is [out, R]: components are columns
            for p, sl in ((a_w, (slice(b, None),)), (b_w, (slice(None), slice(b, None)))):
                state = self._opt_state.get(p, {}) if self._opt_state is not None else {}
                st = {
                    k: v[sl].clone()
                    for k, v in state.items()
                    if torch.is_tensor(v) and v.shape == p.shape
                }
                self._saved.append((p, sl, p.detach()[sl].clone(), st))

    @torch.no_grad()
    def restore(self) -> None:
        for p, sl, value, st in self._saved:
            p[sl] = value
            if self._opt_state is None:
                continue
            for k, v in self._opt_state.get(p, {}).items():
                if torch.is_tensor(v) and v.shape == p.shape:
                    v[sl] = st[k] if k in st else 0
        self._saved = []


# ---------------------------------------------------------------------------- results


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


# ---------------------------------------------------------------------------- nested probe


class _ProbeEvaluator:
    """At each eval point: val loss at every truncation rank, decision, early-stop signal."""

    def __init__(
        self,
        nested: NestedLoRA,
        val_examples: Sequence[dict],
        train_subsample: list[dict],
        *,
        monitor_examples: Sequence[dict] | None = None,
        pad_token_id: int,
        batch_size: int,
        early_stop: bool,
        patience: int,
        min_step: int,
    ):
        self.nested = nested
        self.val_examples = val_examples
        # intermediate evaluations only steer early stopping: a fixed subsample does that at a
        # fraction of the cost; the final curve is measured on every validation example
        self.monitor_examples = monitor_examples if monitor_examples else val_examples
        self.train_subsample = train_subsample
        self.pad_token_id = pad_token_id
        self.batch_size = batch_size
        self.early_stop = early_stop
        self.patience = patience
        self.min_step = min_step
        self.history: list[dict[str, Any]] = []
        self.val_losses: dict[int, np.ndarray] = {}
        self.val_step = -1
        self.train_losses: dict[int, np.ndarray] | None = None
        self.early_stopped = False
        self.scored = 0  # (example, rank) pairs evaluated: the probe's evaluation work

    def _losses_at(self, model: nn.Module, rank: int, examples: Sequence[dict]) -> np.ndarray:
        self.scored += len(examples)
        with self.nested.truncated(rank):
            return per_example_losses(model, examples, self.pad_token_id, self.batch_size)

    def _losses(self, model: nn.Module, examples: Sequence[dict]) -> dict[int, np.ndarray]:
        self.nested.attach(model)
        return {r: self._losses_at(model, r, examples) for r in self.nested.ranks}

    def __call__(self, model: nn.Module, step: int) -> EvalPoint:
        self.val_losses = self._losses(model, self.monitor_examples)
        self.val_step = step
        top = self.nested.ranks[-1]
        try:
            decision, tol, _ = smallest_within_tolerance(self.val_losses)
        except ValueError:  # nothing finite: let the trainer's guard mark the run
            return EvalPoint(val_loss=math.nan)
        means = {r: float(np.nanmean(v)) for r, v in self.val_losses.items()}
        self.history.append({"step": step, "loss": means, "decision": decision, "tol": tol})
        recent = [h["decision"] for h in self.history[-self.patience :]]
        stop = (
            self.early_stop
            and step >= self.min_step
            and len(recent) >= self.patience
            and len(set(recent)) == 1
        )
        self.early_stopped = self.early_stopped or stop
        return EvalPoint(
            val_loss=means[top],
            per_example=self.val_losses[top].tolist(),
            stop=stop,
            message=f"r*={decision} (tol {tol:.4f})" + (" stable: stopping" if stop else ""),
        )

    def finalize(self, model: nn.Module, step: int) -> None:
        if self.val_step != step or not self.val_losses:
            self.__call__(model, step)
        if len(self.monitor_examples) < len(self.val_examples):
            # the last monitoring pass is the race's first prefix: the rest is scored only
            # for ranks still in contention
            seen = {id(e) for e in self.monitor_examples}
            ordered = [*self.monitor_examples,
                       *(e for e in self.val_examples if id(e) not in seen)]
            self.nested.attach(model)
            self.val_losses = race_ranks(lambda r, ex: self._losses_at(model, r, ex),
                                         self.nested.ranks, ordered, known=self.val_losses)
        if self.train_subsample:
            self.train_losses = self._losses(model, self.train_subsample)

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": self.history,
            "val_losses": {str(r): v.tolist() for r, v in self.val_losses.items()},
            "val_step": self.val_step,
            "early_stopped": self.early_stopped,
            "scored": self.scored,
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.history = [
            {**h, "loss": {int(r): v for r, v in h["loss"].items()}} for h in d.get("history", [])
        ]
        self.val_losses = {int(r): np.asarray(v) for r, v in d.get("val_losses", {}).items()}
        self.val_step = int(d.get("val_step", -1))
        self.early_stopped = bool(d.get("early_stopped", False))
        self.scored = int(d.get("scored", 0))


EVAL_COST_PER_EXAMPLE = 1 / 3  # a forward pass without gradients, in training-example units


def monitoring_pays(config: TrainConfig, n_ranks: int, n_monitor: int,
                    min_fraction: float) -> bool:
    """Whether early stopping can save more than its monitoring costs: monitoring scores
    n_monitor examples at every rank at each eval point; stopping saves at most the steps after
    min_fraction of the budget. Both in training-example units (an evaluated example costs
    about a third of a trained one)."""
    n_evals = config.steps // max(1, config.eval_every)
    cost = n_evals * n_monitor * n_ranks * EVAL_COST_PER_EXAMPLE
    return cost < (1 - min_fraction) * config.steps * config.batch_size


def nested_probe(
    model_factory: Callable[[], PreTrainedModel],
    train_examples: Sequence[dict],
    val_examples: Sequence[dict],
    *,
    pad_token_id: int,
    config: TrainConfig,
    budget_steps: int | None = None,
    max_rank: int = 64,
    ranks: Sequence[int] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    early_stop: bool = True,
    patience: int = 3,
    min_fraction: float = 0.3,
    n_train_eval: int = 32,
    n_monitor: int = 64,
    progress: bool = True,
    callbacks: Sequence[TrainerCallback] = (),
    rescale: bool = True,
) -> ProbeResult:
    """Train one nested adapter at `max_rank` and measure the validation loss at every rank.

    `config` is the recipe (lr, batch, targets, alpha rule...); its `rank`, `steps` and `seed`
    are replaced by `max_rank`, `budget_steps` (default `config.steps`) and `seed`. Evaluates
    every `config.eval_every` steps; with `early_stop`, stops once the decision has been the
    same for `patience` evaluations in a row, but not before `min_fraction` of the budget
    (early on every truncation is equally untrained and "rank 1" is trivially stable).
    `n_train_eval` training examples are scored per rank at the end (train/val gap).
    Intermediate evaluations (early stopping) score a fixed subsample of `n_monitor`
    validation examples at every rank; the final curve scores all of them. Why: scoring
    every rank is len(ranks) evaluations per eval point, as costly as the training itself on
    small tasks; the subsample keeps the probe within about 1.5x one run.
    With `out_dir`, checkpoints at each eval point; `resume=True` continues from the last.
    `rescale=True` trains and evaluates truncation b at the rule's scale for b (rsLoRA:
    alpha/sqrt(b)); False keeps rank R's scale for every truncation.

    Known bias (tests/test_probe.py, planted rank-k updates of lm_head, k = 2 and 4): the
    truncation at the knee comes out worse than an independent rank-k adapter (k=2: 1.57 vs
    1.36 nats) while the spare components of larger truncations make up for it, so the
    decision lands one power-of-two step high (2k). Leaving the small ranks out of the draw
    removes it (ranks {4, 8} on k=4: rank 4 matched an independent adapter), so it comes from
    sharing the first components with the small truncations; per-truncation gains, SGD instead
    of AdamW, rescale on/off, longer training, draws weighted toward large b (p ~ b) did not
    remove it. Nor did a learned gain per (truncation, component), nor a learned b x b core
    per truncation b (B[:, :b] M_b A[:b]: any rank-b map between the first b components'
    subspaces; k=2: rank 2 at 1.55 nats against 1.37 at rank 4, k=4: rank 4 at 0.81 against
    0.73 at 8; benchmarks/nested_variants.py). So the shared subspaces are off, not their
    scales. The likely reason (not proven here): under cross-entropy the best rank-1 update
    of a rank-2 change need not lie in the span of the best rank-2 one, so the truncations'
    optima are not nested, and the b = 1 draws pull the first component away from the span
    the b = 2 truncation needs. `svd_truncation_curve` on a plain adapter (the default probe)
    found k exactly on the same problems.
    """
    ranks = sorted(set(int(r) for r in ranks)) if ranks else default_ranks(max_rank)
    if ranks[-1] != max_rank:
        if ranks[-1] > max_rank:
            raise ValueError(f"candidate rank {ranks[-1]} exceeds max_rank {max_rank}")
        ranks.append(max_rank)
    steps = int(budget_steps or config.steps)
    cfg = replace(config, rank=max_rank, steps=steps, seed=seed)
    notes = []
    if early_stop and not monitoring_pays(cfg, len(ranks), min(n_monitor, len(val_examples)),
                                          min_fraction):
        # on a short run, scoring every rank at every eval point costs more than stopping
        # early could save: read the curve once, at the end
        early_stop, cfg = False, replace(cfg, eval_every=steps)
        notes.append("early stopping off: monitoring every rank would cost more than the "
                     "training it could save")
    nested = NestedLoRA(
        ranks,
        lora_alpha=cfg.lora_alpha,
        use_rslora=cfg.use_rslora,
        seed=seed,
        correct_scale=rescale,
    )
    evaluator = _ProbeEvaluator(
        nested,
        val_examples,
        _subsample(train_examples, n_train_eval, seed),
        monitor_examples=_subsample(val_examples, n_monitor, seed + 1),
        pad_token_id=pad_token_id,
        batch_size=cfg.eval_batch_size or cfg.batch_size,
        early_stop=early_stop,
        patience=patience,
        min_step=int(math.ceil(min_fraction * steps)),
    )
    result = train_lora(
        model_factory,
        train_examples,
        val_examples,
        cfg,
        pad_token_id=pad_token_id,
        out_dir=out_dir,
        callbacks=[nested, *callbacks],
        resume=resume,
        progress=progress,
        evaluator=evaluator,
        prepare_model=nested.attach,
    )
    nested.detach()
    train_loss_at = {step: tr for step, tr, _ in result.curve}
    for h in evaluator.history:
        h["train_loss"] = train_loss_at.get(h["step"], math.nan)
    base = {
        "method": "nested",
        "ranks": ranks,
        "max_rank": max_rank,
        "history": evaluator.history,
        "steps_done": result.steps_done,
        "budget_steps": steps,
        "early_stopped": evaluator.early_stopped,
        "status": result.status,
        "wall_seconds": result.wall_seconds,
        "eval_seconds": result.eval_seconds,
        "scored": evaluator.scored,
        "n_val": len(val_examples),
        "n_monitor": len(evaluator.monitor_examples),
        "n_train_eval": len(evaluator.train_subsample),
        "config": cfg.to_dict(),
    }
    if not result.ok or not evaluator.val_losses:
        return ProbeResult(
            curve={},
            decision=None,
            tol=math.nan,
            decision_details={},
            rank_interval=None,
            rank_distribution={},
            val_losses={},
            notes=[f"probe failed: {result.status}"],
            **base,
        )
    summary = _summarize(
        "nested", ranks, evaluator.val_losses, evaluator.train_losses, n_boot=n_boot, seed=seed
    )
    summary.pop("method")
    summary["notes"] = notes + summary["notes"]
    return ProbeResult(
        val_losses={r: v.tolist() for r, v in evaluator.val_losses.items()}, **summary, **base
    )


# ---------------------------------------------------------------------------- learning rate


class _StopAt(TrainerCallback):
    """Stop training after `step` steps of a longer schedule (the pilot's first fraction)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


class SaveEvery(TrainerCallback):
    """Checkpoint every `every` steps, between the run's eval points: the SVD probe evaluates
    once, at its last step, and the Trainer saves only at eval points, so without this an
    interrupted probe would have nothing to resume from."""

    def __init__(self, every: int):
        self.every = max(1, int(every))

    def on_step_end(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        if state.global_step % self.every == 0:
            control.should_save = True
        return control


def pilot_rank(ranks: Sequence[int]) -> int:
    """The candidate rank nearest the geometric middle of the range (8 for 1..64)."""
    ranks = sorted(ranks)
    middle = math.sqrt(ranks[0] * ranks[-1])
    return min(ranks, key=lambda r: (abs(math.log(r / middle)), r))


def pick_learning_rate(
    model_factory: Callable[[], PreTrainedModel],
    train_examples: Sequence[dict],
    val_examples: Sequence[dict],
    *,
    pad_token_id: int,
    config: TrainConfig,
    lrs: Sequence[float],
    rank: int,
    fraction: float = 0.25,
    n_val: int = 64,
    seed: int = 0,
    progress: bool = True,
    checkpoint_root: Path | None = None,
    read_at: int | None = None,
) -> dict[str, Any]:
    """Pick the probe's learning rate: the first `fraction` of the recipe's schedule at `rank`
    for each lr, scored on `n_val` validation examples; the lowest loss wins. With `read_at`,
    each run is scored truncated by SVD to that rank: what the SVD probe will read there.

    Why: with rsLoRA the best lr moves with rank on every benchmark task (BENCHMARKS.md, "best
    learning rate per rank"), and a probe reads every rank at one lr. With `checkpoint_root`,
    each lr's run leaves its checkpoint in `checkpoint_root/lr<lr>` and the result names the
    winner's (`checkpoint_dir`): `train_lora(..., out_dir=that, resume=True)` with the same
    config finishes it, so the pilot's winning quarter is not trained twice.
    """
    lrs = sorted(set(float(x) for x in lrs))
    stop = max(1, math.ceil(fraction * config.steps))
    sub = _subsample(val_examples, n_val, seed + 2)
    losses: dict[float, float] = {}
    dirs: dict[float, Path | None] = {}
    t0 = time.time()
    for lr in lrs:
        cfg = replace(config, rank=rank, learning_rate=lr, eval_every=stop, seed=seed)
        dirs[lr] = Path(checkpoint_root) / f"lr{lr:g}" if checkpoint_root is not None else None
        # with read_at, the run's one evaluation is the truncated adapter's loss itself
        evaluator = None if read_at is None else SVDCurveEvaluator(
            [read_at], sub, pad_token_id=pad_token_id,
            batch_size=cfg.eval_batch_size or cfg.batch_size, seed=seed)
        res = train_lora(model_factory, train_examples, sub, cfg, pad_token_id=pad_token_id,
                         callbacks=[_StopAt(stop)], progress=progress, out_dir=dirs[lr],
                         evaluator=evaluator)
        loss = res.final_val_loss
        losses[lr] = loss if res.ok and math.isfinite(loss) else math.inf
    best = min(lrs, key=lambda lr: (losses[lr], lr))
    pilot = {"learning_rate": best, "losses": {f"{lr:g}": v for lr, v in losses.items()},
             "rank": rank, "read_at": read_at or rank, "steps_each": stop,
             "fraction": fraction, "n_val": len(sub), "seconds": round(time.time() - t0, 2)}
    if dirs[best] is not None and math.isfinite(losses[best]):
        pilot["checkpoint_dir"] = str(dirs[best])
    return pilot


# ---------------------------------------------------------------------------- SVD variant


@torch.no_grad()
def _rotate_to_svd_basis(a_w: torch.Tensor, b_w: torch.Tensor) -> None:
    """Rewrite (A, B) in place so that B @ A is unchanged and component i is the i-th singular
    pair of B @ A (B = U sqrt(S), A = sqrt(S) V^T): truncating to r is then the best rank-r
    approximation. Uses QR of the thin factors, never the full out x in matrix."""
    rank = a_w.shape[0]
    qb, rb = torch.linalg.qr(b_w.double())  # out x p, p x R
    qa, ra = torch.linalg.qr(a_w.double().T)  # in x q, q x R
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)  # p x k, k, k x q
    sq = s.sqrt()
    k = s.shape[0]
    new_b = torch.zeros_like(b_w, dtype=torch.float64)
    new_a = torch.zeros_like(a_w, dtype=torch.float64)
    new_b[:, :k] = (qb @ u) * sq
    new_a[:k] = sq[:, None] * (vh @ qa.T)
    assert new_a.shape[0] == rank
    b_w.copy_(new_b.to(b_w.dtype))
    a_w.copy_(new_a.to(a_w.dtype))


def svd_truncation_curve(
    peft_model: nn.Module,
    ranks: Sequence[int],
    val_examples: Sequence[dict],
    *,
    pad_token_id: int,
    train_examples: Sequence[dict] | None = None,
    batch_size: int = 8,
    n_boot: int = 1000,
    seed: int = 0,
    n_train_eval: int = 32,
    adapter: str = "default",
) -> ProbeResult:
    """Rank curve of an already-trained plain rank-R adapter, with no extra training.

    Each layer's update `s_R * B @ A` is truncated by SVD to every candidate rank r. The
    truncated update is what a rank-r adapter trained under the same rule would export as
    (lora_alpha unchanged, factors `B_r = U_r sqrt(S_r) * s_R / s_r`, `A_r = sqrt(S_r) V_r^T`
    so that `s_r * B_r @ A_r` equals the truncation). The model is restored afterwards.
    """
    layers = lora_linear_layers(peft_model, adapter)
    max_rank = max(m.r[adapter] for _, m in layers)
    ranks = sorted({min(int(r), max_rank) for r in ranks})
    module0 = layers[0][1]
    alpha = float(module0.lora_alpha[adapter])
    use_rslora = bool(module0.use_rslora.get(adapter, False))
    saved = [
        (m.lora_A[adapter].weight.detach().clone(), m.lora_B[adapter].weight.detach().clone())
        for _, m in layers
    ]
    nested = NestedLoRA(
        ranks, lora_alpha=alpha, use_rslora=use_rslora, adapter=adapter, correct_scale=False
    )
    t0 = time.time()
    try:
        for _, m in layers:
            _rotate_to_svd_basis(m.lora_A[adapter].weight, m.lora_B[adapter].weight)
        nested.attach(peft_model)

        def losses_of(r: int, examples: Sequence[dict]) -> np.ndarray:
            with nested.truncated(r):
                return per_example_losses(peft_model, examples, pad_token_id, batch_size)

        val = race_ranks(losses_of, ranks, val_examples)
        # training loss only where the decision is made (ranks the race kept): the notes
        # compare the train/validation gap at the decision and at r_max, both among them
        sub = _subsample(train_examples or [], n_train_eval, seed)
        train = {r: losses_of(r, sub) for r in raced_survivors(val)} if sub else None
    finally:
        nested.detach()
        with torch.no_grad():
            for (_, m), (a, b) in zip(layers, saved, strict=True):
                m.lora_A[adapter].weight.copy_(a)
                m.lora_B[adapter].weight.copy_(b)
    summary = _summarize("svd", ranks, val, train, n_boot=n_boot, seed=seed)
    summary.pop("method")
    seconds = time.time() - t0
    return ProbeResult(
        method="svd",
        ranks=ranks,
        max_rank=max_rank,
        val_losses={r: v.tolist() for r, v in val.items()},
        wall_seconds=seconds,
        eval_seconds=seconds,  # all of it: the SVD variant trains nothing
        scored=sum(len(v) for v in val.values()) + sum(len(v) for v in (train or {}).values()),
        n_val=len(val_examples),
        n_train_eval=len(sub),
        config={"lora_alpha": alpha, "use_rslora": use_rslora, "max_rank": max_rank},
        **summary,
    )


class SVDCurveEvaluator:
    """A `train_lora` evaluator that reads the SVD truncation curve at its eval point, so the
    run's own evaluation *is* the probe's curve (no separate pass of every validation example
    at rank R first). The run's reported loss is the last candidate rank's; the full
    `ProbeResult` of the latest eval point is kept in `result`."""

    def __init__(self, ranks: Sequence[int], val_examples: Sequence[dict], *, pad_token_id: int,
                 train_examples: Sequence[dict] | None = None, batch_size: int = 8,
                 n_train_eval: int = 32, seed: int = 0):
        self.ranks = list(ranks)
        self.val_examples = val_examples
        self.kwargs = {"pad_token_id": pad_token_id, "train_examples": train_examples,
                       "batch_size": batch_size, "n_train_eval": n_train_eval, "seed": seed}
        self.result: ProbeResult | None = None

    def __call__(self, model: nn.Module, step: int) -> EvalPoint:
        self.result = svd_truncation_curve(model, self.ranks, self.val_examples, **self.kwargs)
        top = self.result.val_losses[self.result.ranks[-1]]
        return EvalPoint(val_loss=float(np.nanmean(top)), per_example=list(top),
                         message=f"svd curve: r={self.result.decision}")

