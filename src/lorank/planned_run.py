"""The fine-tuning run the user plans: r* belongs to it, so every estimate takes it as input.

The same data trained three times as long can need another rank (DESIGN.md), so `recommend`,
`analyze` and `probe` take the planned run (`--epochs` or `--steps`, `--batch-size`, `--lr`),
the estimators read it, and `recommendation.json` records it under `inputs.planned_run`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from lorank.errors import LorankError

DEFAULT_EPOCHS = 3.0  # transformers' TrainingArguments.num_train_epochs, which TRL inherits
# how the best lr moves with rank under rsLoRA, fitted by benchmarks/lr_by_rank.py
LR_SLOPE_FILE = Path(__file__).with_name("lr_slope.json")


@cache
def lr_slope() -> float:
    """The shipped slope of log2(best lr) on log2(rank) under rsLoRA (negative: lower lr at
    higher rank)."""
    return float(json.loads(LR_SLOPE_FILE.read_text())["slope"])


def lr_at_rank(lr: float, measured_at: int, rank: int) -> float:
    """The learning rate for `rank` given the best one measured at rank `measured_at`, moved
    by the benchmark's slope: lr * (rank / measured_at) ** slope."""
    return float(lr * (rank / measured_at) ** lr_slope())


@dataclass(frozen=True)
class PlannedRun:
    """How long, how wide and how fast the user will train: `epochs` or `steps` (not both;
    neither means DEFAULT_EPOCHS), the batch size per step, and the learning rate if known."""

    epochs: float | None = None
    steps: int | None = None
    batch_size: int = 8
    lr: float | None = None

    def __post_init__(self) -> None:
        if self.epochs is not None and self.steps is not None:
            raise LorankError("--epochs and --steps both given: the planned run is one or the "
                              "other")
        if self.epochs is not None and not (math.isfinite(self.epochs) and self.epochs > 0):
            raise LorankError(f"--epochs {self.epochs}: expected a positive number")
        if self.steps is not None and self.steps < 1:
            raise LorankError(f"--steps {self.steps}: expected a positive whole number")
        if self.batch_size < 1:
            raise LorankError(f"--batch-size {self.batch_size}: expected a positive whole number")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise LorankError(f"--lr {self.lr}: expected a positive learning rate")

    def epochs_over(self, n_train: int) -> float:
        """Passes over `n_train` training examples the run makes."""
        if self.steps is not None:
            return self.steps * self.batch_size / max(n_train, 1)
        return float(self.epochs if self.epochs is not None else DEFAULT_EPOCHS)

    def steps_over(self, n_train: int) -> int:
        """Optimizer steps the run takes over `n_train` examples."""
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.epochs_over(n_train) * n_train / self.batch_size))

    def to_dict(self, n_train: int) -> dict[str, Any]:
        """As recorded in recommendation.json: what was given, and what it comes to."""
        return {"epochs": self.epochs, "steps": self.steps, "batch_size": self.batch_size,
                "lr": self.lr, "epochs_over_data": round(self.epochs_over(n_train), 4),
                "steps_over_data": self.steps_over(n_train),
                "default_epochs_used": self.epochs is None and self.steps is None}


def step_seconds(forward_seconds_per_token: float, batch_size: int, median_length: float
                 ) -> float:
    """Estimated seconds of one training step: about three forward passes (forward and
    backward) over `batch_size` examples of `median_length` tokens, at the measured forward
    speed (`DataProfile.forward_seconds_per_token`)."""
    return 3 * forward_seconds_per_token * batch_size * median_length
