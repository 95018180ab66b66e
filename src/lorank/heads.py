"""A sequence classifier's new head, fitted on frozen body features before the body is read.

A randomly initialized head makes the body's gradients mostly noise, so the analyses that read
them (the gradient spectrum, the gradient baselines) first fit the head alone: Adam over the
head's inputs cached from a frozen forward, every other parameter left as it was. The head is
found by its conventional name only; a per-token head (`score`) is fitted at the last attended
token, where the model pools.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorank.data import collate

HEAD_STEPS, HEAD_LR = 200, 1e-2  # Adam on a classifier's new head, on frozen features


def find_classification_head(model: nn.Module) -> tuple[str, nn.Module]:
    """The newly initialized head of a sequence-classification model, by its conventional
    name: `classifier` (BERT, RoBERTa, DeBERTa), `score` (Llama, Qwen, Mistral, GPT-2) or
    `classification_head` (BART, T5). By name only: a loose guess could train the body."""
    for name in ("classifier", "score", "classification_head"):
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            return name, module
    raise ValueError(
        "no classification head found (looked for 'classifier', 'score', 'classification_head')"
    )


def fit_head_on_frozen_features(
    model: nn.Module,
    examples: list[dict],
    *,
    pad_token_id: int,
    steps: int = HEAD_STEPS,
    lr: float = HEAD_LR,
    batch_size: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """Train only the classification head on frozen body features (DESIGN.md point 1).

    Why: a randomly initialized head makes body gradients mostly noise; the rank the body needs
    is the one it sees once the head is sensible, as it is a few steps into fine-tuning.
    The body runs once: the head's inputs are cached (for per-token heads like `score`, at the
    last attended token, which is where Llama-style models pool with right padding), then the
    head alone is trained with Adam, full batch when the cached features are vectors.
    The body's pass takes the examples in length order, as the gradient passes do: batches of
    similar lengths carry little padding (MiniLM, 256 examples: 4,080 padded tokens against
    6,976 in the given order, 1.3 s against 2.0 s), and each batch caches its own labels, so
    features and labels stay paired. Modifies the head in place; returns the loss before and
    after. (`gradient_spectrum(fit_head=True)` fits the same way from its own passes.)
    """
    if not examples or not isinstance(examples[0]["labels"], int):
        raise ValueError("fit_head_on_frozen_features needs classification examples (int labels)")
    name, head = find_classification_head(model)
    cached = frozen_head_features(model, examples, pad_token_id=pad_token_id,
                                  batch_size=batch_size)
    return {"head": name, **train_head(model, head, cached, steps=steps, lr=lr, seed=seed)}


@torch.no_grad()
def frozen_head_features(model: nn.Module, examples: list[dict], *, pad_token_id: int,
                         batch_size: int = 8) -> list[dict[str, torch.Tensor]]:
    """The classification head's inputs on frozen features, one {"x", "y"} per batch: the body
    runs once, without gradients, over the examples in length order (little padding), and
    each batch keeps its own labels so features and labels stay paired."""
    examples = sorted(examples, key=lambda e: len(e["input_ids"]))  # stable: deterministic
    _, head = find_classification_head(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    cached: list[dict[str, torch.Tensor]] = []
    seen: dict[str, Any] = {}
    handle = head.register_forward_hook(_head_input_hook(seen))
    try:
        for b in range(0, len(examples), batch_size):
            batch = {k: v.to(device)
                     for k, v in collate(examples[b:b + batch_size], pad_token_id).items()}
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            cached.append(_head_features(seen, batch))
    finally:
        handle.remove()
        model.train(was_training)
    return cached


def _head_input_hook(seen: dict[str, Any]):
    """A forward hook that keeps the head's input (as it is: with its graph, if any) and
    whether the head gives one vector per example."""

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        seen["x"], seen["per_token"] = inputs[0], output.dim() == 3

    return hook


def _head_features(seen: dict[str, Any], batch: dict[str, torch.Tensor]
                   ) -> dict[str, torch.Tensor]:
    """The batch's features for fitting the head, detached, paired with its labels: a
    per-token head's input at the last attended token, where the model pools."""
    feats = seen.pop("x").detach()
    if seen["per_token"]:
        last = batch["attention_mask"].sum(1) - 1
        feats = feats[torch.arange(feats.shape[0], device=feats.device), last]
    return {"x": feats.float(), "y": batch["labels"]}


def train_head(model: nn.Module, head: nn.Module, cached: list[dict[str, torch.Tensor]], *,
               steps: int = HEAD_STEPS, lr: float = HEAD_LR, seed: int = 0) -> dict[str, Any]:
    """Adam on the head alone over cached (features, labels): full batch when the features
    are vectors, else a seeded random cached batch per step. Every other parameter is frozen
    for the fit and left as it was (requires_grad flags restored, no .grad kept)."""
    vectors = all(c["x"].dim() == 2 for c in cached)
    if vectors:
        cached = [
            {"x": torch.cat([c["x"] for c in cached]), "y": torch.cat([c["y"] for c in cached])}
        ]
    n_examples = sum(len(c["y"]) for c in cached)
    head_dtype = next(head.parameters()).dtype

    def loss_of(c: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(head(c["x"].to(head_dtype)).float(), c["y"])

    def mean_loss() -> float:
        with torch.no_grad():
            return float(sum(loss_of(c) * len(c["y"]) for c in cached) / n_examples)

    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    for p in head.parameters():
        p.requires_grad_(True)
    was_training = head.training
    head.eval()  # a head with its own dropout (RoBERTa's) fits as the analysis reads it
    before = mean_loss()
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    try:
        with torch.enable_grad():
            for _ in range(steps):
                c = (
                    cached[0]
                    if vectors
                    else cached[int(torch.randint(len(cached), (1,), generator=order))]
                )
                opt.zero_grad(set_to_none=True)
                loss_of(c).backward()
                opt.step()
        after = mean_loss()
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
            p.grad = None
        head.train(was_training)
    return {
        "loss_before": before,
        "loss_after": after,
        "steps": steps,
        "n_examples": n_examples,
        "full_batch": vectors,
    }
