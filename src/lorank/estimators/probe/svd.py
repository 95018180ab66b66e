"""The SVD probe, with no extra training: a plain rank-R adapter whose per-layer update is
truncated by SVD to each candidate rank, so that each truncation is the best rank-r
approximation of the trained update; `SVDCurveEvaluator` reads that curve as a training run's
own evaluation.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from lorank.estimators.probe.curve import (
    ProbeResult,
    _subsample,
    _summarize,
    race_ranks,
    raced_survivors,
)
from lorank.estimators.probe.truncation import NestedLoRA, lora_linear_layers
from lorank.train import EvalPoint, per_example_losses


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
