"""The loss the analyses differentiate: summed over supervised tokens or examples, not averaged.

Summed, a layer's full-weight gradient G = sum_t d_t x_t^T is the sum of the examples'
contributions, so the gradient of any subset of examples (a half, a chunk, a sign-flip group
of the gradient spectrum) is the sum of its examples' gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def summed_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """SUM of per-token losses over supervised tokens (causal LM) or over examples
    (classification), so that G = sum_t d_t x_t^T is the gradient of the summed loss and
    per-example contributions add up."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return _summed(logits, batch["labels"])


def _summed(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`summed_loss` from the logits."""
    if labels.dim() == 2:  # causal LM: position t predicts token t + 1
        logits, labels = logits[:, :-1], labels[:, 1:]
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            labels.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
    if logits.shape[-1] == 1:  # regression head
        return 0.5 * ((logits.squeeze(-1).float() - labels.float()) ** 2).sum()
    return F.cross_entropy(logits.float(), labels, reduction="sum")
