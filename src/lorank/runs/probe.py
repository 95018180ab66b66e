"""The one-run probe: its budget and learning rates, its checkpoint under OUT/ (so an
interrupted probe resumes), the pilot, the run and its cost (`lorank probe`)."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from lorank import data as data_mod
from lorank.errors import LorankError
from lorank.estimators.base import Evidence
from lorank.export import ensure_writable
from lorank.models import LoadedModel
from lorank.planned_run import step_seconds
from lorank.runs.inputs import kept_measurements
from lorank.targets import TargetSet
from lorank.util import Kept, atomic_write_text


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
