"""The Python API: the same verbs as the CLI (`lorank.recommend(...)` == `lorank recommend`)."""

from __future__ import annotations

import json
import math
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lorank import data as data_mod
from lorank.decide import Recommendation, candidate_ranks, decide
from lorank.errors import LorankError
from lorank.estimators.base import Evidence
from lorank.estimators.capacity import (
    capacity_evidence,
    frozen_head_bits,
    head_sample,
    load_calibration,
)
from lorank.export import ensure_writable, write_outputs
from lorank.models import LoadedModel, load_model, model_fingerprint
from lorank.planned_run import PlannedRun, step_seconds
from lorank.targets import TargetSet, resolve_targets
from lorank.util import KEPT_DIR, Kept, atomic_write_text, output_dir_guard

if TYPE_CHECKING:
    from lorank.adapter_loss import AdapterReport

# the calibrated capacity estimate decides by default; the gradient spectrum (`analyze`, or
# estimators=("capacity", "gradient")) is reported beside it only when asked: its count has not
# tracked r* on the benchmark, and it costs about three passes
DEFAULT_ESTIMATORS: tuple[str, ...] = ("capacity",)


def versions() -> dict[str, str]:
    """Software versions recorded with every result."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("lorank", "torch", "transformers", "peft", "datasets", "optuna"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_inputs(model: str | LoadedModel, data: str | Path, *, fmt: str | None = None,
                   val_data: str | Path | None = None, max_length: int = 512, seed: int = 0,
                   dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False,
                   offline: bool = False) -> tuple[LoadedModel, data_mod.PreparedData]:
    """Load the model and the data together (the data decides the classification label count).

    A hub model id or `datasets` name downloads into the Hugging Face cache when missing;
    `offline` (or HF_HUB_OFFLINE) reads the cache only."""
    records = data_mod.read_data(data, fmt, val_source=val_data, offline=offline)
    fmt = records.fmt
    if isinstance(model, str):
        num_labels = None
        if fmt == "classification":
            label_ids = data_mod.label_vocabulary(records.train + (records.val or []))
            data_mod.check_labels(label_ids, records.train_from)  # before the model loads
            num_labels = len(label_ids)
        model = load_model(model, task="classification" if fmt == "classification" else None,
                           num_labels=num_labels, dtype=dtype, device=device,
                           trust_remote_code=trust_remote_code, seed=seed, offline=offline)
    if (fmt == "classification") != (model.task == "classification"):
        raise LorankError(f"{data}: format {fmt} does not fit a {model.task} model "
                          f"({model.source}); classification data needs an encoder/classifier")
    prepared = data_mod.prepare_records(records, model.tokenizer, max_length=max_length,
                                        seed=seed)
    return model, prepared


def recommend(model: str | LoadedModel, data: str | Path, *, targets: str = "all-linear",
              fmt: str | None = None, val_data: str | Path | None = None, max_length: int = 512,
              rank: int | None = None, max_rank: int = 256, batch_size: int = 8, seed: int = 0,
              epochs: float | None = None, steps: int | None = None, profile_sample: int = 64, estimators: tuple[str, ...] = DEFAULT_ESTIMATORS,
              budget: str | int | None = None, probe_method: str = "svd",
              probe_max_rank: int = 64, lr: float | Sequence[float] = 1e-3,
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
    or minutes as "10m") adds the one-run probe, trained at `lr` (several: a pilot picks one).
    `sweep` (a `lorank sweep --out` directory run on this data) adds its measured curve, which
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
        loaded, prepared = prepare_inputs(model, data, fmt=fmt, val_data=val_data,
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
        probe_opts = {"budget": budget, "method": probe_method, "max_rank": probe_max_rank,
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


def kept_measurements(out: str | Path | None, loaded: LoadedModel) -> Kept:
    """The finished measurements kept under OUT/cache/ for this model and this software (see
    `lorank.util.Kept`); without `out`, nothing is kept or reused."""
    if out is None:
        return Kept(None)
    software = {k: v for k, v in versions().items()
                if k in ("lorank", "torch", "transformers", "peft")}
    return Kept(Path(out) / KEPT_DIR, {"model": model_fingerprint(loaded), "software": software})


def measure_profile(prepared: data_mod.PreparedData, loaded: LoadedModel, kept: Kept, *,
                    sample: int = 64, batch_size: int = 8, seed: int = 0,
                    progress: bool = True) -> tuple[data_mod.DataProfile, float]:
    """`data.profile` of the prepared data, and the seconds it took; the base model's
    measurements on it (loss and speed) are reused from `kept` when they were made on the same
    samples with the same batch size (the seconds then are those they took), and kept
    otherwise."""
    start = time.perf_counter()
    picked = data_mod.profile_samples(prepared, sample=sample, batch_size=batch_size, seed=seed)
    key = {"speed": data_mod.data_hash(picked["speed"]), "loss": data_mod.data_hash(picked["loss"]),
           "batch_size": batch_size, "pad_token_id": loaded.pad_token_id}
    what = "forward speed" if prepared.task == "classification" else "base loss"
    measured = kept.load("base-model", key, what)
    prof = data_mod.profile(prepared, loaded.model, sample=sample, batch_size=batch_size,
                            pad_token_id=loaded.pad_token_id, progress=progress, seed=seed,
                            measured=measured)
    if measured is not None:
        return prof, float(measured["seconds"])
    seconds = time.perf_counter() - start
    kept.store("base-model", key, {name: getattr(prof, name)
                                   for name in data_mod.MODEL_MEASUREMENTS} | {"seconds": seconds})
    return prof, seconds


def run_estimator(name: str, loaded: LoadedModel, prepared: data_mod.PreparedData,
                  prof: data_mod.DataProfile, targets: TargetSet, ranks: list[int], *,
                  batch_size: int, seed: int, progress: bool, profile_seconds: float,
                  probe: dict[str, Any] | None = None, run: PlannedRun | None = None,
                  kept: Kept | None = None) -> Evidence:
    """Dispatch one estimator by name; `kept`: finished measurements to reuse and to keep."""
    kept = kept if kept is not None else Kept(None)
    if name == "capacity":
        start = time.perf_counter()
        head, head_seconds = None, 0.0
        if prepared.task == "classification":
            key = {"examples": data_mod.data_hash(head_sample(prepared.train, seed)),
                   "batch_size": batch_size, "seed": seed}
            stored = kept.load("head-bits", key, "frozen-feature head loss")
            if stored is not None:
                head, head_seconds = stored["head"], float(stored["seconds"])
            else:
                head = frozen_head_bits(loaded.model, prepared.train,
                                        pad_token_id=loaded.pad_token_id,
                                        batch_size=batch_size, seed=seed)
                head_seconds = time.perf_counter() - start
                kept.store("head-bits", key, {"head": head, "seconds": head_seconds})
        return capacity_evidence(prof, targets, ranks, run=run, head=head,
                                 calibration=load_calibration(),
                                 seconds=profile_seconds + head_seconds)
    if name == "gradient":
        gradient = (probe or {}).get("gradient", {})
        return run_gradient(loaded, prepared, targets, calib=gradient.get("calib", 256),
                            max_rank=gradient.get("max_rank"), batch_size=batch_size,
                            seed=seed, progress=progress, out=(probe or {}).get("out"),
                            sketch_check=gradient.get("sketch_check", False),
                            replay_mb=gradient.get("replay_mb"), kept=kept)
    if name == "probe":
        probe = probe or {}
        return run_probe(loaded, prepared, targets, prof, method=probe.get("method", "svd"),
                         max_rank=probe.get("max_rank", 64), budget=probe.get("budget"),
                         lr=probe.get("lr", 1e-3), batch_size=batch_size, seed=seed,
                         progress=progress, out=probe.get("out"), kept=kept)
    raise LorankError(f"--estimators {name}: unknown estimator (known: {', '.join(ESTIMATORS)})")


ESTIMATORS = ("capacity", "gradient", "probe")


@contextmanager
def _head_restored(model: torch.nn.Module, classification: bool) -> Iterator[None]:
    """Give the caller back the classification head it passed in, however the block ends.

    The analysis fits the head in place (`gradient_spectrum(fit_head=True)`); only the head's
    parameters are kept aside, not a copy of the whole model, which on an 8B model would
    double the memory the analysis needs."""
    if not classification:
        yield
        return
    from lorank.estimators.gradient import find_classification_head

    head = find_classification_head(model)[1]
    kept = {k: v.detach().clone() for k, v in head.state_dict().items()}
    try:
        yield
    finally:
        head.load_state_dict(kept)


def run_gradient(loaded: LoadedModel, prepared: data_mod.PreparedData, targets: TargetSet, *,
                 calib: int = 256, max_rank: int | None = None, batch_size: int = 8,
                 seed: int = 0, progress: bool = True, out: Path | None = None,
                 sketch_check: bool = False, replay_mb: float | None = None,
                 kept: Kept | None = None) -> Evidence:
    """Gradient spectrum on a seeded calibration sample: how many directions the data asks for.

    A classification model first gets its new head fitted on frozen features (in place, and
    given back as it was when the analysis ends): gradients through a random head are mostly
    noise. The finished spectrum is kept in `kept` (default: OUT/cache/ with `out`), and one
    kept there for the same model, calibration sample and options is reused, not measured
    again (`replay_mb` is not an option of the result: it only trades memory for time).
    """
    import random

    from lorank.estimators.gradient import REPLAY_MB, GradientSpectrum, gradient_spectrum
    from lorank.report import write_gradient_report

    if calib < 4:
        raise LorankError(f"--calib {calib}: need at least 4 examples (two per half)")
    replay_mb = REPLAY_MB if replay_mb is None else replay_mb
    if not replay_mb >= 0:
        raise LorankError(f"--replay-mb {replay_mb}: expected a size in MiB >= 0 (0: no replay)")
    if max_rank is None:
        max_rank = min(64, targets.max_rank)
    targets.check_rank(max_rank)
    sample = list(prepared.train)
    if len(sample) > calib:
        sample = random.Random(seed).sample(sample, calib)
    if len(sample) < 4:
        raise LorankError(f"calibration set has {len(sample)} examples: need at least 4 "
                          "(two per half)")
    start = time.perf_counter()
    model = loaded.model
    head_note = None
    fractions = (0.25, 0.5, 1.0) if len(sample) >= 16 else (0.5, 1.0) if len(sample) >= 8 \
        else (1.0,)
    classification = prepared.task == "classification"
    kept = kept if kept is not None else kept_measurements(out, loaded)
    names = [t.name for t in targets.layers]
    key = {"calibration": data_mod.data_hash(sample), "n_train": len(prepared.train),
           "targets": names, "max_rank": max_rank, "batch_size": batch_size, "seed": seed,
           "fractions": fractions, "sketch_check": sketch_check, "fit_head": classification,
           "pad_token_id": loaded.pad_token_id}
    stored = kept.load("gradient", key, "gradient spectrum")
    if stored is not None:
        spectrum = GradientSpectrum.from_dict(stored["spectrum"])
    else:
        with _head_restored(model, classification):
            try:
                spectrum = gradient_spectrum(model, sample, names,
                                             pad_token_id=loaded.pad_token_id, max_rank=max_rank,
                                             batch_size=batch_size, seed=seed,
                                             fractions=fractions, n_train=len(prepared.train),
                                             sketch_check=sketch_check, replay_mb=replay_mb,
                                             fit_head=classification, progress=progress)
            except ValueError as err:
                raise LorankError(str(err)) from None
    fit = spectrum.settings["head_fit"]
    if fit is not None:
        head_note = (f"head '{fit['head']}' fitted on frozen features first "
                     f"(loss {fit['loss_before']:.3f} -> {fit['loss_after']:.3f})")
    evidence = spectrum.to_evidence()
    evidence.name = "gradient"
    if head_note:
        evidence.notes.insert(0, head_note)
    if stored is not None:  # what measuring it cost, when it was measured
        evidence.cost_seconds = stored["cost_seconds"]
    else:
        evidence.cost_seconds = time.perf_counter() - start
        kept.store("gradient", key, {"spectrum": spectrum.to_dict(),
                                     "cost_seconds": evidence.cost_seconds})
    if out is not None:
        evidence.details["files"] = write_gradient_report(spectrum, ensure_writable(Path(out)))
    return evidence


def budget_form(budget: str | int | None) -> tuple[str, float] | None:
    """("steps", n) or ("minutes", m) for a budget given as "200" or "10m"; None for the
    default (about one epoch). Checked before anything loads, so a typo costs no measuring."""
    if budget is None or budget == "auto":
        return None
    text = str(budget).strip().lower()
    try:
        if text.endswith(("m", "min")):
            form = ("minutes", float(text.rstrip("min")))
        else:
            form = ("steps", float(int(text)))
    except ValueError:
        raise LorankError(f"--budget {budget}: expected training steps (200) or minutes (10m)"
                          ) from None
    if form[0] == "steps" and form[1] < 1:
        raise LorankError(f"--budget {budget}: must be at least one step")
    if not form[1] > 0 or math.isinf(form[1]):  # also NaN
        raise LorankError(f"--budget {budget}: expected a positive, finite number of minutes")
    return form


def parse_budget(budget: str | int | None, prof: data_mod.DataProfile, batch_size: int,
                 n_train: int) -> tuple[int, str]:
    """Training steps for a budget given as steps ("200") or minutes ("10m").

    Minutes become steps with the measured forward speed: one training step costs about three
    forward passes (forward + backward) over `batch_size` examples of median length.
    """
    form = budget_form(budget)
    if form is None:  # about one epoch, at least 20 steps
        steps = max(20, -(-n_train // batch_size))
        return steps, f"{steps} steps (about one epoch)"
    kind, value = form
    if kind == "steps":
        return int(value), f"{int(value)} steps"
    per_step = step_seconds(prof.forward_seconds_per_token, batch_size,
                            prof.length_percentiles["p50"])
    steps = max(1, int(value * 60 / max(per_step, 1e-6)))
    return steps, f"{value:g} min ≈ {steps} steps at {per_step:.2f} s/step (estimated)"


def check_probe_method(method: str) -> None:
    if method not in ("svd", "nested"):
        raise LorankError(f"--probe-method {method}: expected svd or nested")


def learning_rates(lr: float | Sequence[float], option: str = "--lr") -> list[float]:
    """The probe's learning rates, sorted and distinct; all positive and finite."""
    lrs = sorted({float(x) for x in lr}) if isinstance(lr, Sequence) else [float(lr)]
    if not lrs or not all(0 < x < math.inf for x in lrs):
        raise LorankError(f"{option} {lr}: expected one or more positive learning rates")
    return lrs


