"""Per-example validation losses, and the evaluator contract the training loop calls.

An evaluator is called at every evaluation point with the model and the step, and returns an
`EvalPoint` (mean loss, per-example losses, whether to stop, a message). The default,
`ValLossEvaluator`, is the model's per-example validation loss as it is; the probes plug their
all-ranks evaluations in instead. Losses are per example, not a token-weighted batch mean,
because the decision rule needs paired errors across examples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lorank.data import IGNORE_INDEX, collate


@dataclass
class EvalPoint:
    """What an evaluator reports at one evaluation step."""

    val_loss: float  # mean over examples of the per-example loss
    per_example: list[float] | None = None
    stop: bool = False  # evaluator asks to stop early (e.g. the probe's decision is stable)
    message: str = ""  # shown in the progress bar


class Evaluator(Protocol):
    """Called at every eval point; the probe plugs its all-ranks evaluation in here.

    Optional methods, used when present: `state_dict() -> dict` / `load_state_dict(dict)`
    (JSON-able, stored in each checkpoint so resume keeps the history) and
    `finalize(model, step)` (once, after training, on the final model).
    """

    def __call__(self, model: nn.Module, step: int) -> EvalPoint: ...


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _accepts_use_cache(model: nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    return config is not None and hasattr(config, "use_cache")


@torch.no_grad()
def per_example_losses(
    model: nn.Module,
    examples: Sequence[dict],
    pad_token_id: int,
    batch_size: int = 8,
) -> np.ndarray:
    """Loss of each example, in the order given (eval mode, no grad).

    Causal LM: mean next-token cross-entropy over the example's supervised tokens (NaN if it
    has none). Classification: cross-entropy of the example's label. Per-example values, not a
    token-weighted batch mean, because the decision rule needs paired errors across examples.
    Batches are formed by length to keep padding small; the model's train/eval mode is restored.
    """
    was_training = model.training
    model.eval()
    device = _model_device(model)
    n = len(examples)
    out = np.full(n, np.nan, dtype=np.float64)
    order = sorted(range(n), key=lambda i: len(examples[i]["input_ids"]))
    extra = {"use_cache": False} if _accepts_use_cache(model) else {}
    try:
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            batch = {
                k: v.to(device)
                for k, v in collate([examples[i] for i in idx], pad_token_id).items()
            }
            labels = batch.pop("labels")
            logits = model(**batch, **extra).logits
            if labels.ndim == 1:  # classification
                losses = F.cross_entropy(logits.float(), labels, reduction="none")
            else:  # causal LM: position t predicts token t+1
                shift_labels = labels[:, 1:]
                mask = shift_labels != IGNORE_INDEX
                rows = mask.nonzero(as_tuple=True)[0]
                ce = F.cross_entropy(
                    logits[:, :-1][mask].float(), shift_labels[mask], reduction="none"
                )
                sums = torch.zeros(len(idx), device=ce.device).index_add_(0, rows, ce)
                counts = mask.sum(dim=1).to(sums.dtype)
                losses = torch.where(counts > 0, sums / counts.clamp(min=1), torch.nan)
            out[idx] = losses.double().cpu().numpy()
    finally:
        model.train(was_training)
    return out


class ValLossEvaluator:
    """Default evaluator: per-example validation loss of the model as it is."""

    def __init__(self, val_examples: Sequence[dict], pad_token_id: int, batch_size: int = 8):
        self.val_examples = val_examples
        self.pad_token_id = pad_token_id
        self.batch_size = batch_size

    def __call__(self, model: nn.Module, step: int) -> EvalPoint:
        losses = per_example_losses(model, self.val_examples, self.pad_token_id, self.batch_size)
        return EvalPoint(val_loss=float(np.nanmean(losses)), per_example=losses.tolist())
