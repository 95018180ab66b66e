"""Per-layer rank baselines people use today, and lorank's own pattern, run in the benchmark's
harness.

Four methods spread a rank budget over layers instead of picking one rank:

- **EVA** (PEFT `init_lora_weights="eva"`, `EvaConfig()` defaults: rho=2, tau=0.99): SVD of
  each layer's input activations on the training data; the budget r x layers goes to the
  components with the most explained variance, at most rho*r per layer; A starts at them.
- **AdaLoRA** (PEFT `AdaLoraConfig` defaults: init_r=12, target_r=8, beta1=beta2=0.85,
  orth_reg_weight=0.5, no tinit/tfinal): starts every layer at init_r and prunes singular
  values by sensitivity on a cubic schedule down to target_r x layers; the final masks are its
  ranks. It decides while training, so its one run is both its cost and its answer.
- **Fisher diagonal**: per layer the empirical Fisher mass sum_e ||dL_e/dW||_F^2 over
  calibration examples (from the layer's inputs and output gradients, as a Gram identity:
  no full-weight gradient is formed), and the budget's parameters split in proportion to it.
- **lorank's gradient pattern**: the per-layer ranks of the task's stored gradient spectrum
  (`estimators/gradient.json`, the `rank_pattern` `analyze` reports) taken as relative sizes:
  the same budget split so that each layer's rank is in proportion to its spectrum rank. Scored
  against the uniform rank of equal parameters, it says whether lorank's pattern earns its place
  in an exported config.

Each method trains with the task's recipe (targets, steps, batch, warm-up, evaluation) at the
sweep's best learning rate for the budget rank, one run per sweep seed, and stores its
per-example validation losses so the harness scores it exactly like a swept rank.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import TrainerCallback

from lorank.data import collate
from lorank.errors import LorankError
from lorank.heads import fit_head_on_frozen_features
from lorank.hooks import OutputGradientTaps
from lorank.losses import summed_loss
from lorank.targets import TargetSet, resolve_targets
from lorank.train import TrainConfig, train_lora
from lorank.util import atomic_write_text, ticker

BASELINES = ("eva", "adalora", "fisher", "gradient")
BUDGET_RANK = 8  # the budget each method spreads: PEFT's default r (also AdaLoRA's target_r)


@dataclass
class LayerwiseResult:
    """One per-layer method on one task: its ranks, its runs and what deciding cost."""

    name: str
    budget_rank: int
    rank_pattern: dict[str, int]
    trainable_params: int  # of the final adapter (the ranks it chose) plus any trained head
    decide_seconds: float  # work spent choosing the ranks, outside the final runs
    decide_steps: float  # training steps spent choosing (AdaLoRA: its whole run)
    lr: float
    runs: list[dict[str, Any]] = field(default_factory=list)  # per seed: loss, per_example, time
    notes: str = ""

    @property
    def mean_rank(self) -> float:
        return float(np.mean(list(self.rank_pattern.values()))) if self.rank_pattern else 0.0

    def per_example(self) -> list[float]:
        """Seed-mean of per-example validation losses (paired with the sweep's)."""
        return np.mean([np.asarray(r["per_example"], float) for r in self.runs], axis=0).tolist()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"mean_rank": self.mean_rank}


# ---------------------------------------------------------------------------------------------
# Fisher-diagonal allocation


