"""The Python API: the same verbs as the CLI (`lorank.recommend(...)` == `lorank recommend`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lorank import data as data_mod
from lorank.decide import Recommendation, candidate_ranks, decide
from lorank.errors import LorankError
from lorank.estimators.base import Evidence
from lorank.export import ensure_writable, write_outputs
from lorank.models import LoadedModel
from lorank.planned_run import PlannedRun
from lorank.runs.estimate import ESTIMATORS, run_estimator
from lorank.runs.gradient import run_gradient
from lorank.runs.inputs import (
    kept_measurements,
    measure_profile,
    prepare_inputs,
    seed_everything,
    versions,
)
from lorank.runs.probe import (
    PILOT_LOSSES,
    PROBE_CHECKPOINT,
    budget_form,
    check_probe_method,
    learning_rates,
    parse_budget,
    probe_cost,
    run_probe,
)
from lorank.targets import resolve_targets
from lorank.util import output_dir_guard

if TYPE_CHECKING:
    from lorank.adapter_loss import AdapterReport

# the calibrated capacity estimate decides by default; the gradient spectrum (`analyze`, or
# estimators=("capacity", "gradient")) is reported beside it only when asked: its count has not
# tracked r* on the benchmark, and it costs about three passes
DEFAULT_ESTIMATORS: tuple[str, ...] = ("capacity",)

# the verbs, then the helpers below them that callers import from here (lorank.runs holds them)
__all__ = [
    "recommend", "analyze", "probe", "sweep", "inspect", "shrink", "DEFAULT_ESTIMATORS",
    "ESTIMATORS", "PILOT_LOSSES", "PROBE_CHECKPOINT", "budget_form", "check_probe_method",
    "kept_measurements", "learning_rates", "measure_profile", "parse_budget", "prepare_inputs",
    "probe_cost", "resolve_targets", "run_estimator", "run_gradient", "run_probe",
    "seed_everything", "versions",
]


def recommend(model: str | LoadedModel, data: str | Path, *, targets: str = "all-linear",
              format: str | None = None, val_data: str | Path | None = None, max_length: int = 512,
              rank: int | None = None, max_rank: int = 256, batch_size: int = 8, seed: int = 0,
              epochs: float | None = None, steps: int | None = None, profile_sample: int = 64,
              estimators: tuple[str, ...] = DEFAULT_ESTIMATORS,
              budget: str | int | None = None, probe_method: str = "svd",
              probe_rank: int = 64, lr: float | Sequence[float] = 1e-3,
              calib: int = 256, sketch_check: bool = False,
              gradient_max_rank: int | None = None, gradient_replay_mb: float | None = None,
              sweep: str | Path | None = None,
              out: str | Path | None = None, dtype: str = "float32", device: str = "cpu",
              trust_remote_code: bool = False, progress: bool = True,
              offline: bool = False) -> Recommendation:
    """Measure the data and the model and recommend a LoRA rank, alpha and targets.

    The planned run (`epochs` or `steps`, `batch_size`, `lr`; neither length given means
    DEFAULT_EPOCHS) is an input of the estimates and is recorded in `inputs["planned_run"]`.
    `estimators` picks the evidence to gather (cheapest first); a `budget` (training steps,
    or minutes as "10m") adds the one-run probe, trained at `lr` (several: a pilot picks one)
    and at rank `probe_rank`; `max_rank` is the largest candidate rank, `gradient_max_rank`
    the largest the gradient spectrum reads per layer. Keywords are the CLI's option names
    (`format` is `--format`, `progress=False` is `--quiet`). `sweep` (a `lorank sweep --out` directory run on this data) adds its measured curve, which
    decides. `rank` forces a rank and only checks it against the targets (the evidence is
    still reported). A hub model id or `datasets` name downloads into the Hugging Face cache
    when missing; `offline` (or HF_HUB_OFFLINE) reads the cache only. With `out`, the files of
    `lorank.export.write_outputs` go there (report.html, recommendation.json, ...); the returned
    Recommendation keeps every estimator's whole evidence.
    """
    planned = PlannedRun(epochs=epochs, steps=steps, batch_size=batch_size,
                         lr=lr if isinstance(lr, (int, float)) else None)
    if budget is not None and "probe" not in estimators:
        estimators = (*estimators, "probe")
    if "probe" in estimators:  # the probe's options, checked before anything is measured
        budget_form(budget)
        check_probe_method(probe_method)
        learning_rates(lr)
    with output_dir_guard(out):  # a run that fails leaves no empty output folder behind
        if out is not None:
            ensure_writable(Path(out))
        seed_everything(seed)
        loaded, prepared = prepare_inputs(model, data, format=format, val_data=val_data,
                                          max_length=max_length, seed=seed, dtype=dtype,
                                          device=device, trust_remote_code=trust_remote_code,
                                          offline=offline)
        if "probe" in estimators and budget in (None, "auto") and (epochs or steps):
            # the probe trains the planned run
            budget = str(planned.steps_over(len(prepared.train)))
        target_set = resolve_targets(loaded.model, targets)
        if rank is not None:
            target_set.check_rank(rank)
        ranks = candidate_ranks(target_set, max_rank)
        measured = None
        if sweep is not None:  # read before any measuring: a wrong sweep fails fast
            from lorank.sweep import sweep_evidence

            measured = sweep_evidence(Path(sweep), data_hash=prepared.data_hash)
        kept = kept_measurements(out, loaded)
        prof, profile_seconds = measure_profile(prepared, loaded, kept, sample=profile_sample,
                                                batch_size=batch_size, seed=seed,
                                                progress=progress)

        evidence: list[Evidence] = [measured] if measured is not None else []
        probe_opts = {"budget": budget, "method": probe_method, "max_rank": probe_rank,
                      "lr": lr, "out": Path(out) if out is not None else None,
                      "gradient": {"calib": calib, "max_rank": gradient_max_rank,
                                   "sketch_check": sketch_check,
                                   "replay_mb": gradient_replay_mb}}
        for name in estimators:
            evidence.append(run_estimator(name, loaded, prepared, prof, target_set, ranks,
                                          batch_size=batch_size, seed=seed, progress=progress,
                                          profile_seconds=profile_seconds, probe=probe_opts,
                                          run=planned, kept=kept))
        seq_len = int(prof.length_percentiles["p90"])
        inputs: dict[str, Any] = {
            "model": loaded.source, "model_path": loaded.path, "data": str(data),
            "val_data": str(val_data) if val_data else None, "data_hash": prepared.data_hash,
            "format": prepared.fmt, "targets": targets, "max_length": max_length, "seed": seed,
            "batch_size": batch_size, "planned_run": planned.to_dict(prof.examples),
            "profile": prof.to_dict(), "versions": versions(), "reused": list(kept.reused),
        }
        rec = decide(evidence, target_set, ranks=ranks, task=prepared.task,
                     batch_size=batch_size, seq_len=seq_len, inputs=inputs, forced_rank=rank)
        if out is not None:
            write_outputs(rec, Path(out), base_model=loaded.path)
        return rec



def analyze(model: str | LoadedModel, data: str | Path, *, targets: str = "all-linear",
            calib: int = 256, gradient_max_rank: int | None = None, format: str | None = None,
            val_data: str | Path | None = None, max_length: int = 512, batch_size: int = 8,
            epochs: float | None = None, steps: int | None = None, sketch_check: bool = False,
            seed: int = 0, gradient_replay_mb: float | None = None,
            out: str | Path | None = None, dtype: str = "float32", device: str = "cpu",
            trust_remote_code: bool = False, offline: bool = False,
            progress: bool = True) -> Recommendation:
    """Per-layer and overall rank from the gradient spectrum, before training (`lorank
    analyze`): `recommend` with the gradient estimator alone. `gradient_max_rank`: the largest
    rank read per layer [min(64, the layer's dimensions)]; `gradient_replay_mb`: memory (MiB)
    that may replay the last pass instead of running it [2048; 0: never]."""
    return recommend(model, data, targets=targets, format=format, val_data=val_data,
                     max_length=max_length, batch_size=batch_size, epochs=epochs, steps=steps,
                     seed=seed, estimators=("gradient",), calib=calib,
                     gradient_max_rank=gradient_max_rank, sketch_check=sketch_check,
                     gradient_replay_mb=gradient_replay_mb, out=out, dtype=dtype,
                     device=device, trust_remote_code=trust_remote_code, progress=progress,
                     offline=offline)


def probe(model: str | LoadedModel, data: str | Path, *, val_data: str | Path | None = None,
          probe_rank: int = 64, budget: str | int | None = None, probe_method: str = "svd",
          lr: float | Sequence[float] = 1e-3, targets: str = "all-linear",
          format: str | None = None, max_length: int = 512, batch_size: int = 8,
          epochs: float | None = None, steps: int | None = None, seed: int = 0,
          out: str | Path | None = None, dtype: str = "float32", device: str = "cpu",
          trust_remote_code: bool = False, offline: bool = False,
          progress: bool = True) -> Recommendation:
    """One training run's rank–loss curve, and a rank from it alone (`lorank probe`):
    `recommend` with the capacity estimate and the probe, which trains at `probe_rank` and
    reads every rank below. `budget` (steps, or minutes as "10m"): default the planned run
    (`epochs`/`steps`), else about one epoch."""
    return recommend(model, data, targets=targets, format=format, val_data=val_data,
                     max_length=max_length, batch_size=batch_size, epochs=epochs, steps=steps,
                     seed=seed, estimators=("capacity", "probe"), budget=budget or "auto",
                     probe_method=probe_method, probe_rank=probe_rank, lr=lr, out=out,
                     dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                     progress=progress, offline=offline)


def sweep(model: str | LoadedModel, data: str | Path, *, ranks: list[int], lrs: list[float],
          seeds: list[int] = (0,), steps: int = 100, batch_size: int = 8, eval_every: int = 0,
          targets: str = "all-linear", format: str | None = None, val_data: str | Path | None = None,
          max_length: int = 512, lora_alpha: float | None = None, warmup_ratio: float = 0.1,
          storage: str | None = None, prune: bool = False, skip_margin: float | None = None,
          settle: bool = False,
          max_trials: int | None = None, gradient_checkpointing: bool = False,
          out: str | Path = "lorank-sweep", seed: int = 0, dtype: str = "float32",
          device: str = "cpu", trust_remote_code: bool = False, progress: bool = True,
          command: str | None = None, heartbeat: int | None = None, grace: int | None = None,
          offline: bool = False):
    """Independent LoRA runs over ranks x lrs x seeds (resumable; see `lorank.sweep`);
    `settle` then adds seeds where a rank's verdict hinges on seed noise (`settle_points`);
    `command`, the CLI line, is recorded in the study for reproduction. With a database
    server's `storage`, a worker beats every `heartbeat` seconds while it holds a trial, and a
    trial silent for `grace` seconds is failed and its point run again (defaults:
    `lorank.sweep.HEARTBEAT_INTERVAL`, `GRACE_PERIOD`). `offline`: as in `recommend`."""
    from lorank.sweep import (
        GRACE_PERIOD,
        HEARTBEAT_INTERVAL,
        SweepSpec,
        model_factory_from,
        run_sweep,
    )
    from lorank.train import DEFAULT_ALPHA

    for name, value, low in (("steps", steps, 1), ("batch-size", batch_size, 1),
                             ("eval-every", eval_every, 0), ("max-length", max_length, 1)):
        if value < low:
            raise LorankError(f"--{name} {value}: must be at least {low}")
    if lora_alpha is not None and not 0 < lora_alpha < math.inf:
        raise LorankError(f"--lora-alpha {lora_alpha:g}: must be positive")
    if skip_margin is not None and not skip_margin >= 0:
        raise LorankError(f"--skip-margin {skip_margin:g}: must be at least 0 (nats)")
    learning_rates(lrs, "--lrs")
    with output_dir_guard(out):  # a run that fails leaves no empty output folder behind
        out = ensure_writable(Path(out))
        loaded, prepared = prepare_inputs(model, data, format=format, val_data=val_data,
                                          max_length=max_length, seed=seed, dtype=dtype,
                                          device=device, trust_remote_code=trust_remote_code,
                                          offline=offline)
        target_set = resolve_targets(loaded.model, targets)
        for r in ranks:
            target_set.check_rank(r)
        recipe = {"target_modules": target_set.peft_target_modules,
                  "modules_to_save": target_set.modules_to_save or None,
                  "steps": steps, "batch_size": batch_size,
                  "eval_every": eval_every or max(1, steps // 4),
                  "lora_alpha": DEFAULT_ALPHA if lora_alpha is None else lora_alpha,
                  "use_rslora": True,
                  "warmup_ratio": warmup_ratio, "bf16": dtype in ("bfloat16", "bf16")}
        # only when on, so studies made before the option keep their identity
        if gradient_checkpointing:
            recipe["gradient_checkpointing"] = True
        spec = SweepSpec(ranks=list(ranks), lrs=list(lrs), seeds=list(seeds), recipe=recipe,
                         skip_margin=skip_margin, settle=settle)
        meta = {"model": loaded.source, "data": str(data), "data_hash": prepared.data_hash,
                "n_train": len(prepared.train), "n_val": len(prepared.val), "format": prepared.fmt,
                "targets": targets, "max_length": max_length, "split_seed": seed,
                "params": {str(r): target_set.params(r) for r in ranks}, "versions": versions(),
                "data_notes": prepared.notes}
        result = run_sweep(model_factory_from(loaded.model), prepared.train, prepared.val, spec, out,
                         pad_token_id=loaded.pad_token_id, storage=storage, prune=prune,
                         max_trials=max_trials, progress=progress, meta=meta, command=command,
                         heartbeat=HEARTBEAT_INTERVAL if heartbeat is None else heartbeat,
                         grace=GRACE_PERIOD if grace is None else grace)
        result.data_notes = prepared.notes
        return result


def _adapter_on_model(adapter: str | Path, data: str | Path, *, model: str | None,
                      format: str | None, val_data: str | Path | None, max_length: int,
                      batch_size: int, seed: int, dtype: str, device: str,
                      trust_remote_code: bool, offline: bool
                      ) -> tuple[LoadedModel, data_mod.PreparedData, torch.nn.Module]:
    """(loaded model, prepared data, the model with the adapter on it) for `inspect` and
    `shrink` with data: the base model is `model` or the adapter's own, the validation split
    is `recommend`'s (its seeded split, or `val_data`)."""
    from lorank.adapter_loss import attach_adapter, base_model_of

    for name, value in (("batch-size", batch_size), ("max-length", max_length)):
        if value < 1:
            raise LorankError(f"--{name} {value}: must be at least 1")
    loaded, prepared = prepare_inputs(base_model_of(adapter, model), data, format=format,
                                      val_data=val_data, max_length=max_length, seed=seed,
                                      dtype=dtype, device=device,
                                      trust_remote_code=trust_remote_code, offline=offline)
    return loaded, prepared, attach_adapter(loaded, adapter)


def _data_options_need_data(data: str | Path | None, model: str | None,
                            val_data: str | Path | None) -> None:
    if data is None and (model is not None or val_data is not None):
        raise LorankError(f"--{'model' if model is not None else 'val-data'} is used with "
                          "--data (the validation loss); give --data too")


def inspect(adapter: str | Path, *, tol: float = 0.1, data: str | Path | None = None,
            model: str | None = None, format: str | None = None,
            val_data: str | Path | None = None, max_length: int = 512, batch_size: int = 8,
            seed: int = 0, dtype: str = "float32", device: str = "cpu",
            trust_remote_code: bool = False, offline: bool = False,
            progress: bool = True) -> AdapterReport:
    """How much of its rank a trained PEFT LoRA adapter uses (`lorank inspect`).

    Always: per layer, from the saved factors, the effective rank and the rank that keeps the
    update within `tol` relative error, and a verdict. With `data`: the adapter on its base
    model (`model`, else its `base_model_name_or_path`), the validation loss truncated to each
    candidate rank (powers of two below its rank, then its rank) on `recommend`'s validation
    split, and whether it could be smaller or is saturated (`lorank.adapter_loss`). Returns an
    `AdapterReport`; bad input is one LorankError."""
    from lorank.adapter_loss import AdapterReport, loss_verdict, rank_losses
    from lorank.adapters import inspect_adapter, verdict

    layers = inspect_adapter(adapter)
    report = AdapterReport(layers, verdict(layers, tol))
    _data_options_need_data(data, model, val_data)
    if data is None:
        return report
    loaded, prepared, peft_model = _adapter_on_model(
        adapter, data, model=model, format=format, val_data=val_data, max_length=max_length,
        batch_size=batch_size, seed=seed, dtype=dtype, device=device,
        trust_remote_code=trust_remote_code, offline=offline)
    report.losses = rank_losses(peft_model, prepared.val, pad_token_id=loaded.pad_token_id,
                                batch_size=batch_size, progress=progress)
    report.loss_verdict = loss_verdict(report.losses, layers, tol)
    report.model, report.notes = loaded.source, list(prepared.notes)
    return report


def shrink(adapter: str | Path, out: str | Path, *, rank: int | None = None,
           tol: float | None = None, data: str | Path | None = None, model: str | None = None,
           format: str | None = None, val_data: str | Path | None = None, max_length: int = 512,
           batch_size: int = 8, seed: int = 0, dtype: str = "float32", device: str = "cpu",
           trust_remote_code: bool = False, offline: bool = False,
           progress: bool = True) -> dict[str, Any]:
    """Write a smaller adapter to `out` (`lorank shrink`; exactly one of `rank`, `tol`) and
    return `adapters.shrink_adapter`'s summary. With `data` (the model and split as in
    `inspect`) the summary's "loss" holds the validation loss of the original and of the
    written adapter, as PEFT loads it, and the change with its paired SE and tolerance; the
    model and data are checked before anything is written. Bad input is one LorankError."""
    from lorank.adapter_loss import shrunk_loss_change
    from lorank.adapters import check_shrink, shrink_adapter

    check_shrink(adapter, out, rank=rank, tol=tol)
    _data_options_need_data(data, model, val_data)
    if data is None:
        return shrink_adapter(adapter, out, rank=rank, tol=tol)
    ensure_writable(Path(out))
    loaded, prepared, peft_model = _adapter_on_model(
        adapter, data, model=model, format=format, val_data=val_data, max_length=max_length,
        batch_size=batch_size, seed=seed, dtype=dtype, device=device,
        trust_remote_code=trust_remote_code, offline=offline)
    summary = shrink_adapter(adapter, out, rank=rank, tol=tol)
    summary["loss"] = shrunk_loss_change(peft_model, out, prepared.val,
                                         pad_token_id=loaded.pad_token_id,
                                         batch_size=batch_size, progress=progress)
    summary["model"], summary["notes"] = loaded.source, list(prepared.notes)
    return summary
