"""The one LoRA training loop shared by the nested probe and the sweep.

It is transformers' `Trainer` (so bf16, gradient accumulation, activation checkpointing,
resume and multi-GPU through accelerate come from the library) plus lorank's callbacks:

  - `NanGuardCallback`: stops a run whose loss is not finite (or blows up) and marks it
    failed with a reason instead of crashing or silently logging NaN;
  - an evaluation callback that computes *per-example* validation losses every
    `eval_every` steps (the paired standard errors of the decision rule need them), keeps the
    learning curve and the best point, and stores its history inside each checkpoint so a
    resumed run continues with the same curve;
  - a rich progress bar with ETA.

Scaling rule (see `TrainConfig`): rank-stabilized LoRA with a *fixed* `lora_alpha` for every
rank, so the adapter's scale is `lora_alpha / sqrt(r)` and the effective learning rate does not
drift with rank. Whatever rule trained the evidence is the rule the exported config carries.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    PreTrainedModel,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from lorank.data import IGNORE_INDEX, collate
from lorank.util import atomic_write_text

STATE_FILE = "lorank_state.json"
CONFIG_FILE = "lorank_train_config.json"
RESULT_FILE = "lorank_train_result.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")

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


@dataclass
class TrainResult:
    """Outcome of one `train_lora` run. `model` is only set with `return_model=True`."""

    status: str  # "ok" or "diverged: <reason>"
    final_val_loss: float
    best_val_loss: float
    best_step: int
    best_val_losses: list[float]  # per-example val losses at the best eval point
    curve: list[tuple[int, float, float]]  # (step, mean train loss since last eval, val loss)
    wall_seconds: float
    trainable_params: int
    steps_done: int
    config: dict[str, Any]
    eval_seconds: float = 0.0  # part of wall_seconds spent evaluating
    model: Any = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}
        d["curve"] = [list(c) for c in self.curve]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainResult:
        d = dict(d)
        d["curve"] = [tuple(c) for c in d.get("curve", [])]
        return cls(**{k: v for k, v in d.items() if k != "model"})


# ---------------------------------------------------------------------------- evaluation


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


# ---------------------------------------------------------------------------- run state


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


# ---------------------------------------------------------------------------- checkpoints


def _write_json(path: str, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=1, default=float))


def _checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """lorank checkpoints in out_dir (those holding our state file), newest first."""
    if not os.path.isdir(out_dir):
        return []
    found = []
    for name in os.listdir(out_dir):
        m = _CHECKPOINT_RE.match(name)
        path = os.path.join(out_dir, name)
        if m and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(m.group(1)), path))
    return sorted(found, reverse=True)


def last_checkpoint(out_dir: str) -> str | None:
    """Newest complete lorank checkpoint in `out_dir` (a Trainer checkpoint plus our state)."""
    found = _checkpoints(out_dir)
    return found[0][1] if found else None


# ---------------------------------------------------------------------------- training


def _has_accelerator() -> bool:
    acc = getattr(torch, "accelerator", None)
    return bool(acc.is_available()) if acc is not None else torch.cuda.is_available()


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_peft_model(
    model_factory: Callable[[], PreTrainedModel], config: TrainConfig, peft_config: Any = None
) -> nn.Module:
    """Seeded base model + adapter (same seed -> same adapter init).

    `peft_config` replaces the recipe's plain LoRA (per-layer baselines: EVA, AdaLoRA, a
    rank_pattern); the recipe still sets everything else about the run.
    """
    from peft import get_peft_model

    set_seed(config.seed)
    model = model_factory()
    with warnings.catch_warnings():  # peft asks the model a deprecated question; not ours
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated")
        return get_peft_model(model, peft_config or config.lora_config())


class _ResumeCadenceFilter(logging.Filter):
    """Drops transformers' warning that a checkpoint was saved with other `save_steps`: lorank
    continues the probe's pilot run (saved at a quarter) with its own cadence on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "do not match the ones in the `trainer_state.json`" not in record.getMessage()


logging.getLogger("transformers.trainer_utils").addFilter(_ResumeCadenceFilter())