def fisher_masses(model: nn.Module, examples: Sequence[dict], layers: Sequence[str], *,
                  pad_token_id: int, batch_size: int = 8, progress: bool = False
                  ) -> dict[str, float]:
    """Mean over examples of ||dL_e/dW||_F^2 per target layer (the trace of its diagonal
    empirical Fisher), without storing any weight gradient.

    For one example, dL/dW = D^T X (D: output gradients, X: inputs, one row per token), and
    ||D^T X||_F^2 = sum((X X^T) * (D D^T)): two token-by-token Grams, O(T^2 (d_in + d_out)).
    """
    modules = dict(model.named_modules())
    missing = [n for n in layers if n not in modules]
    if missing:
        raise ValueError(f"no module named {missing[0]}")
    mass = dict.fromkeys(layers, 0.0)

    def on_grad(name: str, x3: torch.Tensor, d3: torch.Tensor) -> None:
        gram = (x3 @ x3.transpose(1, 2)) * (d3 @ d3.transpose(1, 2))
        mass[name] += float(gram.sum())

    device = next(model.parameters()).device
    with (OutputGradientTaps(model, {n: modules[n] for n in layers}, on_grad) as taps,
          ticker("fisher", len(examples), progress) as bar):
        # one example per row of the batch: the Gram identity needs per-example sums, which the
        # hooks' (batch, tokens, dim) views give when each row is one example (padding: d = 0)
        for start in range(0, len(examples), batch_size):
            chunk = list(examples[start : start + batch_size])
            batch = {k: v.to(device) for k, v in collate(chunk, pad_token_id).items()}
            with taps.reading(len(chunk)):
                summed_loss(model, batch).backward()
            for _ in chunk:
                bar()
    return {n: m / max(1, len(examples)) for n, m in mass.items()}


def allocate_budget(masses: dict[str, float], sizes: dict[str, int], budget: int, *,
                    min_rank: int = 1, max_rank: int = 64) -> dict[str, int]:
    """Split `budget` parameters over layers in proportion to their mass.

    Layer l costs sizes[l] = d_in + d_out parameters per rank. Its rank is
    clip(round(c * mass_l / sizes_l), min_rank, max_rank) with the one scale c (found by
    bisection) that spends the budget as closely as possible without exceeding it.
    """
    if not masses or budget <= 0:
        raise ValueError("allocate_budget needs layers and a positive budget")
    total = sum(masses.values())
    if not math.isfinite(total) or total <= 0:  # no signal anywhere: the uniform split
        share = {n: 1.0 / len(masses) for n in masses}
    else:
        share = {n: m / total for n, m in masses.items()}

    def ranks_at(c: float) -> dict[str, int]:
        return {n: int(min(max_rank, max(min_rank, round(c * share[n] * budget / sizes[n]))))
                for n in masses}

    def spent(c: float) -> int:
        return sum(r * sizes[n] for n, r in ranks_at(c).items())

    lo, hi = 0.0, 1.0
    while spent(hi) <= budget and hi < 1e9:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if spent(mid) <= budget else (lo, mid)
    return ranks_at(lo)


# ---------------------------------------------------------------------------------------------
# PEFT configurations


def _eva_dataloader(examples: Sequence[dict], pad_token_id: int, batch_size: int) -> list[dict]:
    return [collate(list(examples[i : i + batch_size]), pad_token_id)
            for i in range(0, len(examples), batch_size)]


def _eva_inputs_fn(classification: bool) -> Callable:
    """EVA's token selection: supervised tokens for causal LMs; every real token for
    classification (its labels are per example, not per token)."""
    from peft.tuners.lora.eva import prepare_model_inputs_fn_language_modeling

    if not classification:
        return prepare_model_inputs_fn_language_modeling

    def attention_tokens(model_input: dict, peft_config: Any) -> torch.Tensor:
        return model_input["attention_mask"].bool().nonzero()

    return attention_tokens


class AdaLoraAllocator(TrainerCallback):
    """AdaLoRA's budget step after every optimizer step, while gradients are still there
    (PEFT leaves the call to the training loop; the last step forces the final masks)."""

    def __init__(self) -> None:
        self.model: nn.Module | None = None

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.model is not None:
            self.model.base_model.update_and_allocate(state.global_step + 1)


def lora_ranks(model: nn.Module) -> dict[str, int]:
    """Rank of every LoRA layer of a PEFT model, by base-model module name."""
    ranks = {}
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict) and "default" in lora_a:
            ranks[name.removeprefix("base_model.model.")] = int(lora_a["default"].weight.shape[0])
    return ranks


def adalora_ranks(model: nn.Module) -> dict[str, int]:
    """Final ranks of a trained AdaLoRA model (kept singular values per layer)."""
    config = model.peft_config["default"]
    pattern = config.rank_pattern or {}
    ranks = {}
    for key, mask in pattern.items():
        name = key.removeprefix("base_model.model.").rsplit(".lora_E", 1)[0]
        ranks[name.removesuffix(".default")] = int(sum(bool(m) for m in mask))
    return ranks


