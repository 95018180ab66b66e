"""The worker loop: run (or continue) the sweep until every point of its grid, and every settle
point, has its answer.

`run_sweep` opens the study, checks it belongs to this sweep and registers the worker. Each
step then settles dead workers' trials, enqueues what is missing, and pops, claims and runs
(or skips) one trial. When nothing is waiting but wanted points run elsewhere, the worker
polls until they finish or their worker dies. A storage outage ends no worker: once the
database answers again, the trial it held is settled (from its result file, or failed and
enqueued again to resume from its checkpoint) and the loop goes on. It returns `summarize`'s
result over every finished trial.
"""

from __future__ import annotations

import copy
import os
import socket
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from lorank.sweep.curve import dominated_reason, settle_points
from lorank.sweep.grid import SweepSpec, _key, _point_of
from lorank.sweep.liveness import _Heartbeat, _settle_dead, recover_interrupted, register_worker
from lorank.sweep.storage import (
    GRACE_PERIOD,
    HEARTBEAT_INTERVAL,
    _check_same_sweep,
    _Health,
    _retry,
    _transient,
    heartbeat_of,
    open_study,
    storage_url,
)
from lorank.sweep.summary import SweepResult, summarize
from lorank.sweep.trial_queue import (
    _claim,
    _n_finished,
    enqueue_missing,
    finished_records,
    pop_trial,
)
from lorank.sweep.trial_run import _run_trial, _skip
from lorank.util import progress_bar


