"""A trained adapter's validation loss at each truncated rank, and a shrunk adapter's against
the original: what `lorank inspect --data` and `lorank shrink --data` report.

The adapter goes onto its base model once, with PEFT. Truncating it to rank k sets each LoRA
layer's factors to the best rank-k approximation of its scaled update
(`adapters.truncated_factors`, the math `shrink` writes), zero-padded under the layer's own
scale, and puts the trained factors back afterwards. Losses are per validation example
(`train.per_example_losses`); "within tolerance" is the project's rule
(`scoring.right_rank`): a rank's mean loss is at most the best rank's plus
max(1% of it, 2 paired standard errors over the examples).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lorank.adapters import (
    CONFIG,
    PREFIX,
    SATURATED_SHARE,
    AdapterLayer,
    layers_table,
    lora_pairs,
    rank_share,
    read_adapter,
    truncated_factors,
)
from lorank.errors import LorankError
from lorank.models import ALIASES, LoadedModel, is_hub_id
from lorank.scoring import REL_TOL, Z, paired_se, right_rank
from lorank.train import per_example_losses
from lorank.util import ticker

ADAPTER = "default"  # PEFT's name for the adapter `from_pretrained` loads
SHRUNK = "shrunk"
TASK_TYPES = {"CAUSAL_LM": "causal", "SEQ_CLS": "classification"}
BATCHES_PER_TICK = 4  # the progress bar advances every this many evaluation batches


def base_model_of(adapter: str | Path, model: str | None = None) -> str:
    """`model` when given, else the adapter's `base_model_name_or_path`: a one-line error when
    the adapter names none, or names a path that is not on this machine."""
    if model is not None:
        return model
    config, _ = read_adapter(adapter)
    source = config.get("base_model_name_or_path")
    if not source:
        raise LorankError(f"{adapter}: {CONFIG} names no base_model_name_or_path; pass --model")
    if source not in ALIASES and not Path(source).exists() and not is_hub_id(source):
        raise LorankError(f"{adapter}: its base model {source} ({CONFIG} "
                          "base_model_name_or_path) is not on this machine; pass --model")
    return str(source)


def truncation_ranks(rank: int) -> list[int]:
    """The candidate ranks of an adapter of rank `rank`: powers of two below it, then itself."""
    return [2**i for i in range(rank.bit_length()) if 2**i < rank] + [rank]


def _lora_modules(model: nn.Module, adapter: str = ADAPTER) -> dict[str, nn.Module]:
    """Module path inside the base model (as the adapter file names it) -> PEFT LoRA layer."""
    out = {}
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict) and adapter in lora_a:
            out[name.removeprefix(PREFIX)] = module
    return out


def attach_adapter(loaded: LoadedModel, adapter: str | Path) -> nn.Module:
    """`loaded.model` with the adapter on it (PEFT, in place, eval mode); one LorankError when
    the adapter does not fit the model: another task, missing modules, other shapes."""
    from peft import PeftModel

    config, weights = read_adapter(adapter)
    task_type = config.get("task_type") or ""
    if TASK_TYPES.get(task_type, loaded.task) != loaded.task:
        raise LorankError(f"{adapter}: a {TASK_TYPES[task_type]} adapter (task_type {task_type})"
                          f", but the data loads {loaded.source} as a {loaded.task} model")
    try:
        model = PeftModel.from_pretrained(loaded.model, str(adapter))
    except (ValueError, RuntimeError, KeyError, TypeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise LorankError(f"{adapter}: does not fit model {loaded.source} ({first})") from None
    expected = {name: (a.shape, b.shape) for name, (_, a, b) in lora_pairs(weights).items()}
    found = {name: (m.lora_A[ADAPTER].weight.shape, m.lora_B[ADAPTER].weight.shape)
             for name, m in _lora_modules(model).items()}
    if found != expected:
        odd = sorted(set(expected) ^ set(found)) or \
            sorted(n for n in expected if expected[n] != found[n])
        raise LorankError(f"{adapter}: does not fit model {loaded.source} (layer {odd[0]} is "
                          "in one and not the other, or differs in shape); pass the --model it "
                          "was trained on")
    return model.eval()


@contextmanager
def truncated(model: nn.Module, rank: int, adapter: str = ADAPTER) -> Iterator[None]:
    """Within the block every LoRA layer of `model` holds the best rank-`rank` approximation
    of its update (a layer of lower rank: all of it, re-factorized); the trained factors are
    put back afterwards, however the block ends."""
    modules = list(_lora_modules(model, adapter).values())
    weights = [(m.lora_A[adapter].weight, m.lora_B[adapter].weight) for m in modules]
    saved = [(a.detach().clone(), b.detach().clone()) for a, b in weights]
    try:
        with torch.no_grad():
            for m, (a, b) in zip(modules, weights, strict=True):
                scale = float(m.scaling[adapter])
                new_b, new_a = truncated_factors(a, b, scale, min(rank, a.shape[0]), scale)
                k = new_a.shape[0]
                a.zero_()
                b.zero_()
                a[:k].copy_(new_a)
                b[:, :k].copy_(new_b)
        yield
    finally:
        with torch.no_grad():
            for (a, b), (a0, b0) in zip(weights, saved, strict=True):
                a.copy_(a0)
                b.copy_(b0)


def _chunks(examples: Sequence[dict], batch_size: int) -> list[list[int]]:
    """Example indices by length, in chunks of BATCHES_PER_TICK batches (one tick each)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    size = batch_size * BATCHES_PER_TICK
    return [order[i:i + size] for i in range(0, len(order), size)]