def probe_cost(wall: float, train_seconds: float, steps_done: int, eval_seconds: float,
               scored: int, *, steps: int, n_val: int) -> dict[str, float]:
    """The probe's cost in units that do not depend on how busy the machine was: training
    steps at its own measured pace, and as a multiple of one plain run at rank R with the
    same recipe (its `steps` plus one evaluation of every validation example at the end,
    priced at the probe's own seconds per scored example-rank pair)."""
    pace = train_seconds / max(1, steps_done)
    per_pair = eval_seconds / max(1, scored)
    one_run = steps * pace + n_val * per_pair
    return {"train_seconds": round(train_seconds, 2), "eval_seconds": round(eval_seconds, 2),
            "seconds_per_step": round(pace, 4), "cost_steps": round(wall / pace, 1),
            "one_run_steps": round(one_run / pace, 1),
            "cost_vs_one_run": round(wall / one_run, 3)}


PROBE_CHECKPOINT = "probe_checkpoint"  # under --out; removed once the probe has finished
PILOT_LOSSES = "pilot_losses.json"  # in the checkpoint: each pilot lr's loss as it finishes


def _holds_work(root: Path) -> bool:
    """Whether a probe checkpoint holds finished work: a training checkpoint or pilot losses."""
    return any(root.rglob("checkpoint-*")) or any(root.rglob(PILOT_LOSSES)) \
        or (root / "pilot.json").exists()


