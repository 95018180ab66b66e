"""RankCallback: watch a LoRA adapter's rank use during the user's own `transformers` training.

Every `every` steps it reads each LoRA layer's update `B A` (from the factors, by two small
QRs: O(r^2 (d_in + d_out)) a layer, never the full matrix), and reports its effective rank
(Roy & Vetterli 2007: exp of the entropy of the normalized singular values) through the
Trainer's own logging, so every logger the run uses (console, TensorBoard, W&B) gets
`lorank/effective_rank_mean`, `lorank/effective_rank_max`, `lorank/rank_use` (mean effective
rank over the adapter's rank) and `lorank/saturated_layers`. Once most layers use nearly all
of their rank (effective rank >= `saturation` x r) past half of the run's steps, it warns once
that a higher rank may fit better. Early in training even a rank the data cannot fill reads as
fully used (Adam moves B along every direction of a random A), so the warning waits.

    trainer = Trainer(model=peft_model, args=args, train_dataset=ds)
    RankCallback.attach(trainer)  # first in line, so every logger sees its numbers
    trainer.train()
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from transformers import TrainerCallback


@dataclass
class LayerRank:
    name: str
    rank: int
    effective: float
    singular_values: list[float]


def lora_factors(model: torch.nn.Module, adapter: str = "default"
                 ) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, A, B) for every PEFT LoRA layer of `model` with this adapter."""
    out = []
    for name, module in model.named_modules():
        a, b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if isinstance(a, torch.nn.ModuleDict) and adapter in a and adapter in b:
            out.append((name, a[adapter].weight, b[adapter].weight))
    return out


@torch.no_grad()
def update_svd(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype = torch.float32
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, V of B @ A (B: d_out x r, A: r x d_in; B A = U diag(S) V^T) from the factors:
    B = Qb Rb, A^T = Qa Ra, then the r x r SVD of Rb Ra^T."""
    qb, rb = torch.linalg.qr(b.detach().to(dtype))
    qa, ra = torch.linalg.qr(a.detach().to(dtype).T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    return qb @ u, s, qa @ vh.T


@torch.no_grad()
def update_singular_values(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Singular values of B @ A from the factors alone."""
    return update_svd(a, b)[1]


def effective_rank(s: torch.Tensor) -> float:
    """exp(entropy of s / sum(s)); 0 for an all-zero update (B starts at zero)."""
    total = float(s.sum())
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(math.exp(-(p * p.log()).sum()))


def adapter_ranks(model: torch.nn.Module, adapter: str = "default") -> list[LayerRank]:
    out = []
    for name, a, b in lora_factors(model, adapter):
        s = update_singular_values(a, b)
        out.append(LayerRank(name, int(a.shape[0]), effective_rank(s), s.tolist()))
    return out


def summarize_ranks(layers: list[LayerRank], saturation: float) -> dict[str, float]:
    effective = [lay.effective for lay in layers]
    saturated = sum(lay.effective >= saturation * lay.rank for lay in layers)
    return {"lorank/effective_rank_mean": sum(effective) / len(effective),
            "lorank/effective_rank_max": max(effective),
            "lorank/rank_use": sum(lay.effective / lay.rank for lay in layers) / len(layers),
            "lorank/saturated_layers": float(saturated)}


class RankCallback(TrainerCallback):
    """Logs the adapter's effective rank every `every` steps; warns once on saturation
    (effective rank >= `saturation` x r in more than half the layers, past half the steps)."""

    def __init__(self, every: int = 50, saturation: float = 0.9, adapter: str = "default"):
        if every < 1 or not 0 < saturation <= 1:
            raise ValueError("RankCallback needs every >= 1 and 0 < saturation <= 1")
        self.every, self.saturation, self.adapter = every, saturation, adapter
        self.latest: dict[str, float] = {}
        self.warned = False

    @classmethod
    def attach(cls, trainer: Any, **kwargs: Any) -> RankCallback:
        """Add a RankCallback first in the trainer's callbacks, so that the loggers that run
        after it receive its numbers in the same log call."""
        callback = cls(**kwargs)
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None or state.global_step % self.every:
            return
        layers = adapter_ranks(model, self.adapter)
        if not layers:
            return
        self.latest = summarize_ranks(layers, self.saturation)
        halfway = state.max_steps <= 0 or state.global_step >= state.max_steps / 2
        if halfway and not self.warned and \
                self.latest["lorank/saturated_layers"] > len(layers) / 2:
            self.warned = True
            warnings.warn(
                f"lorank: at step {state.global_step} {int(self.latest['lorank/saturated_layers'])}"
                f" of {len(layers)} LoRA layers use nearly all of their rank (effective rank >= "
                f"{self.saturation:g} r) past half of training: if the validation loss still "
                "falls, a higher rank may fit better; `lorank recommend --budget` measures the "
                "rank-loss curve", stacklevel=2)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not self.latest:
            return
        logs.update(self.latest)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self.latest)
