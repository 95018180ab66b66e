"""Decide: weigh all Evidence into one Recommendation with confidence, reasons and warnings.

Trust order: a measured rank–loss curve (sweep, then probe) decides; a data estimate (gradient
spectrum) decides when no curve exists; a ceiling (capacity) never overrides them (a rank
above it is noted, an estimate far above it gets low confidence: the benchmark's ceilings sit
below r* on most tasks), and alone gives the rank that would hold all the data's bits, with
low confidence.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from lorank.estimators.base import Evidence
from lorank.targets import CANDIDATE_RANKS, TargetSet, adapter_bytes, memory_estimate

DEFAULT_ALPHA = 8.0  # = lorank.train.DEFAULT_ALPHA; rsLoRA scale alpha / sqrt(r), fixed alpha
DEFAULT_RSLORA = True
CURVE_TRUST = ("sweep", "probe", "svd-probe")
# a data estimate calibrated on the benchmark's sweeps before one that is not
ESTIMATE_TRUST = ("capacity", "gradient")


@dataclass
class Recommendation:
    rank: int
    lora_alpha: float
    use_rslora: bool
    target_modules: list[str]
    modules_to_save: list[str]
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    trainable_params: int
    adapter_bytes: int
    memory: dict[str, int]
    confidence: str
    evidence: list[dict[str, Any]]
    rationale: list[str]
    warnings: list[str]
    candidates: list[dict[str, Any]]
    inputs: dict[str, Any] = field(default_factory=dict)
    task_type: str = "CAUSAL_LM"
    # the evidence whose rank (unless --rank forced one) and confidence were taken; "" if none
    decided_by: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def candidate_ranks(targets: TargetSet, max_candidate: int = 256) -> list[int]:
    ranks = [r for r in CANDIDATE_RANKS if r <= min(max_candidate, targets.max_rank)]
    return ranks or [1]


def snap_up(rank: float, ranks: list[int]) -> int:
    """Smallest candidate rank >= `rank` (the largest candidate if none is)."""
    for r in ranks:
        if r >= rank:
            return r
    return ranks[-1]


def decide(evidence: list[Evidence], targets: TargetSet, *, ranks: list[int] | None = None,
           task: str = "causal", batch_size: int = 8, seq_len: int = 512,
           lora_alpha: float | None = None, use_rslora: bool | None = None,
           inputs: dict[str, Any] | None = None, forced_rank: int | None = None
           ) -> Recommendation:
    """Turn the estimators' Evidence into one Recommendation (see module docstring).

    `lora_alpha` / `use_rslora` left None take the scaling rule of the curve that decides
    (a rank measured under one rule is only right under that rule, DESIGN.md), else lorank's
    default (alpha 8, rsLoRA). `forced_rank` (the user's `--rank`) replaces the evidence's
    rank and any per-layer pattern; warnings and costs are then about the forced rank.
    """
    ranks = ranks or candidate_ranks(targets)
    rationale: list[str] = []
    warnings: list[str] = []
    far_above = False  # an estimate more than 4x above the capacity ceiling
    by_kind = {k: [e for e in evidence if e.kind == k and e.suggested_rank is not None]
               for k in ("curve", "estimate", "ceiling")}
    ceiling = min((e.suggested_rank for e in by_kind["ceiling"]), default=None)
    curves = sorted(by_kind["curve"], key=lambda e: _trust(e.name))
    pattern: dict[str, int] = {}
    decided_by = ""

    if curves:
        chosen = curves[0]
        decided_by = chosen.name
        measured = {int(r) for r in chosen.curve}
        # a rank the curve measured is taken as is (a probe at --probe-rank 6 that picks 6 must
        # not become an unmeasured 8); only a rank it did not measure snaps to a candidate
        rank = chosen.suggested_rank if chosen.suggested_rank in measured \
            and chosen.suggested_rank <= targets.max_rank else snap_up(chosen.suggested_rank, ranks)
        confidence = chosen.details.get("confidence", "medium")
        rationale.append(f"{chosen.name}: smallest rank within tolerance of the best measured "
                         f"loss is {chosen.suggested_rank}")
        shape, message = curve_shape(chosen.curve, rule_tolerance(chosen))
        rationale.append(message)
        if shape in ("still falling", "noisy"):
            confidence = "low"
        if shape == "still falling":
            warnings.append(message)
        rationale += [n for n in chosen.notes if n not in rationale]
        for other in curves[1:]:  # a probe beside a sweep: the independent runs decide
            if other.suggested_rank != chosen.suggested_rank:
                warnings.append(
                    f"{other.name} says rank {other.suggested_rank}, {chosen.name} says "
                    f"{chosen.suggested_rank}: trusting {chosen.name}, "
                    + ("whose curve comes from independent runs at each rank; a one-run "
                       "probe's truncations can sit above them" if chosen.name == "sweep"
                       else "the more direct measurement of the two"))
        for other in by_kind["estimate"]:
            if _disagree(other.suggested_rank, chosen.suggested_rank):
                warnings.append(
                    f"{other.name} says rank {other.suggested_rank}, {chosen.name} says "
                    f"{chosen.suggested_rank}: trusting {chosen.name}, which measures the "
                    "validation loss itself; the other reads the data before training")
    elif by_kind["estimate"]:
        estimates = sorted(by_kind["estimate"], key=lambda e: _trust(e.name, ESTIMATE_TRUST))
        chosen = estimates[0]
        decided_by = chosen.name
        rank = snap_up(chosen.suggested_rank, ranks)
        lo, hi = chosen.interval or (rank, rank)
        if chosen.name == "capacity":
            confidence, reason = calibrated_confidence(chosen.details.get("held_out_record"))
            rationale.append(f"capacity: the data holds about {chosen.details['total_bits']:,.0f} "
                             f"bits to learn; at the {chosen.details['bits_per_param']:.4f} bits "
                             f"per parameter the benchmark's runs store, rank {rank} holds them "
                             f"(range {lo}–{hi})")
            rationale.append(reason)
        else:
            pattern = dict(chosen.rank_pattern)
            confidence = "medium" if hi <= 4 * max(lo, 1) else "low"
            capped = any("reach max_rank" in n for n in chosen.notes)
            far_above = ceiling is not None and rank > 4 * ceiling
            if capped or far_above:
                confidence = "low"  # an estimate at its own limit, or far above the ceiling
            rationale.append(f"{chosen.name}: the data asks for about {chosen.suggested_rank} "
                             f"directions (range {lo}–{hi}); rounded up to rank {rank}")
        rationale += [n for n in chosen.notes if n not in rationale]
        for other in estimates[1:]:
            rationale.append(
                f"{other.name} says rank {other.suggested_rank}: reported, not used for the "
                f"rank ({chosen.name} is calibrated on the benchmark's sweeps, "
                f"{other.name} is not)" + ("; its per-layer ranks are in its evidence, and no "
                                           "rank_pattern is written: on the benchmark no "
                                           "per-layer pattern beat the uniform rank of equal "
                                           "parameters" if other.rank_pattern
                                           else ""))
    elif ceiling is not None:
        rank = snap_up(ceiling, ranks)
        decided_by = next(e.name for e in by_kind["ceiling"] if e.suggested_rank == ceiling)
        confidence = "low"
        rationale.append(
            f"only a capacity ceiling is measured: rank {rank} would hold every bit this data "
            "has to teach at an adapter's full capacity, a loose bound (short LoRA runs store "
            "far less per parameter, so the right rank can be higher); the evidence says "
            "nothing finer (add the gradient spectrum or a probe)")
    else:
        rank = snap_up(16, ranks)
        confidence = "low"
        rationale.append("no estimator gave a rank: falling back to the common default 16")
        warnings.append("no evidence about this dataset: the rank is folklore, not measured")

    if forced_rank is not None:
        if forced_rank != rank:
            rationale.insert(0, f"rank {forced_rank} forced by the user (evidence suggested "
                                f"{rank})")
        rank, pattern = forced_rank, {}
    if ceiling is not None and rank > ceiling and (curves or by_kind["estimate"]):
        # a note, not a warning: the benchmark's r* sits above this ceiling on most tasks
        rationale.append(
            f"rank {rank} is above the capacity ceiling {ceiling}, a loose bound (every bit "
            "to learn stored at an adapter's full capacity, which short LoRA runs do not "
            "reach); not used to cap the rank"
            + ("; an estimate more than 4x above it is given low confidence"
               if far_above and forced_rank is None else ""))
    for e in evidence:
        if e.kind == "ceiling":
            rationale += [n for n in e.notes if n not in rationale]

    rule = scaling_rule(curves[0]) if curves else None
    if rule is not None and (lora_alpha is None or use_rslora is None):
        scale = "rsLoRA, scale alpha/sqrt(r)" if rule[1] else "scale alpha/r"
        rationale.append(f"lora_alpha {rule[0]:g} ({scale}): the scaling rule the "
                         f"{curves[0].name} measured the rank under")
    rule = rule or (DEFAULT_ALPHA, DEFAULT_RSLORA)
    lora_alpha = rule[0] if lora_alpha is None else lora_alpha
    use_rslora = rule[1] if use_rslora is None else use_rslora
    if pattern:
        pattern = {k: max(1, min(v, targets.max_rank)) for k, v in pattern.items() if v != rank}
        params = targets.params_pattern(rank, pattern)
    else:
        params = targets.params(rank)
    memory = memory_estimate(targets, rank, batch_size=batch_size, seq_len=seq_len).to_dict()
    candidates = []
    for r in ranks:
        candidates.append({
            "rank": r, "params": targets.params(r), "adapter_bytes": adapter_bytes(targets, r),
            "memory_total": memory_estimate(targets, r, batch_size=batch_size,
                                            seq_len=seq_len).total,
            "says": {e.name: e.per_rank.get(r, "") for e in evidence},
        })
    return Recommendation(
        rank=rank, lora_alpha=lora_alpha, use_rslora=use_rslora,
        target_modules=targets.peft_target_modules, modules_to_save=targets.modules_to_save,
        # no alpha_pattern: with one fixed alpha the scale rule (alpha/sqrt(r) under rsLoRA)
        # already gives each rank_pattern layer the scale of its own rank
        rank_pattern=pattern, alpha_pattern={}, trainable_params=params,
        adapter_bytes=4 * params, memory=memory, confidence=confidence,
        evidence=[e.to_dict() for e in evidence], rationale=rationale, warnings=warnings,
        candidates=candidates, inputs=inputs or {},
        task_type="SEQ_CLS" if task == "classification" else "CAUSAL_LM",
        decided_by=decided_by,
    )


def scaling_rule(e: Evidence) -> tuple[float, bool] | None:
    """(lora_alpha, use_rslora) the evidence's runs were trained with, if it says: the probe's
    `details["config"]`, a sweep's recipe in `details["recipe"]`."""
    for key in ("config", "recipe"):
        cfg = e.details.get(key) or {}
        if cfg.get("lora_alpha") is not None:
            return float(cfg["lora_alpha"]), bool(cfg.get("use_rslora", DEFAULT_RSLORA))
    return None


def rule_tolerance(e: Evidence) -> dict[int, float] | None:
    """Per-rank tolerance the rank rule judged the curve with (paired SE, from per-example
    losses): a sweep's `details["truth"]`, a probe's `details["decision"]`. None if absent."""
    truth = (e.details.get("truth") or {}).get("tol")
    if truth:
        return {int(r): float(t) for r, t in truth.items()}
    per_rank = (e.details.get("decision") or {}).get("per_rank") or {}
    tol = {int(r): float(p["tol"]) for r, p in per_rank.items() if "tol" in p}
    return tol or None


def curve_shape(curve: dict[int, dict[str, float]],
                rule_tol: dict[int, float] | None = None) -> tuple[str, str]:
    """Name the shape of a rank–loss curve and say what it means for the user.

    With L the losses, best = argmin, tol per rank = `rule_tol` (the rank rule's own, paired
    SE: the shape then never says "flat" while the rule picks a larger rank) or, for ranks it
    lacks, max(1% of L_best, 2 * se) with the curve's unpaired se:
      - "flat": every rank within tol of the best -> any rank works, take the smallest;
      - "still falling": the best is the largest rank and the one below is worse by more than
        tol -> the curve has not flattened: raise the maximum rank;
      - "rising": the largest rank is worse than the best by more than tol -> overfitting:
        fewer ranks, more data or regularization;
      - "noisy": the direction of the curve changes more than once by more than tol;
      - "knee": falls, then flattens within tol.
    """
    ranks = sorted(curve)
    L = {r: float(curve[r]["loss"]) for r in ranks}
    best = min(ranks, key=lambda r: (L[r], r))
    rule_tol = rule_tol or {}
    tol = {r: rule_tol[r] if r in rule_tol else
           max(0.01 * L[best], 2 * float(curve[r].get("se", 0.0))) for r in ranks}
    if len(ranks) == 1:
        return "single", f"only rank {ranks[0]} was measured"
    if all(L[r] <= L[best] + tol[r] for r in ranks):
        return "flat", (f"the curve is flat: every rank from {ranks[0]} is within tolerance of "
                        f"the best; the smallest is enough")
    steps = [L[b] - L[a] for a, b in zip(ranks, ranks[1:], strict=False)]
    big = [d for d, b in zip(steps, ranks[1:], strict=False) if abs(d) > tol[b]]
    turns = sum(1 for a, b in zip(big, big[1:], strict=False) if (a > 0) != (b > 0))
    if turns > 1:
        return "noisy", ("the curve zig-zags by more than its tolerance: the pick is uncertain; "
                         "more validation examples or seeds would settle it")
    top, below = ranks[-1], ranks[-2]
    if best == top and L[below] > L[top] + tol[below]:
        return "still falling", (f"the loss is still falling at rank {top}: raise the maximum "
                                 "rank and measure again")
    if best != top and L[top] > L[best] + tol[top]:
        return "rising", (f"the validation loss rises above rank {best} (overfitting): use "
                          "fewer ranks, more data or regularization")
    return "knee", f"the curve falls and flattens at rank {best} or below"


def _disagree(a: int | None, b: int | None) -> bool:
    """More than a factor 4 apart (two powers of two)."""
    return a is not None and b is not None and max(a, b) > 4 * max(min(a, b), 1)


def _trust(name: str, order: tuple[str, ...] = CURVE_TRUST) -> int:
    return order.index(name) if name in order else len(order)


CONFIDENCE_LEVELS = ((0.8, "high"), (0.5, "medium"), (0.0, "low"))


def calibrated_confidence(record: dict[str, Any] | None) -> tuple[str, str]:
    """Confidence from a measured hit rate: the share of benchmark tasks on which the same
    estimator, fitted without the task, picked a rank within tolerance and at most 2x r*
    (>= 80%: high, >= 50%: medium, else low), and the sentence that says so."""
    if not record or not record.get("tasks"):
        return "low", "no held-out record for this estimate: confidence low"
    n, hits = int(record["tasks"]), int(record["within_tolerance_and_2x"])
    level = next(name for floor, name in CONFIDENCE_LEVELS if hits / n >= floor)
    return level, (
        f"confidence {level}: fitted without the task it was judged on, this estimate picked a "
        f"rank within tolerance and at most 2x r* on {hits} of {n} benchmark tasks "
        f"(within tolerance on {record['within_tolerance']}; mean regret "
        f"{record.get('mean_regret', float('nan')):.1%}, mean waste "
        f"{record.get('mean_waste', float('nan')):.1f}x)")