@contextmanager
def probe_checkpoint(out: Path | None, identity: dict[str, Any]
                     ) -> Iterator[tuple[Path, str | None]]:
    """The probe's working directory and, when it continues an interrupted probe, a note.

    With `out`, OUT/probe_checkpoint/ outlives an interruption so that the same command run
    again resumes (the CLI promises it); it holds `identity.json` (method, model, tokenized
    examples, recipe), and a checkpoint made for any other identity is discarded, never
    resumed. It is removed once the probe finishes (or fails for good: a LorankError); any
    other exception (Ctrl-C, SIGTERM, out of memory) keeps it, unless it holds no finished
    work yet. Without `out`, a temporary directory.
    """
    if out is None:
        with tempfile.TemporaryDirectory(prefix="lorank-probe-") as tmp:
            yield Path(tmp), None
        return
    root = Path(out) / PROBE_CHECKPOINT
    id_file = root / "identity.json"
    wanted = json.loads(json.dumps(identity, default=str))
    note = None
    if root.exists():
        try:
            same = json.loads(id_file.read_text()) == wanted
        except (OSError, ValueError):
            same = False
        if not same:
            shutil.rmtree(root)
            note = (f"a probe checkpoint in {root} was made with other inputs or settings: "
                    "discarded, the probe started afresh")
        elif _holds_work(root):
            note = f"continued the interrupted probe from its checkpoint in {root}"
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(id_file, json.dumps(wanted, indent=1))
    try:
        yield root, note
    except LorankError:
        shutil.rmtree(root, ignore_errors=True)
        raise
    except BaseException:
        if not _holds_work(root):  # nothing finished to continue from
            shutil.rmtree(root, ignore_errors=True)
        raise
    shutil.rmtree(root, ignore_errors=True)


