"""One grid point's run inside its trial: train it, report to the pruner, stop when another
worker has settled the trial, and store the answer.

The point's result file is written before its trial is settled, so a crash between the two
loses nothing (recovery finishes the trial from the file). A run whose trial was settled
elsewhere meanwhile (this worker stalled past the grace period) stores nothing and leaves the
point's checkpoints to the worker that now holds it. `_skip` settles a point without training
it, its record saying why.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import optuna
from transformers import TrainerCallback

from lorank.sweep.grid import FINISHED, _result_path, checkpoint_dir
from lorank.sweep.liveness import _Heartbeat
from lorank.sweep.storage import _backend, _retry
from lorank.sweep.trial_queue import _finish
from lorank.train import EvalPoint, ValLossEvaluator, train_lora
from lorank.util import atomic_write_text


class _PruningEvaluator:
    """Wraps the validation evaluator: reports to Optuna's pruner and stops pruned runs."""

    def __init__(self, inner: ValLossEvaluator, trial: optuna.Trial):
        self.inner, self.trial, self.pruned_at, self.lost = inner, trial, None, False
        self.reports: list[tuple[int, float]] = []

    def state_dict(self) -> dict[str, Any]:
        return {"reports": self.reports}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A run resumed from a checkpoint in a new trial: its earlier evaluations count for
        the pruner as if this trial had made them."""
        try:
            for step, value in state.get("reports", []):
                self._report(value, step)
        except optuna.exceptions.UpdateFinishedTrialError:  # settled by another worker
            self.lost = True

    def _report(self, value: float, step: int) -> None:
        _retry(self.trial.report, value, step)  # the run outlives a database restart
        self.reports.append((step, value))

    def __call__(self, model, step: int) -> EvalPoint:
        point = self.inner(model, step)
        try:
            if self.lost:
                raise optuna.exceptions.UpdateFinishedTrialError("settled elsewhere")
            self._report(point.val_loss, step)
        except optuna.exceptions.UpdateFinishedTrialError:  # settled by another worker
            self.lost = True
            point.stop, point.message = True, "trial settled by another worker"
            return point
        if _retry(self.trial.should_prune):
            self.pruned_at = step
            point.stop, point.message = True, "pruned"
        return point


class _StopWhenSettled(TrainerCallback):
    """Ends a run whose trial another worker has settled, before it writes another checkpoint
    into the point's checkpoint directory (which the worker that runs the point now owns)."""

    def __init__(self, beat: _Heartbeat, evaluator: _PruningEvaluator):
        self.beat, self.evaluator = beat, evaluator

    def on_step_end(self, args, state, control, **kwargs):
        lost = self.evaluator.lost or self.beat.settled.is_set()
        if lost or (control.should_save and self.beat.check()):
            self.evaluator.lost = True
            control.should_training_stop = True
            control.should_save = False
        return control


def _run_trial(study, trial, point, spec, model_factory, train_examples, val_examples,
               pad_token_id, out, beat: _Heartbeat | None = None) -> None:
    """Train one grid point; write its result file, then store it in the study. A run whose
    trial another worker settled meanwhile stores nothing and leaves the checkpoints alone."""
    config = spec.config(point)
    evaluator = _PruningEvaluator(
        ValLossEvaluator(val_examples, pad_token_id, config.eval_batch_size or config.batch_size),
        trial)
    beat = beat or _Heartbeat(study, trial._trial_id)
    checkpoints = checkpoint_dir(out, point)
    try:
        result = train_lora(model_factory, train_examples, val_examples, config,
                            pad_token_id=pad_token_id, evaluator=evaluator, progress=False,
                            out_dir=checkpoints, resume=True,
                            callbacks=[_StopWhenSettled(beat, evaluator)])
    except Exception:
        if evaluator.lost or beat.settled.is_set():  # its files went to the new holder
            return
        raise
    record = result.to_dict() | {"point": point, "trial": trial.number,
                                 "per_example": result.best_val_losses}
    if reason := trial.user_attrs.get("settle_reason"):
        record["settle_reason"] = reason
    if evaluator.lost or beat.check():  # re-enqueued; whoever holds it now stores the answer
        return
    if evaluator.pruned_at is not None:
        record["status"] = "pruned"
    if _store(study, trial, point, record, out):
        shutil.rmtree(checkpoints, ignore_errors=True)


def _skip(study: optuna.Study, trial: optuna.Trial, point: dict[str, Any], reason: str,
          out: Path) -> None:
    """Settle a point without training it; the record says why (kept like a run's)."""
    record = {"status": reason, "per_example": None, "curve": [], "wall_seconds": 0.0,
              "steps_done": 0, "trainable_params": None, "point": point, "trial": trial.number}
    _store(study, trial, point, record, out)


def _store(study: optuna.Study, trial: optuna.Trial, point: dict[str, Any],
           record: dict[str, Any], out: Path) -> bool:
    """Write the point's result file first (recovery reads it after a crash), then settle the
    trial. True when the trial holds this answer: stored here, or by another worker's recovery
    from the result file; False when that recovery failed it (its point runs again)."""
    path = _result_path(out, point)
    path.parent.mkdir(exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=1))
    try:
        _retry(_finish, study, trial._trial_id, record)
    except optuna.exceptions.UpdateFinishedTrialError:
        return bool(_retry(_backend(study).get_trial, trial._trial_id).user_attrs.get(FINISHED))
    return True
