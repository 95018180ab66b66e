"""The study as a queue of grid points: which points have their answer, enqueueing the
missing ones, popping a waiting trial, claiming its point and storing its answer.

A point has its answer when one of its trials carries `FINISHED` (ok, diverged, pruned or
skipped); a skip stops counting once its lr leads its rank or its point has run since
(`finished_records`). `enqueue_missing` adds every grid and settle point with no finished,
running or waiting trial. `pop_trial` takes one waiting trial under the host lock, points
that resume from a checkpoint first. `_claim` is the two-phase claim that keeps two trials
from training one point. `_finish` stores a result record: attributes first, then the state.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from lorank.sweep.curve import _stale_skip, settle_points
from lorank.sweep.grid import FINISHED, SKIPPED, SweepSpec, _key, _point_of, checkpoint_dir
from lorank.sweep.storage import _backend, heartbeat_of, host_lock


def _finish(study: optuna.Study, trial_id: int, record: dict[str, Any]) -> None:
    """Store a finished trial's result (attributes first, then the final state)."""
    storage = study._storage
    for key in ("status", "per_example", "curve", "wall_seconds", "steps_done",
                "trainable_params"):
        storage.set_trial_user_attr(trial_id, key, record[key])
    storage.set_trial_user_attr(trial_id, FINISHED, True)
    if record["status"] == "pruned":
        storage.set_trial_state_values(trial_id, state=TrialState.PRUNED)
    elif record["status"] == "ok":
        storage.set_trial_state_values(trial_id, state=TrialState.COMPLETE,
                                       values=[record["best_val_loss"]])
    else:
        storage.set_trial_state_values(trial_id, state=TrialState.FAIL)


def finished_records(study: optuna.Study) -> list[dict[str, Any]]:
    """One record per finished trial (its point, status, value, losses and cost); a skip that
    no longer holds (`_stale_skip`) or whose point has run since is not finished."""
    trials = []
    for t in study.get_trials(deepcopy=False):
        point = _point_of(t)
        if point is None or not t.user_attrs.get(FINISHED):
            continue
        trials.append({"number": t.number, **point, "status": t.user_attrs.get("status"),
                       "value": t.value, "per_example": t.user_attrs.get("per_example"),
                       "wall_seconds": t.user_attrs.get("wall_seconds"),
                       "curve": t.user_attrs.get("curve"),
                       "steps_done": t.user_attrs.get("steps_done"),
                       "trainable_params": t.user_attrs.get("trainable_params"),
                       **({"settle_reason": t.user_attrs["settle_reason"]}
                          if t.user_attrs.get("settle_reason") else {})})
    run = {_key(t) for t in trials if not str(t["status"]).startswith(SKIPPED)}
    return [t for t in trials if not (str(t["status"]).startswith(SKIPPED)
                                      and (_key(t) in run or _stale_skip(t, trials)))]


def _settled(study: optuna.Study) -> set[int]:
    """Numbers of the trials whose point has its answer (finished, and not a stale skip)."""
    return {t["number"] for t in finished_records(study)}


def _n_finished(study: optuna.Study) -> int:
    return len({_key(t) for t in finished_records(study)})


def enqueue_missing(study: optuna.Study, spec: SweepSpec) -> int:
    """Enqueue every grid point (and settle point) that has no finished, running or waiting
    trial."""
    settled = _settled(study)
    covered = set()
    for t in study.get_trials(deepcopy=False):
        point = _point_of(t)
        if point is None:
            continue
        if t.state in (TrialState.RUNNING, TrialState.WAITING) or t.number in settled:
            covered.add(_key(point))
    n = 0
    extra = [p for p, _ in settle_points(finished_records(study), spec)] if spec.settle else []
    for point in spec.grid() + extra:
        if _key(point) not in covered:
            study.enqueue_trial(point, skip_if_exists=False)
            n += 1
    return n


def pop_trial(study: optuna.Study, url: str, out: Path,
              spec: SweepSpec | None = None) -> optuna.Trial | None:
    """Pop a waiting trial under the host lock, so that each is popped once.

    With `spec`, points whose interrupted run left a checkpoint go first, then the grid's
    (seed-major) order: a point re-enqueued after a kill resumes at once instead of at the end
    of the queue; None when other workers took every waiting trial first. With a heartbeat
    the trial gets a beat just before it is taken, so a worker that dies at once still leaves
    a trial that goes stale. Without `spec`, `study.ask()`'s first-queued order (a sampled
    trial when nothing is waiting)."""
    beats = heartbeat_of(study) is not None
    with host_lock(url, out):
        if spec is not None:
            order = {_key(p): i for i, p in enumerate(spec.grid())}

            def priority(t: optuna.trial.FrozenTrial) -> tuple:
                point = _point_of(t)
                if point is None:
                    return (1, len(order), t.number)
                resumes = checkpoint_dir(out, point).is_dir()
                return (0 if resumes else 1, order.get(_key(point), len(order)), t.number)

            waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
            for t in sorted(waiting, key=priority):
                if beats:
                    _backend(study).record_heartbeat(t._trial_id)
                try:  # as optuna's own pop: False or an error when another worker took it
                    if study._storage.set_trial_state_values(t._trial_id,
                                                             state=TrialState.RUNNING):
                        return optuna.Trial(study, t._trial_id)
                except optuna.exceptions.UpdateFinishedTrialError:
                    continue
            return None
        with warnings.catch_warnings():  # the heartbeat beats from `_Heartbeat`, not optimize()
            warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used")
            return study.ask()


def _claim(study: optuna.Study, trial: optuna.Trial, point: dict[str, Any]) -> bool:
    """Two-phase claim of a grid point: False if another trial has it (or already finished it)."""
    def rivals() -> list[optuna.trial.FrozenTrial]:
        return [t for t in study.get_trials(deepcopy=False)
                if t.number != trial.number and _point_of(t) is not None
                and _key(_point_of(t)) == _key(point)]

    settled = _settled(study)

    def holds(t: optuna.trial.FrozenTrial) -> bool:  # an interrupted (FAIL) claim holds nothing
        return bool(t.number in settled
                    or (t.user_attrs.get("claimed") and t.state == TrialState.RUNNING))

    if any(holds(t) for t in rivals()):
        return False
    trial.set_user_attr("claimed", True)
    return not any(t.user_attrs.get("claimed") and t.state == TrialState.RUNNING
                   and t.number < trial.number for t in rivals())