def train_lora(
    model_factory: Callable[[], PreTrainedModel],
    train_examples: Sequence[dict],
    val_examples: Sequence[dict],
    config: TrainConfig,
    *,
    pad_token_id: int,
    out_dir: str | os.PathLike | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    resume: bool = False,
    progress: bool = True,
    evaluator: Evaluator | None = None,
    prepare_model: Callable[[nn.Module], None] | None = None,
    return_model: bool = False,
    peft_config: Any = None,
) -> TrainResult:
    """Train one LoRA adapter with `config` and report its validation curve.

    `model_factory` builds a fresh base model (called once, after seeding). Evaluation runs
    every `config.eval_every` steps and at the last step; `evaluator` replaces the default
    per-example validation loss (the probe evaluates every truncation rank there). With
    `out_dir`, a checkpoint is written at every eval point and `resume=True` continues from the
    newest one, curve included. A diverged run returns `status="diverged: ..."`, never raises.
    """
    t0 = time.time()
    evaluator = evaluator or ValLossEvaluator(
        val_examples, pad_token_id, config.eval_batch_size or config.batch_size
    )
    run = _Run()
    resume_from = None
    tmp_dir = None
    if out_dir is not None:
        out_dir = os.fspath(out_dir)
        os.makedirs(out_dir, exist_ok=True)
        if resume:
            resume_from = last_checkpoint(out_dir)
        else:  # stale lorank checkpoints of an earlier run would confuse a later resume
            for _, path in _checkpoints(out_dir):
                shutil.rmtree(path, ignore_errors=True)
        if resume_from is not None:
            with open(os.path.join(resume_from, STATE_FILE)) as f:
                run = _Run.from_json(json.load(f))
            if run.evaluator_state is not None and hasattr(evaluator, "load_state_dict"):
                evaluator.load_state_dict(run.evaluator_state)
        _write_json(os.path.join(out_dir, CONFIG_FILE), config.to_dict())
    else:
        tmp_dir = tempfile.mkdtemp(prefix="lorank-train-")

    model = build_peft_model(model_factory, config, peft_config)
    if prepare_model is not None:  # before the Trainer builds its optimizer (hooks, extra params)
        prepare_model(model)
    trainable = count_trainable(model)
    args = TrainingArguments(
        output_dir=out_dir or tmp_dir,
        max_steps=config.steps,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=int(math.ceil(config.warmup_ratio * config.steps)),
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        seed=config.seed,
        bf16=config.bf16,
        activation_checkpointing=config.gradient_checkpointing,
        eval_strategy="no",  # lorank evaluates per example in _EvalCallback
        save_strategy="steps" if out_dir is not None else "no",
        save_steps=max(1, config.eval_every),
        save_total_limit=2,
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        label_names=["labels"],
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not _has_accelerator(),  # lets bf16 autocast run on a CPU-only machine
    )
    lorank_callbacks: list[TrainerCallback] = [
        NanGuardCallback(run, config.divergence_factor),
        _EvalCallback(run, evaluator, config.eval_every, t0),
    ]
    if progress:
        lorank_callbacks.append(RichProgressCallback(run, f"r={config.rank}"))
    trainer = _LorankTrainer(
        model=model,
        args=args,
        data_collator=lambda batch: collate(batch, pad_token_id),
        train_dataset=list(train_examples),
        callbacks=lorank_callbacks + list(callbacks),
        lorank_run=run,
    )
    for cb in (PrinterCallback, ProgressCallback):  # no tqdm / printed log dicts
        trainer.remove_callback(cb)

    eval_cb = lorank_callbacks[1]
    try:
        if resume_from is not None and run.stop_requested:
            # the run had already stopped early: reload its weights, do not train further
            trainer._load_from_checkpoint(resume_from)
            step = run.last_eval_step
        else:
            trainer.train(resume_from_checkpoint=resume_from)
            step = trainer.state.global_step
        if run.status == "ok" and run.last_eval_step != step:
            eval_cb.evaluate(model, step)  # stopped between eval points (e.g. by a callback)
        if run.status == "ok" and hasattr(evaluator, "finalize"):
            t_final = time.time()
            evaluator.finalize(model, step)
            run.eval_seconds += time.time() - t_final
    finally:
        for cb in lorank_callbacks:
            if isinstance(cb, RichProgressCallback):
                cb.close()
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)

    result = TrainResult(
        status=run.status,
        final_val_loss=float(run.final_val_loss),
        best_val_loss=float(run.best_val_loss),
        best_step=run.best_step,
        best_val_losses=[float(x) for x in run.best_val_losses],
        curve=[(int(s), float(tr), float(va)) for s, tr, va in run.curve],
        wall_seconds=run.wall_before + (time.time() - t0),
        eval_seconds=run.eval_seconds,
        trainable_params=trainable,
        steps_done=step,
        config=config.to_dict(),
        model=model if return_model else None,
    )
    if out_dir is not None and trainer.is_world_process_zero():
        _write_json(os.path.join(out_dir, RESULT_FILE), result.to_dict())
    return result
