"""The one LoRA training loop (`train_lora`) shared by the probes, the sweep and the baselines.

A seeded base model gets its adapter (`build_peft_model`) and trains in transformers' Trainer
with lorank's callbacks; it is evaluated every `eval_every` steps and at the last step, and
with an output directory checkpoints at every evaluation and can resume from the newest
checkpoint, curve included. A run returns a `TrainResult`; a diverged run says so in its
status and never raises.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from lorank.data import collate
from lorank.train.callbacks import (
    NanGuardCallback,
    RichProgressCallback,
    _EvalCallback,
    _LorankTrainer,
    _Run,
)
from lorank.train.checkpoints import (
    CONFIG_FILE,
    RESULT_FILE,
    STATE_FILE,
    _checkpoints,
    _write_json,
    last_checkpoint,
)
from lorank.train.evaluation import Evaluator, ValLossEvaluator
from lorank.train.recipe import TrainConfig


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
