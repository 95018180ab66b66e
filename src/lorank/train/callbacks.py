"""The state of one training run and the callbacks that keep it, inside transformers' Trainer.

`_Run` holds what lorank tracks (status, step losses, curve, best point, evaluator state) and
is stored as JSON in every checkpoint, so a resumed run continues with the same curve.
`_LorankTrainer` hands each micro-batch loss to it; `NanGuardCallback` stops a run whose loss
is not finite or blows up and marks it diverged, with the reason; `_EvalCallback` evaluates
every `eval_every` steps and writes the run state into each checkpoint;
`RichProgressCallback` draws one progress bar with the latest losses.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState

from lorank.train.checkpoints import STATE_FILE, _write_json
from lorank.train.evaluation import EvalPoint, Evaluator


@dataclass
class _Run:
    """Mutable state shared by the trainer subclass and lorank's callbacks; JSON in checkpoints."""

    status: str = "ok"
    first_loss: float | None = None
    window_losses: list[float] = field(default_factory=list)  # step losses since last eval
    curve: list[list[float]] = field(default_factory=list)
    best_val_loss: float = math.inf
    best_step: int = -1
    best_val_losses: list[float] = field(default_factory=list)
    final_val_loss: float = math.nan
    last_eval_step: int = -1
    wall_before: float = 0.0  # wall seconds of earlier runs of this training (resume)
    eval_seconds: float = 0.0  # of the wall time, spent evaluating (cost accounting)
    evaluator_state: dict[str, Any] | None = None
    message: str = ""
    stop_requested: bool = False

    def __post_init__(self) -> None:
        self._step_loss: torch.Tensor | None = None

    def add_micro_loss(self, loss: torch.Tensor) -> None:
        loss = loss.detach().float()
        self._step_loss = loss if self._step_loss is None else self._step_loss + loss

    def pop_step_loss(self) -> float:
        """This step's loss, averaged over processes so that all of them stop together."""
        loss, self._step_loss = self._step_loss, None
        if loss is None:
            return math.nan
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            loss = loss.clone()
            torch.distributed.all_reduce(loss)
            loss /= torch.distributed.get_world_size()
        return float(loss.item())

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> _Run:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class _LorankTrainer(Trainer):
    """Trainer that hands each micro-batch loss to lorank (the guard needs the raw value)."""

    def __init__(self, *args: Any, lorank_run: _Run, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.lorank_run = lorank_run

    def training_step(self, model, inputs, num_items_in_batch=None):  # noqa: D102
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.lorank_run.add_micro_loss(loss)
        return loss


class NanGuardCallback(TrainerCallback):
    """Stop a run whose step loss is NaN/inf or blows past `factor * max(first loss, 1)`.

    The Trainer's own `logging_nan_inf_filter` hides NaN losses in the logs and keeps going;
    a diverged run must instead be recorded as failed, with a reason, and not checkpointed.
    """

    def __init__(self, run: _Run, factor: float = 10.0):
        self.run = run
        self.factor = factor

    def on_step_end(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        loss = self.run.pop_step_loss()
        step = state.global_step
        reason = None
        if not math.isfinite(loss):
            reason = f"loss {loss} not finite at step {step}"
        elif self.run.first_loss is None:
            self.run.first_loss = loss
        elif self.factor and loss > self.factor * max(self.run.first_loss, 1.0):
            reason = (
                f"loss {loss:.4g} at step {step} exceeds {self.factor:g} x "
                f"max(first step loss {self.run.first_loss:.4g}, 1)"
            )
        if reason is not None and self.run.status == "ok":
            self.run.status = f"diverged: {reason}"
            control.should_training_stop = True
            control.should_save = False
        if reason is None:
            self.run.window_losses.append(loss)
        return control


class _EvalCallback(TrainerCallback):
    """Evaluate every `eval_every` steps; keep curve/best; write lorank state into checkpoints."""

    def __init__(self, run: _Run, evaluator: Evaluator, eval_every: int, t0: float):
        self.run = run
        self.evaluator = evaluator
        self.eval_every = max(1, eval_every)
        self.t0 = t0

    def evaluate(self, model: nn.Module, step: int) -> EvalPoint | None:
        run = self.run
        if run.status != "ok":
            return None
        t0 = time.time()
        point = self.evaluator(model, step)
        run.eval_seconds += time.time() - t0
        train_loss = float(np.mean(run.window_losses)) if run.window_losses else math.nan
        run.window_losses = []
        run.curve.append([step, train_loss, point.val_loss])
        run.last_eval_step = step
        run.final_val_loss = point.val_loss
        run.message = point.message
        if not math.isfinite(point.val_loss):
            run.status = f"diverged: validation loss {point.val_loss} not finite at step {step}"
        elif point.val_loss < run.best_val_loss:
            run.best_val_loss = point.val_loss
            run.best_step = step
            run.best_val_losses = list(point.per_example or [])
        run.stop_requested = run.stop_requested or point.stop
        return point

    def on_step_end(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        step = state.global_step
        if self.run.status == "ok" and (step % self.eval_every == 0 or step >= state.max_steps):
            point = self.evaluate(kwargs["model"], step)
            if self.run.status != "ok":
                control.should_training_stop = True
                control.should_save = False
            elif point is not None and point.stop:
                control.should_training_stop = True
        return control

    def on_save(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        if not state.is_world_process_zero:
            return control
        ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(ckpt):
            run = self.run
            if hasattr(self.evaluator, "state_dict"):
                run.evaluator_state = self.evaluator.state_dict()
            payload = run.to_json()
            payload["wall_before"] = run.wall_before + (time.time() - self.t0)
            _write_json(os.path.join(ckpt, STATE_FILE), payload)
        return control


class RichProgressCallback(TrainerCallback):
    """One rich progress bar (steps, elapsed, ETA, latest losses and evaluator message)."""

    def __init__(self, run: _Run, description: str = "train"):
        self.run = run
        self.description = description
        self._progress = None
        self._task = None

    def _text(self) -> str:
        parts = [self.description]
        if self.run.curve:
            step, tr, va = self.run.curve[-1]
            parts.append(f"train {tr:.4f} val {va:.4f}")
        if self.run.message:
            parts.append(self.run.message)
        return " | ".join(parts)

    def on_train_begin(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        if not state.is_world_process_zero:
            return control
        from lorank.util import new_progress

        self._progress = new_progress()
        self._progress.start()
        self._task = self._progress.add_task(
            self._text(), total=state.max_steps, completed=state.global_step
        )
        return control

    def on_step_end(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        if self._progress is not None:
            self._progress.update(self._task, completed=state.global_step, description=self._text())
        return control

    def on_train_end(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        self.close()
        return control

    def close(self) -> None:
        """Stop the live display (also on an exception, so the terminal is left clean)."""
        if self._progress is not None:
            self._progress.update(self._task, description=self._text())
            self._progress.stop()
            self._progress = None