def _losses(model: nn.Module, examples: Sequence[dict], chunks: list[list[int]], *,
            pad_token_id: int, batch_size: int, tick: Callable[[], None]) -> np.ndarray:
    """`per_example_losses` of every example in the order given, one tick per chunk."""
    out = np.full(len(examples), np.nan)
    for idx in chunks:
        out[idx] = per_example_losses(model, [examples[i] for i in idx], pad_token_id,
                                      batch_size)
        tick()
    return out


@dataclass
class RankLoss:
    """Mean validation loss of the adapter truncated to each candidate rank (the full rank
    last), judged by `scoring.right_rank` over the examples with a finite loss at every rank."""

    ranks: list[int]
    loss: dict[int, float]
    se: dict[int, float]  # paired SE of rank r's losses against the best rank's
    tol: dict[int, float]  # max(1% of the best loss, 2 SE): rank r is within when <= best + tol
    best_rank: int
    smallest_within: int  # the smallest rank within tolerance of the best
    n_examples: int
    n_dropped: int  # examples without a finite loss at some rank (no supervised tokens)
    per_example: dict[int, list[float]]

    @property
    def full_rank(self) -> int:
        return self.ranks[-1]

    @property
    def state(self) -> str:
        """"could be smaller" (a lower truncation is within tolerance), "saturated" (the loss
        still falls at the full rank) or "rank 1" (nothing lower to compare)."""
        if len(self.ranks) == 1:
            return "rank 1"
        return "could be smaller" if self.smallest_within < self.full_rank else "saturated"

    def within(self, rank: int) -> bool:
        return self.loss[rank] <= self.loss[self.best_rank] + self.tol[rank]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("loss", "se", "tol", "per_example"):
            d[key] = {str(r): v for r, v in d[key].items()}
        return d | {"full_rank": self.full_rank, "state": self.state}


def rank_losses(model: nn.Module, examples: Sequence[dict], *, pad_token_id: int,
                batch_size: int = 8, progress: bool = True) -> RankLoss:
    """The validation loss of `model`'s adapter (see `attach_adapter`) truncated to each of
    `truncation_ranks(its rank)`; the adapter is left as it was."""
    top = max(m.lora_A[ADAPTER].weight.shape[0] for m in _lora_modules(model).values())
    ranks = truncation_ranks(int(top))
    chunks = _chunks(examples, batch_size)
    raw = {}
    with ticker("validation loss per truncated rank", len(ranks) * len(chunks),
                enabled=progress) as tick:
        for r in ranks:
            with truncated(model, r):
                raw[r] = _losses(model, examples, chunks, pad_token_id=pad_token_id,
                                 batch_size=batch_size, tick=tick)
    keep = np.all([np.isfinite(v) for v in raw.values()], axis=0)
    if not keep.any():
        raise LorankError("no validation example has a finite loss at every truncated rank")
    right = right_rank({r: v[keep] for r, v in raw.items()})
    return RankLoss(ranks=ranks, loss=right.L, se=right.se, tol=right.tol,
                    best_rank=right.best_rank, smallest_within=right.r_star,
                    n_examples=int(keep.sum()), n_dropped=int((~keep).sum()),
                    per_example={r: v.tolist() for r, v in raw.items()})


