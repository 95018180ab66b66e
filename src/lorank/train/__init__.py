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

Modules, lowest first (each imports only those before it): `recipe` (`TrainConfig`,
`lora_scale`), `evaluation` (per-example losses, the evaluator contract), `checkpoints` (the
run's files, the newest checkpoint), `callbacks` (the run state and the Trainer callbacks),
`loop` (`train_lora`, `TrainResult`). Every name callers use is re-exported here, so
`lorank.train.X` keeps working; the probes, the sweep and the API look `train_lora` up here or
in their own module, so a test that replaces it patches the module whose call it means to see.
"""

from lorank.train.callbacks import NanGuardCallback, RichProgressCallback
from lorank.train.checkpoints import CONFIG_FILE, RESULT_FILE, STATE_FILE, last_checkpoint
from lorank.train.evaluation import EvalPoint, Evaluator, ValLossEvaluator, per_example_losses
from lorank.train.loop import TrainResult, build_peft_model, count_trainable, train_lora
from lorank.train.recipe import DEFAULT_ALPHA, TrainConfig, lora_scale

__all__ = [
    "CONFIG_FILE",
    "DEFAULT_ALPHA",
    "RESULT_FILE",
    "STATE_FILE",
    "EvalPoint",
    "Evaluator",
    "NanGuardCallback",
    "RichProgressCallback",
    "TrainConfig",
    "TrainResult",
    "ValLossEvaluator",
    "build_peft_model",
    "count_trainable",
    "last_checkpoint",
    "lora_scale",
    "per_example_losses",
    "train_lora",
]