def run_probe(loaded: LoadedModel, prepared: data_mod.PreparedData, targets: TargetSet,
              prof: data_mod.DataProfile, *, method: str = "svd", max_rank: int = 64,
              budget: str | int | None = None, lr: float | Sequence[float] = 1e-3,
              batch_size: int = 8, seed: int = 0, progress: bool = True,
              out: Path | None = None, kept: Kept | None = None) -> Evidence:
    """One training run at `max_rank`, read at every smaller rank (nested or SVD truncation).

    Several learning rates in `lr`: a pilot (a quarter of the schedule per lr) picks the one
    the probe trains at; its cost is part of the probe's. The SVD variant pilots at R itself
    and continues the winner's run (cost 1 + (k-1)/4 runs for k lrs); the nested one pilots
    at the middle candidate rank.

    With `out`, finished work outlives an interruption: each pilot lr's loss and the run's
    checkpoints (OUT/probe_checkpoint/, see `probe_checkpoint`), then the finished probe's
    Evidence in `kept` (default OUT/cache/), which the same probe run again reuses as it is.
    """
    import copy

    from lorank.estimators.probe import default_ranks
    from lorank.plots import plot_rank_curve
    from lorank.train import TrainConfig

    check_probe_method(method)
    max_rank = min(max_rank, targets.max_rank)
    targets.check_rank(max_rank)
    steps, budget_text = parse_budget(budget, prof, batch_size, len(prepared.train))
    lrs = learning_rates(lr)
    # the nested probe samples from the same list: both curves end at max_rank itself
    ranks = default_ranks(max_rank)
    config = TrainConfig(rank=max_rank, target_modules=targets.peft_target_modules,
                         modules_to_save=targets.modules_to_save or None, learning_rate=lrs[0],
                         steps=steps, batch_size=batch_size, seed=seed,
                         # the SVD variant reads its curve once, at the end; the nested one
                         # watches it (early stopping) four times
                         eval_every=steps if method == "svd" else max(1, steps // 4),
                         warmup_ratio=0.1)

    def factory():
        return copy.deepcopy(loaded.model)

    identity = {"method": method, "model": loaded.source, "model_path": loaded.path,
                "dtype": str(loaded.model.dtype), "lrs": lrs, "ranks": ranks,
                "examples": data_mod.data_hash(prepared.train + prepared.val),
                "config": config.to_dict()}
    kept = kept if kept is not None else kept_measurements(out, loaded)
    stored = kept.load("probe", identity, "probe curve")
    if stored is not None:
        evidence = Evidence.from_dict(stored)
        if out is not None:  # left behind when stopped between keeping and cleaning up
            shutil.rmtree(Path(out) / PROBE_CHECKPOINT, ignore_errors=True)
    else:
        # the checkpoint also belongs to the model's files (kept's common key holds them)
        with probe_checkpoint(out, identity | kept.common) as (work, resumed_note):
            evidence = _probe_in(work, resumed_note, factory, loaded, prepared, config,
                                 method=method, lrs=lrs, ranks=ranks, steps=steps,
                                 budget_text=budget_text, max_rank=max_rank,
                                 batch_size=batch_size, seed=seed, progress=progress,
                                 keep=out is not None)
            # kept before the checkpoint goes: the finished probe is never lost
            kept.store("probe", identity, evidence.to_dict())
    if out is not None:
        ensure_writable(out)
        plot_rank_curve({evidence.name: evidence.curve}, Path(out) / "probe_curve.png",
                        picks={evidence.name: evidence.suggested_rank},
                        title=f"{evidence.name}: validation loss per rank (one run)")
        evidence.details["files"] = {"probe_curve.png": "the probe's rank–loss curve"}
    return evidence


def _probe_in(work: Path, resumed_note: str | None, factory, loaded: LoadedModel,
              prepared: data_mod.PreparedData, config, *, method: str, lrs: list[float],
              ranks: list[int], steps: int, budget_text: str, max_rank: int,
              batch_size: int, seed: int, progress: bool, keep: bool) -> Evidence:
    """`run_probe`'s pilot, run and Evidence, in its working directory `work`; `keep`: leave
    checkpoints there for a rerun to continue from."""
    from lorank.estimators.probe import (
        SaveEvery,
        SVDCurveEvaluator,
        nested_probe,
        pick_learning_rate,
        pilot_rank,
    )
    from lorank.train import train_lora

    start = time.perf_counter()
    pilot_file = work / "pilot.json"
    pilot = json.loads(pilot_file.read_text()) if pilot_file.exists() else None
    if pilot is None and len(lrs) > 1:
        # SVD: the curve is read off one plain run at R, so the pilot runs at R, scores
        # each lr by that run truncated to the middle rank (where the decision is made),
        # and the winner's run is continued; nested: every rank trains, the pilot trains
        # the middle rank itself
        svd = method == "svd"
        pilot = pick_learning_rate(factory, prepared.train, prepared.val,
                                   pad_token_id=loaded.pad_token_id, config=config, lrs=lrs,
                                   rank=max_rank if svd else pilot_rank(ranks),
                                   read_at=pilot_rank(ranks) if svd else None,
                                   seed=seed, progress=progress,
                                   checkpoint_root=work / "pilot" if svd else None,
                                   record=work / PILOT_LOSSES)
        atomic_write_text(pilot_file, json.dumps(pilot))  # a resumed probe does not pilot again
    if pilot is not None:
        config = replace(config, learning_rate=pilot["learning_rate"])
    # checkpoints (every quarter, eval point or not) only where a re-run can find them
    saves = [SaveEvery(max(1, steps // 4))] if keep else []
    continued = False
    if method == "nested":
        result = nested_probe(factory, prepared.train, prepared.val,
                              pad_token_id=loaded.pad_token_id, config=config,
                              budget_steps=steps, max_rank=max_rank, seed=seed,
                              progress=progress, out_dir=work / "nested" if keep else None,
                              resume=keep, callbacks=saves)
    else:
        continued = pilot is not None and "checkpoint_dir" in pilot
        run_dir = Path(pilot["checkpoint_dir"]) if continued else work / "run"
        # the run's one evaluation, at its last step, is the truncation curve itself
        curve_eval = SVDCurveEvaluator(ranks, prepared.val, pad_token_id=loaded.pad_token_id,
                                       train_examples=prepared.train,
                                       batch_size=batch_size, seed=seed)
        trained = train_lora(factory, prepared.train, prepared.val, config,
                             pad_token_id=loaded.pad_token_id, progress=progress,
                             evaluator=curve_eval,
                             out_dir=run_dir if keep or continued else None,
                             resume=keep or continued, callbacks=saves)
        if curve_eval.result is None:
            raise LorankError(f"svd probe: the rank-{max_rank} run failed "
                              f"({trained.status}); try a lower --lr")
        result = curve_eval.result
        result.steps_done = trained.steps_done  # the curve reads this run's adapter
    evidence = result.to_evidence()
    evidence.cost_seconds = time.perf_counter() - start
    n_val = len(prepared.val)
    if method == "nested":
        run_parts = (result.wall_seconds - result.eval_seconds, result.steps_done,
                     result.eval_seconds, result.scored)
    else:
        # the run's eval seconds hold the curve (its last eval point) and, when continued from
        # the pilot, the pilot's one truncated score of its subsample
        first = pilot["n_val"] if continued else 0
        run_parts = (trained.wall_seconds - trained.eval_seconds, trained.steps_done,
                     trained.eval_seconds, first + result.scored)
    evidence.details["cost"] = probe_cost(evidence.cost_seconds, *run_parts, steps=steps,
                                          n_val=n_val)
    evidence.details["budget"] = budget_text
    evidence.details["steps"] = steps
    evidence.details["learning_rate"] = config.learning_rate
    if resumed_note:
        evidence.notes.append(resumed_note)
    if pilot is not None:
        pilot["continued"] = bool(pilot.pop("checkpoint_dir", None))  # a temp dir, now gone
        evidence.details["lr_pilot"] = pilot
        tried = ", ".join(f"{k}: {v:.4f}" for k, v in pilot["losses"].items())
        read = f", read truncated to rank {pilot['read_at']}" \
            if pilot["read_at"] != pilot["rank"] else ""
        evidence.notes.append(f"learning rate {config.learning_rate:g} chosen by a pilot at rank "
                              f"{pilot['rank']}{read} ({pilot['steps_each']} steps each; val "
                              f"loss {tried})")
    return evidence


def sweep(model: str | LoadedModel, data: str | Path, *, ranks: list[int], lrs: list[float],
          seeds: list[int] = (0,), steps: int = 100, batch_size: int = 8, eval_every: int = 0,
          targets: str = "all-linear", fmt: str | None = None, val_data: str | Path | None = None,
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
        loaded, prepared = prepare_inputs(model, data, fmt=fmt, val_data=val_data,
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
                      fmt: str | None, val_data: str | Path | None, max_length: int,
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
    loaded, prepared = prepare_inputs(base_model_of(adapter, model), data, fmt=fmt,
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
            model: str | None = None, fmt: str | None = None,
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
        adapter, data, model=model, fmt=fmt, val_data=val_data, max_length=max_length,
        batch_size=batch_size, seed=seed, dtype=dtype, device=device,
        trust_remote_code=trust_remote_code, offline=offline)
    report.losses = rank_losses(peft_model, prepared.val, pad_token_id=loaded.pad_token_id,
                                batch_size=batch_size, progress=progress)
    report.loss_verdict = loss_verdict(report.losses, layers, tol)
    report.model, report.notes = loaded.source, list(prepared.notes)
    return report


def shrink(adapter: str | Path, out: str | Path, *, rank: int | None = None,
           tol: float | None = None, data: str | Path | None = None, model: str | None = None,
           fmt: str | None = None, val_data: str | Path | None = None, max_length: int = 512,
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
        adapter, data, model=model, fmt=fmt, val_data=val_data, max_length=max_length,
        batch_size=batch_size, seed=seed, dtype=dtype, device=device,
        trust_remote_code=trust_remote_code, offline=offline)
    summary = shrink_adapter(adapter, out, rank=rank, tol=tol)
    summary["loss"] = shrunk_loss_change(peft_model, out, prepared.val,
                                         pad_token_id=loaded.pad_token_id,
                                         batch_size=batch_size, progress=progress)
    summary["model"], summary["notes"] = loaded.source, list(prepared.notes)
    return summary