# ---------------------------------------------------------------------------------------------
# running a method on a task


@dataclass
class TaskRun:
    """What a per-layer method needs from a task: model, data and the sweep's recipe."""

    model_factory: Callable[[], nn.Module]
    train: list[dict]
    val: list[dict]
    pad_token_id: int
    targets: TargetSet
    recipe: dict[str, Any]
    seeds: list[int]
    lr: float
    classification: bool
    gradient_pattern: dict[str, int] = field(default_factory=dict)  # stored spectrum's ranks
    gradient_seconds: float = 0.0  # what measuring that spectrum cost


def run_layerwise(name: str, task: TaskRun, *, budget_rank: int = BUDGET_RANK,
                  calib: int = 256, max_rank: int = 64, progress: bool = True
                  ) -> LayerwiseResult:
    """Choose per-layer ranks with method `name`, then train it once per seed."""
    if name not in BASELINES:
        raise LorankError(f"unknown per-layer baseline {name}; known: {', '.join(BASELINES)}")
    config = TrainConfig.from_dict({**task.recipe, "rank": budget_rank, "learning_rate": task.lr})
    sizes = {t.name: t.d_in + t.d_out for t in task.targets.layers}
    budget = budget_rank * sum(sizes.values())
    calib_examples = task.train[:calib]
    result = LayerwiseResult(name, budget_rank, {}, 0, 0.0, 0.0, task.lr)

    if name == "fisher":
        t0 = time.time()
        model = task.model_factory()
        if task.classification:  # a random head makes body gradients noise: fit it first
            fit_head_on_frozen_features(model, calib_examples, pad_token_id=task.pad_token_id)
        masses = fisher_masses(model, calib_examples, list(sizes), pad_token_id=task.pad_token_id,
                               batch_size=config.batch_size, progress=progress)
        del model
        result.rank_pattern = allocate_budget(masses, sizes, budget, max_rank=max_rank)
        result.decide_seconds = time.time() - t0
        result.notes = (f"budget = params of r={budget_rank} everywhere; ranks in proportion "
                        "to Fisher mass")

    if name == "gradient":
        if not task.gradient_pattern:
            raise LorankError("the gradient pattern needs the task's stored gradient spectrum "
                              "(estimators/gradient.json, written by lorank bench --run)")
        masses = {n: task.gradient_pattern.get(n, 0) * sizes[n] for n in sizes}
        result.rank_pattern = allocate_budget(masses, sizes, budget, max_rank=max_rank)
        result.decide_seconds = task.gradient_seconds
        result.notes = (f"budget = params of r={budget_rank} everywhere; ranks in proportion "
                        "to the gradient spectrum's per-layer ranks")

    for seed in task.seeds:
        run_config = TrainConfig.from_dict(config.to_dict() | {"seed": seed})
        peft_config, prepare, callbacks = _method_setup(name, run_config, task, result,
                                                        calib_examples)
        out = train_lora(task.model_factory, task.train, task.val, run_config,
                         pad_token_id=task.pad_token_id, progress=progress,
                         peft_config=peft_config, prepare_model=prepare, callbacks=callbacks,
                         return_model=name == "adalora")
        if not out.ok:
            raise LorankError(f"{name} run (seed {seed}) failed: {out.status}")
        if name == "adalora":
            ranks = adalora_ranks(out.model)
            result.rank_pattern = result.rank_pattern or ranks
            result.decide_steps += out.steps_done
        result.runs.append({"seed": seed, "best_val_loss": out.best_val_loss,
                            "per_example": out.best_val_losses, "wall_seconds": out.wall_seconds,
                            "rank_pattern": result.rank_pattern if name != "adalora" else ranks})
    if name == "adalora":
        result.decide_steps /= len(task.seeds)  # one run decides; the seeds repeat it
    result.trainable_params = task.targets.params_pattern(0, result.rank_pattern)
    return result


