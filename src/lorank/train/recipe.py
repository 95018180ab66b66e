"""One LoRA training recipe (`TrainConfig`) and its scaling rule (`lora_scale`).

Rank-stabilized LoRA with a fixed `lora_alpha` at every rank: the adapter's scale is
`lora_alpha / sqrt(r)`, so the effective learning rate does not drift with rank
(`use_rslora=False`: PEFT's classic `alpha / r`, same fixed alpha). A recipe is plain data,
JSON-serializable with `to_dict` / `from_dict`, and rejects on construction a value that would
train nothing or fail deep inside the Trainer.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

DEFAULT_ALPHA = 8.0


def lora_scale(rank: int, lora_alpha: float, use_rslora: bool = True) -> float:
    """The factor PEFT multiplies `B @ A` by: alpha/sqrt(r) (rsLoRA) or alpha/r (classic)."""
    return lora_alpha / math.sqrt(rank) if use_rslora else lora_alpha / rank


@dataclass
class TrainConfig:
    """One LoRA training recipe; JSON-serializable with `to_dict()` / `from_dict()`.

    Scaling rule: `lora_alpha` is the same number at every rank and `use_rslora=True`, so the
    scale is `lora_alpha / sqrt(rank)` (rank-stabilized LoRA, Kalajdzievski 2023): with that
    scale the size of a step's update to `B @ A` does not grow or shrink with rank, which keeps
    the best learning rate roughly flat across ranks. The default alpha of 8 (PEFT's default)
    gives scale 2 at rank 16, i.e. the common "alpha = 2r" recipe at that rank, and scale
    8/sqrt(r) elsewhere (r=1: 8, r=4: 4, r=64: 1). Growing alpha with sqrt(r) would make the
    scale constant, which is classic LoRA with alpha proportional to r, not rank-stabilized.
    `use_rslora=False` gives PEFT's classic alpha/r with the same fixed alpha.
    """

    rank: int = 8
    lora_alpha: float = DEFAULT_ALPHA
    use_rslora: bool = True
    target_modules: list[str] | str = "all-linear"
    modules_to_save: list[str] | None = None  # e.g. ["score"] / ["classifier"]: a new head
    learning_rate: float = 2e-4
    steps: int = 200  # optimizer steps (TrainingArguments.max_steps)
    batch_size: int = 8  # per device
    grad_accum: int = 1
    warmup_ratio: float = 0.05
    lr_scheduler: str = "cosine"  # any transformers SchedulerType: "cosine", "linear", ...
    weight_decay: float = 0.0
    eval_every: int = 50  # also the checkpoint interval when an out_dir is given
    eval_batch_size: int | None = None  # None: batch_size
    seed: int = 0
    bf16: bool = False
    gradient_checkpointing: bool = False
    lora_dropout: float = 0.0
    max_grad_norm: float = 1.0
    # a step loss above divergence_factor * max(first step loss, 1) counts as diverged
    divergence_factor: float = 10.0

    def __post_init__(self) -> None:
        """Reject a recipe that would train nothing or fail deep inside the Trainer."""
        bad = [f"{name}={getattr(self, name)!r}" for name, ok in (
            ("rank", self.rank >= 1), ("lora_alpha", 0 < self.lora_alpha < math.inf),
            ("learning_rate", 0 < self.learning_rate < math.inf), ("steps", self.steps >= 1),
            ("batch_size", self.batch_size >= 1), ("grad_accum", self.grad_accum >= 1),
            ("eval_every", self.eval_every >= 1), ("warmup_ratio", 0 <= self.warmup_ratio < 1),
            ("lora_dropout", 0 <= self.lora_dropout < 1),
        ) if not ok]
        if bad:
            raise ValueError(f"TrainConfig: invalid {', '.join(bad)}")

    @property
    def scaling(self) -> float:
        """Scale of `B @ A` at this config's rank under the scaling rule."""
        return lora_scale(self.rank, self.lora_alpha, self.use_rslora)

    def lora_config(self, rank: int | None = None):
        """The `peft.LoraConfig` this recipe trains (optionally at another rank, same rule)."""
        from peft import LoraConfig

        targets = self.target_modules
        return LoraConfig(
            r=rank or self.rank,
            lora_alpha=self.lora_alpha,
            use_rslora=self.use_rslora,
            target_modules=targets if isinstance(targets, str) else list(targets),
            modules_to_save=list(self.modules_to_save) if self.modules_to_save else None,
            lora_dropout=self.lora_dropout,
            bias="none",
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