def run_sweep(model_factory, train_examples: list[dict], val_examples: list[dict],
              spec: SweepSpec, out: Path, *, pad_token_id: int, storage: str | None = None,
              prune: bool = False, max_trials: int | None = None, progress: bool = True,
              meta: dict[str, Any] | None = None, command: str | None = None,
              heartbeat: int = HEARTBEAT_INTERVAL, grace: int = GRACE_PERIOD) -> SweepResult:
    """Run (or continue) the sweep; return every finished trial and the rank–loss curve.
    `command` (the CLI line) joins the study's list of the commands that worked on it, which
    sweep.json carries so that every result can be reproduced. `heartbeat` and `grace`
    (seconds) set the liveness check of a database server's storage (see `open_study`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    study = open_study(out, storage, prune, heartbeat=heartbeat, grace=grace)
    _check_same_sweep(study, spec, meta or {})
    commands = study.user_attrs.get("commands", [])
    if command and command not in commands:
        study.set_user_attr("commands", [*commands, command])
    worker = register_worker(out)
    try:
        return _work(study, spec, out, model_factory, train_examples, val_examples,
                     pad_token_id, max_trials, progress, storage_url(out, storage))
    finally:
        worker.unlink(missing_ok=True)


def _work(study, spec, out, model_factory, train_examples, val_examples, pad_token_id,
          max_trials, progress, url) -> SweepResult:
    """Run trials until every point of the grid (and settle point) is finished or this worker
    has run `max_trials`. A storage outage ends no worker: after the database is back, a
    trial this worker held and could not finish is settled (from its result file, or failed
    and enqueued again to resume from its checkpoint), and the loop goes on."""
    start, done_here = time.time(), 0
    total = len(spec.grid())
    timing = heartbeat_of(study)
    poll = min(5.0, float(timing[0])) if timing else 2.0
    held: list[int] = []  # the trial this worker holds, to settle after an outage
    args = (study, spec, out, model_factory, train_examples, val_examples, pad_token_id, url,
            held)
    with progress_bar(progress) as bar:
        task = bar.add_task("sweep", total=total, completed=_retry(_n_finished, study))
        while max_trials is None or done_here < max_trials:
            try:
                outcome = _work_once(*args)
                bar.update(task, completed=_n_finished(study))
            except Exception as err:
                if not _transient(err):
                    raise
                _Health.last_error = time.monotonic()
                _retry(_release, study, out, held)  # waits for the database to answer again
                continue
            if outcome == "done":
                break
            if outcome == "wait":  # others hold the rest: poll until they finish or die
                time.sleep(poll)
            done_here += outcome == "ran"
    return _retry(summarize, study, spec, out, wall_seconds=time.time() - start)


def _release(study: optuna.Study, out: Path, held: list[int]) -> None:
    """Settle the trials this worker held when a storage call failed, if still RUNNING."""
    for trial_id in list(held):
        t = study._storage.get_trial(trial_id)
        if t.state == TrialState.RUNNING:
            _settle_dead(study, out, t, "interrupted: storage unreachable")
        held.remove(trial_id)


def _wanted(study: optuna.Study, spec: SweepSpec) -> set[tuple]:
    """The points this worker would run and that have no answer yet: its grid and the settle
    points due now, less the finished ones."""
    finished = finished_records(study)
    return (({_key(p) for p in spec.grid()}
             | {_key(p) for p, _ in settle_points(finished, spec)})
            - {_key(t) for t in finished})


def _work_once(study, spec, out, model_factory, train_examples, val_examples, pad_token_id,
               url, held) -> str:
    """One step of a worker: settle dead workers' trials, enqueue what is missing, then pop
    and run (or skip) one trial. Returns "ran", "skipped", "wait" (nothing waiting but
    wanted points are running elsewhere) or "done"."""
    recover_interrupted(study, out)
    enqueue_missing(study, spec)  # a skip gone stale meanwhile runs after all
    if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        wanted = _wanted(study, spec)
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        return "wait" if any(_point_of(t) and _key(_point_of(t)) in wanted
                             for t in running) else "done"
    trial = pop_trial(study, url, out, spec)
    if trial is None:  # other workers took the waiting trials first
        return "skipped"
    held[:] = [trial._trial_id]
    try:
        with _Heartbeat(study, trial._trial_id) as beat:
            outcome = _hold(study, trial, spec, out, beat, model_factory, train_examples,
                            val_examples, pad_token_id)
    except optuna.exceptions.UpdateFinishedTrialError:  # this worker stalled past the grace
        outcome = "skipped"  # period: another worker failed its trial and runs the point
    held.clear()
    return outcome


def _hold(study, trial, spec, out, beat, model_factory, train_examples, val_examples,
          pad_token_id) -> str:
    """Claim the popped trial's point and run it, skip it, or retire the trial."""
    point = study._storage.get_trial_system_attrs(trial._trial_id).get("fixed_params")
    if point is None:  # not a queued point (none is sampled by this worker)
        trial.set_user_attr("status", "spurious: not a queued point")
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        return "skipped"
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())
    reasons = {_key(p): why for p, why in settle_points(finished_records(study), spec)} \
        if spec.settle else {}
    if _key(point) in reasons:
        trial.set_user_attr("settle_reason", reasons[_key(point)])
    elif _key(point) not in {_key(p) for p in spec.grid()}:  # queued by a wider grid
        # (a later worker whose grid has it enqueues it again: FAIL is not finished)
        trial.set_user_attr("status", "skipped: outside this worker's grid")
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        return "skipped"
    if not _claim(study, trial, point):
        trial.set_user_attr("status", "skipped: another trial has this point")
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        return "skipped"
    # the point stays in the queue's fixed params (and a user attr), not in suggested
    # params, so a later run can extend the grid without distribution clashes
    trial.set_user_attr("point", point)
    reason = dominated_reason(finished_records(study), spec, point)
    if reason is not None:
        _skip(study, trial, point, reason, out)
        return "skipped"
    _run_trial(study, trial, point, spec, model_factory, train_examples, val_examples,
               pad_token_id, out, beat)
    return "ran"


def model_factory_from(base_model) -> Any:
    """Each trial trains on a fresh copy of the loaded base model."""
    return lambda: copy.deepcopy(base_model)
