"""Capacity: the rank whose adapter can store what the data has to teach, at the rate short
LoRA runs actually store it.

Bits to learn: for generation, what the base model still pays on the supervised tokens (loss
in bits x tokens); for a classifier, what its frozen features do not already separate (the
cross-fitted loss of a linear head on them, in bits, x examples). An adapter of P parameters
run for the planned number of passes stores about `e x P` bits, where the efficiency `e` (bits
per parameter at r*) is fitted from the benchmark's sweeps by `benchmarks/calibrate_capacity.py`
(interval-scored, leave-one-task-out) and shipped in `capacity_fit.json` with the rows it was
fitted on. The estimate is the smallest candidate rank with `e x P(r) >= bits`.

The full-capacity ceiling (~2 bits per parameter, Allen-Zhu & Li 2024) is kept as a note: short
LoRA runs store about 200x less, so it bounds memorization, not the rank training needs.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorank.data import DataProfile
from lorank.estimators.base import Evidence
from lorank.heads import frozen_head_features
from lorank.planned_run import PlannedRun
from lorank.targets import TargetSet

BITS_PER_PARAM = 2.0  # an adapter's full capacity: the ceiling
CALIBRATION_FILE = Path(__file__).with_name("capacity_fit.json")
HEAD_SAMPLE = 512  # examples whose frozen features fit the cross-fitted linear head
HEAD_L2 = (1e-4, 1e-3, 1e-2, 1e-1)  # ridge strengths tried for that head (best cross-fit wins)


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class Efficiency:
    """Bits stored per adapter parameter at r*: log2 e = `log2_e` + `epochs_slope` x
    log2(epochs / `reference_epochs`)."""

    log2_e: float
    epochs_slope: float = 0.0
    reference_epochs: float = 1.0

    def bits_per_param(self, epochs: float) -> float:
        return 2.0 ** (self.log2_e + self.epochs_slope
                       * math.log2(max(epochs, 1e-9) / self.reference_epochs))


def pick_rank(bits: float, params: dict[int, float], bits_per_param: float) -> int:
    """Smallest rank whose adapter stores `bits` at `bits_per_param` (else the largest)."""
    ranks = sorted(params)
    for r in ranks:
        if params[r] * bits_per_param >= bits:
            return r
    return ranks[-1]


@dataclass
class CalibrationRow:
    """One swept task as the fit sees it: its bits, adapter sizes, acceptable ranks, recipe."""

    task: str
    kind: str  # "generation" | "classification"
    bits: float
    params: dict[int, float]
    acceptable: list[int]
    r_star: int
    epochs: float
    losses: dict[int, float] = field(default_factory=dict)  # best validation loss per rank
    data_hash: str = ""

    def regret(self, rank: int) -> float:
        best = min(self.losses.values())
        return (self.losses[rank] - best) / best if rank in self.losses else float("nan")

    def optimal_log2_e(self) -> float:
        """log2 of the efficiency that puts the pick exactly at r*."""
        return math.log2(self.bits / self.params[self.r_star])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["params"] = {str(r): p for r, p in self.params.items()}
        d["losses"] = {str(r): v for r, v in self.losses.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CalibrationRow:
        return cls(**{**d, "params": {int(r): float(p) for r, p in d["params"].items()},
                      "losses": {int(r): float(v) for r, v in d.get("losses", {}).items()}})


GRID_STEP = 0.01  # log2 units: the efficiency search's resolution
KINDS = ("generation", "classification")


def epochs_slope(rows: list[CalibrationRow]) -> float:
    """d log2 e / d log2 epochs, from tasks that share data and differ only in the run's length
    (a within-dataset contrast: the task's kind and text cancel). 0 when no such pair exists."""
    slopes = []
    by_data: dict[str, list[CalibrationRow]] = {}
    for row in rows:
        if row.data_hash:
            by_data.setdefault(row.data_hash, []).append(row)
    for group in by_data.values():
        group = sorted(group, key=lambda r: r.epochs)
        for a, b in zip(group, group[1:], strict=False):
            if b.epochs > a.epochs * 1.2:
                slopes.append((b.optimal_log2_e() - a.optimal_log2_e())
                              / math.log2(b.epochs / a.epochs))
    return float(np.mean(slopes)) if slopes else 0.0


def fit_efficiency(rows: list[CalibrationRow]) -> Efficiency:
    """The efficiency that makes the most of `rows` pick an acceptable rank, then lands closest
    to r* (summed |log2(pick / r*)|); the middle of the best plateau. The epochs slope comes
    from same-data pairs first (`epochs_slope`), then the level is searched on a 0.01 grid."""
    if not rows:
        raise ValueError("fit_efficiency needs at least one calibration row")
    slope = epochs_slope(rows)
    ref = 1.0
    centre = [r.optimal_log2_e() - slope * math.log2(r.epochs / ref) for r in rows]
    grid = np.arange(math.floor(min(centre)) - 2, math.ceil(max(centre)) + 2, GRID_STEP)
    scores = []
    for a in grid:
        eff = Efficiency(float(a), slope, ref)
        picks = [pick_rank(r.bits, r.params, eff.bits_per_param(r.epochs)) for r in rows]
        hits = sum(p in r.acceptable for p, r in zip(picks, rows, strict=True))
        dist = sum(abs(math.log2(p / r.r_star)) for p, r in zip(picks, rows, strict=True))
        scores.append((hits, -round(dist, 9)))
    best = max(scores)
    plateau = [a for a, s in zip(grid, scores, strict=True) if s == best]
    return Efficiency(round(float(plateau[len(plateau) // 2]), 4), round(slope, 4), ref)


MIN_KIND_TASKS = 2  # a kind of task gets its own efficiency from at least this many tasks


def fit_rows(rows: list[CalibrationRow], kind: str) -> list[CalibrationRow]:
    """The rows a kind's efficiency is fitted on: its own tasks where there are at least
    MIN_KIND_TASKS (bits to learn are counted differently per kind, so their rates differ),
    else the other kinds' (never a fit toward one task)."""
    own = [r for r in rows if r.kind == kind]
    return own if len(own) >= MIN_KIND_TASKS else [r for r in rows if r.kind != kind] or own


def leave_one_task_out(rows: list[CalibrationRow]) -> dict[str, dict[str, Any]]:
    """Each task's pick from the efficiency fitted without it (on the other tasks its kind
    would be fitted on, `fit_rows`): the honest score of the fit."""
    out = {}
    for held in rows:
        others = fit_rows([r for r in rows if r is not held], held.kind)
        if not others:
            continue
        eff = fit_efficiency(others)
        pick = pick_rank(held.bits, held.params, eff.bits_per_param(held.epochs))
        out[held.task] = {"efficiency": asdict(eff), "fitted_on": [r.task for r in others],
                          "pick": pick, "r_star": held.r_star,
                          "regret": held.regret(pick),
                          "waste": held.params[pick] / held.params[held.r_star],
                          "acceptable": pick in held.acceptable,
                          "within_2x": pick in held.acceptable and pick <= 2 * held.r_star}
    return out


def calibrate(rows: list[CalibrationRow]) -> dict[str, Any]:
    """Everything `capacity_fit.json` holds: an efficiency per kind of task (generation,
    classification; a kind with fewer than MIN_KIND_TASKS tasks borrows the others'), the
    leave-one-task-out record, and the rows it was fitted on."""
    loto = leave_one_task_out(rows)
    held = list(loto.values())
    fits = {}
    for kind in KINDS:
        used = fit_rows(rows, kind)
        if used:
            fits[kind] = {"efficiency": asdict(fit_efficiency(used)),
                          "tasks": [r.task for r in used],
                          "borrowed": any(r.kind != kind for r in used)}
    return {
        "model": "log2 e = log2_e + epochs_slope * log2(epochs / reference_epochs); pick = "
                 "smallest rank with e * adapter_params(rank) >= bits to learn",
        "fits": fits,
        "leave_one_task_out": loto,
        "loto_summary": {"tasks": len(held),
                         "within_tolerance": sum(v["acceptable"] for v in held),
                         "within_tolerance_and_2x": sum(v["within_2x"] for v in held),
                         "exact": sum(v["pick"] == v["r_star"] for v in held),
                         "mean_regret": float(np.mean([v["regret"] for v in held])) if held
                         else float("nan"),
                         "mean_waste": float(np.mean([v["waste"] for v in held])) if held
                         else float("nan")},
        "rows": [r.to_dict() for r in rows],
    }


def load_calibration(path: Path = CALIBRATION_FILE) -> dict[str, Any] | None:
    """The shipped fit, or None where none was made (then capacity gives the ceiling only)."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else None


def efficiency_for(calibration: dict[str, Any] | None, kind: str,
                   exclude_task: str | None = None) -> Efficiency | None:
    """The efficiency fitted for this kind of task; with `exclude_task`, the one fitted
    without that task (the benchmark's held-out score; a task the fit never saw gets the
    shipped fit, which is held out for it too)."""
    if calibration is None:
        return None
    if exclude_task is not None:
        loto = calibration.get("leave_one_task_out", {}).get(exclude_task)
        if loto is not None:
            return Efficiency(**loto["efficiency"])
    fit = calibration.get("fits", {}).get(kind)
    return Efficiency(**fit["efficiency"]) if fit else None


def task_kind(task: str) -> str:
    """The calibration's kind for a DataProfile task ("classification" or a generation one)."""
    return "classification" if task == "classification" else "generation"


# --------------------------------------------------------------------------- bits to learn


@torch.no_grad()
def head_sample(examples: list[dict], seed: int = 0, sample: int = HEAD_SAMPLE) -> list[dict]:
    """The seeded sample of examples whose frozen features `frozen_head_bits` reads."""
    return random.Random(seed).sample(examples, min(sample, len(examples)))


def frozen_head_bits(model: torch.nn.Module, examples: list[dict], *, pad_token_id: int,
                     batch_size: int = 8, seed: int = 0, sample: int = HEAD_SAMPLE
                     ) -> dict[str, Any]:
    """Bits per example a classifier's frozen features leave unexplained: a linear head fitted
    on one half of a seeded sample and scored on the other (and back), in bits. What a LoRA
    adapter has to add is what these features do not already separate, not the label entropy.
    """
    picked = head_sample(examples, seed, sample)
    cached = frozen_head_features(model, picked, pad_token_id=pad_token_id,
                                  batch_size=batch_size)
    xs = [c["x"].cpu() for c in cached]
    ys = [c["y"].cpu() for c in cached]
    x, y = torch.cat(xs).double(), torch.cat(ys)
    n_classes = int(getattr(model.config, "num_labels", 0) or int(y.max()) + 1)
    return {"bits_per_example": cross_fitted_bits(x, y, n_classes, seed=seed),
            "examples": len(picked)}


def cross_fitted_bits(x: torch.Tensor, y: torch.Tensor, n_classes: int, *, seed: int = 0
                      ) -> float:
    """Mean held-out cross-entropy (bits) of a ridge-regularized multinomial logistic head,
    two folds, the ridge strength the one that cross-fits best."""
    n = len(y)
    if n < 4:
        return math.log2(max(n_classes, 2))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    folds = (order[: n // 2], order[n // 2:])
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    best = math.inf
    for l2 in HEAD_L2:
        total = 0.0
        for train, test in (folds, folds[::-1]):
            w = _fit_logistic(z[train], y[train], n_classes, l2)
            logits = torch.cat([z[test], torch.ones(len(test), 1, dtype=z.dtype)], 1) @ w
            total += float(torch.nn.functional.cross_entropy(logits, y[test], reduction="sum"))
        best = min(best, total / n / math.log(2))
    return best


def _fit_logistic(z: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float) -> torch.Tensor:
    """Weights (d+1, C) of a multinomial logistic regression, by L-BFGS (deterministic)."""
    zb = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], 1)
    w = torch.zeros(zb.shape[1], n_classes, dtype=z.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(zb @ w, y) + l2 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach()


# --------------------------------------------------------------------------- the evidence


@dataclass
class BitsToLearn:
    bits: float
    source: str
    details: dict[str, Any] = field(default_factory=dict)


def bits_to_learn(profile: DataProfile, head: dict[str, Any] | None = None) -> BitsToLearn:
    """What the adapter has to store, by kind of task (see the module docstring)."""
    if profile.task == "classification":
        if head is not None:
            per = float(head["bits_per_example"])
            return BitsToLearn(per * profile.examples,
                               f"frozen features' cross-fitted head loss {per:.3f} bits/example "
                               f"({head['examples']} sampled) x {profile.examples:,} examples",
                               {"frozen_head_bits_per_example": per,
                                "label_entropy_bits": profile.label_entropy_bits})
        return BitsToLearn(profile.total_bits, "label entropy x examples (no frozen-feature fit: "
                           "an overestimate)")
    return BitsToLearn(profile.total_bits,
                       f"base-model loss {profile.base_loss_bits or 0:.3f} bits/token on "
                       f"{profile.base_loss_sample} sampled examples x "
                       f"{profile.supervised_tokens:,} supervised tokens")


def capacity_evidence(profile: DataProfile, targets: TargetSet, ranks: list[int], *,
                      run: PlannedRun | None = None, head: dict[str, Any] | None = None,
                      calibration: dict[str, Any] | None = None, seconds: float = 0.0,
                      exclude_task: str | None = None) -> Evidence:
    """The calibrated capacity estimate (kind "estimate"), or the full-capacity ceiling
    (kind "ceiling") where no calibration exists."""
    start = time.perf_counter()
    run = run or PlannedRun()
    learn = bits_to_learn(profile, head)
    bits = learn.bits
    adapter = {r: float(targets.params(r) - targets.head_params) for r in ranks}
    epochs = run.epochs_over(profile.examples)
    ceiling = pick_rank(bits, adapter, BITS_PER_PARAM) if bits <= adapter[ranks[-1]] \
        * BITS_PER_PARAM else None
    kind = task_kind(profile.task)
    eff = efficiency_for(calibration, kind, exclude_task)
    details: dict[str, Any] = {"total_bits": bits, "bits_source": learn.source, **learn.details,
                               "epochs": epochs, "ceiling_rank": ceiling,
                               "adapter_params": {str(r): p for r, p in adapter.items()}}
    assumptions = [f"bits to learn = {learn.source}"]
    notes = []
    if eff is None:
        per_rank = {r: "can hold all" if adapter[r] * BITS_PER_PARAM >= bits else
                    f"≤{100 * adapter[r] * BITS_PER_PARAM / bits:.0f}% of data" for r in ranks}
        assumptions.append(f"an adapter stores at most {BITS_PER_PARAM:g} bits per parameter")
        notes.append(f"even rank {ranks[-1]} cannot hold all {bits:,.0f} bits: no ceiling "
                     "below it" if ceiling is None else
                     f"{bits:,.0f} bits to learn fit in rank {ceiling} at full capacity; no "
                     "calibrated efficiency is installed, so this is a loose ceiling only")
        return Evidence(name="capacity", kind="ceiling", suggested_rank=ceiling,
                        interval=(1, ceiling) if ceiling else None, per_rank=per_rank,
                        assumptions=assumptions, notes=notes,
                        details=details | {"bits_per_param": BITS_PER_PARAM},
                        cost_seconds=seconds + time.perf_counter() - start)
    e = eff.bits_per_param(epochs)
    rank = pick_rank(bits, adapter, e)
    spread = _spread(calibration, kind)
    lo_rank = pick_rank(bits, adapter, e * 2 ** spread)
    hi_rank = pick_rank(bits, adapter, e * 2 ** -spread)
    per_rank = {r: _share(adapter[r] * e / bits) for r in ranks}
    assumptions.append(
        f"a planned run of {epochs:.2g} epochs stores {e:.4f} bits per adapter parameter "
        f"(fitted on {len(calibration['fits'][kind]['tasks'])} benchmark tasks; "
        f"{BITS_PER_PARAM:g} would be an adapter's full capacity)")
    if eff.epochs_slope == 0.0:
        notes.append("the calibration has no same-data pair at two run lengths yet, so the "
                     "planned run's length does not move this estimate")
    details.update(efficiency=asdict(eff), bits_per_param=e, spread_log2=spread,
                   calibration_tasks=calibration["fits"][kind]["tasks"],
                   held_out_record=calibration.get("loto_summary"),
                   held_out=exclude_task)
    return Evidence(name="capacity", kind="estimate", suggested_rank=rank,
                    interval=(lo_rank, hi_rank), per_rank=per_rank, assumptions=assumptions,
                    notes=notes, details=details,
                    cost_seconds=seconds + time.perf_counter() - start)


def _share(fraction: float) -> str:
    """What one rank's adapter holds of the bits to learn, as the table shows it."""
    return f"holds {fraction:.0%}" if fraction < 1 else f"holds all ({fraction:.3g}x)"


def _spread(calibration: dict[str, Any], kind: str) -> float:
    """Half the 10-90% range (log2) of the fit's tasks' own r*-efficiencies: how far one
    task's efficiency strays from the fit's."""
    used = set(calibration["fits"][kind]["tasks"])
    rows = [CalibrationRow.from_dict(r) for r in calibration.get("rows", [])
            if r["task"] in used]
    if len(rows) < 2:
        return 1.0
    values = np.array([r.optimal_log2_e() for r in rows])
    return float((np.percentile(values, 90) - np.percentile(values, 10)) / 2)