def _method_setup(name: str, config: TrainConfig, task: TaskRun, result: LayerwiseResult,
                  calib_examples: list[dict]) -> tuple[Any, Callable | None, list]:
    from peft import AdaLoraConfig, EvaConfig, LoraConfig

    base = config.lora_config()
    if name in ("fisher", "gradient"):
        return LoraConfig(**{**_fields(base), "rank_pattern": result.rank_pattern}), None, []
    if name == "eva":
        from peft import initialize_lora_eva_weights

        eva = LoraConfig(**{**_fields(base), "init_lora_weights": "eva",
                            "eva_config": EvaConfig()})

        def prepare(model: nn.Module) -> None:
            t0 = time.time()
            if task.classification:
                fit_head_on_frozen_features(model, calib_examples, pad_token_id=task.pad_token_id)
            initialize_lora_eva_weights(
                model, _eva_dataloader(calib_examples, task.pad_token_id, config.batch_size),
                prepare_model_inputs_fn=_eva_inputs_fn(task.classification),
                show_progress_bar=False)
            ranks = lora_ranks(model)  # EVA may drop a layer (rank 0): read what is there
            result.rank_pattern = {t.name: ranks.get(t.name, 0) for t in task.targets.layers}
            result.decide_seconds = max(result.decide_seconds, time.time() - t0)

        return eva, prepare, []
    allocator = AdaLoraAllocator()
    ada = AdaLoraConfig(target_modules=list(task.targets.peft_target_modules),
                        modules_to_save=base.modules_to_save, total_step=config.steps)

    def attach(model: nn.Module) -> None:
        allocator.model = model

    return ada, attach, [allocator]


def _fields(config: Any) -> dict[str, Any]:
    keep = ("r", "lora_alpha", "use_rslora", "target_modules", "modules_to_save",
            "lora_dropout", "bias")
    return {k: getattr(config, k) for k in keep}


def task_run(task_dir: Path) -> TaskRun:
    """Rebuild a swept task's model, data and recipe from its directory."""
    from lorank.api import prepare_inputs
    from lorank.sweep import model_factory_from

    task_dir = Path(task_dir)
    sweep_path = task_dir / "sweep.json"
    if not sweep_path.exists():
        raise LorankError(f"{task_dir}: no sweep.json; per-layer baselines need the sweep's "
                          "recipe and learning rates")
    sweep = json.loads(sweep_path.read_text())
    info = json.loads((task_dir / "data" / "task.json").read_text())["task"]
    loaded, prepared = prepare_inputs(info["model"], task_dir / "data" / "train.jsonl",
                                      val_data=task_dir / "data" / "val.jsonl",
                                      max_length=info["max_length"])
    targets = resolve_targets(loaded.model, info.get("targets", "all-linear"))
    curve = sweep["curve"]
    at = str(BUDGET_RANK) if str(BUDGET_RANK) in curve else min(curve, key=lambda r: abs(
        int(r) - BUDGET_RANK))
    gradient_path = task_dir / "estimators" / "gradient.json"
    gradient = json.loads(gradient_path.read_text()) if gradient_path.exists() else {}
    pattern = gradient.get("rank_pattern") or {}
    return TaskRun(model_factory_from(loaded.model), prepared.train, prepared.val,
                   loaded.pad_token_id, targets, sweep["spec"]["recipe"],
                   list(sweep["spec"]["seeds"]), float(curve[at]["lr"]),
                   prepared.fmt == "classification", {k: int(v) for k, v in pattern.items()},
                   float(gradient.get("cost_seconds", 0.0)))


def run_task_baselines(task_dir: Path, names: Sequence[str], *, progress: bool = True
                       ) -> list[Path]:
    """Run per-layer baselines on a swept task; store each as baselines/NAME.json."""
    task = task_run(task_dir)
    written = []
    for name in names:
        result = run_layerwise(name, task, progress=progress)
        path = Path(task_dir) / "baselines" / f"{name}.json"
        path.parent.mkdir(exist_ok=True)
        atomic_write_text(path, json.dumps(result.to_dict(), indent=1))
        written.append(path)
    return written