def loss_verdict(curve: RankLoss, layers: list[AdapterLayer] | None = None,
                 tol: float = 0.1) -> str:
    """One sentence from the curve: could the adapter be smaller, or is it saturated? `layers`
    (from `inspect_adapter`) add whether its update's energy is spread evenly too."""
    full, k = curve.full_rank, curve.smallest_within
    if curve.state == "rank 1":
        return "rank 1: no lower rank to truncate to"
    if curve.state == "could be smaller":
        return (f"could be smaller: truncated to rank {k} its validation loss stays within "
                f"tolerance ({curve.loss[k]:.4f}; {curve.loss[full]:.4f} at its full rank "
                f"{full}; tolerance {curve.tol[k]:.4f}); `lorank shrink --rank {k}` writes it")
    below = curve.ranks[-2]
    even = layers is not None and rank_share(layers, tol) >= SATURATED_SHARE
    return (f"saturated: the validation loss still falls at its full rank {full} "
            f"({curve.loss[below]:.4f} at rank {below}, {curve.loss[full]:.4f} at {full}, more "
            f"than the tolerance {curve.tol[below]:.4f})"
            + ("; its update's energy is spread evenly too" if even else "")
            + "; a higher rank may fit better")


def loss_change(before: np.ndarray, after: np.ndarray) -> dict[str, Any]:
    """`after` against `before` on the same examples (those finite in both): the mean change,
    its paired SE, and whether it is within tolerance, max(1% of the loss before, 2 SE)."""
    before, after = np.asarray(before, float), np.asarray(after, float)
    keep = np.isfinite(before) & np.isfinite(after)
    if not keep.any():
        raise LorankError("no validation example has a finite loss before and after")
    b, a = before[keep], after[keep]
    se = paired_se(a, b)
    tol = max(REL_TOL * float(b.mean()), Z * se)
    return {"loss_before": float(b.mean()), "loss_after": float(a.mean()),
            "change": float(a.mean() - b.mean()), "se": se, "tol": tol,
            "within_tolerance": bool(a.mean() <= b.mean() + tol),
            "n_examples": int(keep.sum()), "n_dropped": int((~keep).sum())}


def shrunk_loss_change(model: nn.Module, shrunk: str | Path, examples: Sequence[dict], *,
                       pad_token_id: int, batch_size: int = 8, progress: bool = True
                       ) -> dict[str, Any]:
    """`loss_change` from `model`'s adapter (see `attach_adapter`) to the adapter in `shrunk`,
    loaded beside it as PEFT loads it; the original is active again afterwards."""
    model.load_adapter(str(shrunk), adapter_name=SHRUNK)
    chunks = _chunks(examples, batch_size)
    kwargs = {"pad_token_id": pad_token_id, "batch_size": batch_size}
    try:
        with ticker("validation loss, original and shrunk", 2 * len(chunks),
                    enabled=progress) as tick:
            before = _losses(model, examples, chunks, tick=tick, **kwargs)
            model.set_adapter(SHRUNK)
            after = _losses(model, examples, chunks, tick=tick, **kwargs)
    finally:
        model.set_adapter(ADAPTER)
        model.delete_adapter(SHRUNK)
    return loss_change(before, after)


@dataclass
class AdapterReport:
    """What `lorank.api.inspect` returns: rank use per layer from the weights and, with data,
    the validation loss per truncated rank with its verdict."""

    layers: list[AdapterLayer]
    verdict: str  # from the weights alone (`adapters.verdict`)
    losses: RankLoss | None = None
    loss_verdict: str | None = None
    model: str | None = None  # the base model the losses were measured on
    notes: list[str] = field(default_factory=list)  # which data validated

    def to_dict(self) -> dict[str, Any]:
        return {"layers": layers_table(self.layers), "verdict": self.verdict,
                "losses": self.losses.to_dict() if self.losses else None,
                "loss_verdict": self.loss_verdict, "model": self.model, "notes": self.notes}
