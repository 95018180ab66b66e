"""Sweep: independent LoRA runs over ranks x learning rates x seeds, in an Optuna study.

The study lives in SQLite inside the output directory by default, or in any SQLAlchemy URL
(`--storage postgresql://...`) so many workers share one sweep. Every grid point is enqueued
once; a worker pops a waiting trial, claims it (two-phase, so two workers never train the same
point), trains it with the shared loop (`lorank.train.train_lora`) and stores the result with
its per-example validation losses. A worker keeps going until every point of its grid is
finished: when nothing is waiting it polls the trials other workers hold, fails those whose
worker died, re-enqueues their points and runs them. Finished trials are never lost or
repeated, and a re-enqueued point resumes from its run's last checkpoint (written at every
evaluation under `out/checkpoints/`, removed once the trial is stored).

Liveness: with SQLite (one machine) a trial's worker is dead when its recorded process on
this host is gone. With a database server (many machines) it is Optuna's heartbeat: the
worker records a beat for the trial it holds every `heartbeat` seconds from a thread that
runs while it trains, and a RUNNING trial whose last beat is older than `grace` seconds (by
the database's clock) is failed and its point re-enqueued. A worker that finds its own trial
settled elsewhere (it stalled past the grace period) stops without storing or checkpointing.
Storage calls that fail because the database is unreachable are retried for up to
`STORAGE_PATIENCE` seconds, so a database restart does not end a worker. Optional
successive-halving pruning (Optuna's pruner) stops weak runs early, and an optional margin
skips a later seed's run at a learning rate that already lost by that margin at the first seed.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import math
import os
import shutil
import socket
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import sqlalchemy.exc
from optuna.trial import TrialState
from transformers import TrainerCallback

from lorank.errors import LorankError
from lorank.estimators.base import Evidence
from lorank.plots import plot_learning_curves, plot_rank_curve
from lorank.scoring import curve_right_rank, hinging_ranks
from lorank.train import EvalPoint, TrainConfig, ValLossEvaluator, train_lora
from lorank.util import atomic_write_text, progress_bar

optuna.logging.set_verbosity(optuna.logging.WARNING)
STUDY_NAME = "lorank-sweep"
FINISHED = "finished"  # user attr: the grid point has its answer (ok, diverged or pruned)
SKIPPED = "skipped: dominated"  # status of a later seed's point settled by `dominated_reason`
HEARTBEAT_INTERVAL = 30  # seconds between the beats of a worker holding a trial (server storage)
GRACE_PERIOD = 180  # seconds without a beat after which a trial's worker counts as dead
STORAGE_PATIENCE = 600.0  # seconds a worker retries a storage call while the database is away


@dataclass
class SweepSpec:
    """The grid and the recipe every trial shares (a TrainConfig minus rank, lr and seed)."""

    ranks: list[int]
    lrs: list[float]
    seeds: list[int] = field(default_factory=lambda: [0])
    recipe: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields
    # nats: a later seed skips an lr that lost at the first seed by more (None: run everything)
    skip_margin: float | None = None
    # once the grid is done, add seeds at the best lr of every rank whose verdict hinges on
    # seed noise (`settle_points`), one at a time, up to MAX_SEEDS
    settle: bool = False

    def grid(self) -> list[dict[str, Any]]:
        """Seed-major: a sweep stopped part-way already has a whole rank-loss curve at seed 0."""
        return [{"rank": r, "lr": lr, "seed": s}
                for s in self.seeds for r in self.ranks for lr in self.lrs]

    def config(self, point: dict[str, Any]) -> TrainConfig:
        return TrainConfig.from_dict({**self.recipe, "rank": point["rank"],
                                      "learning_rate": point["lr"], "seed": point["seed"]})


def storage_url(out: Path, storage: str | None) -> str:
    """The study's storage: `storage` if given, else SQLite in the output directory."""
    return storage or f"sqlite:///{Path(out).resolve() / 'sweep.db'}"


def open_study(out: Path, storage: str | None, prune: bool, *,
               heartbeat: int = HEARTBEAT_INTERVAL, grace: int = GRACE_PERIOD) -> optuna.Study:
    """Create or load the study; an unusable storage URL is one clear error.

    A database server's storage gets Optuna's heartbeat (`heartbeat` seconds between beats,
    `grace` seconds before a silent trial counts as dead); SQLite's does not (its workers share
    one host and are checked by process id)."""
    url = storage_url(out, storage)
    if heartbeat < 1 or grace <= heartbeat:
        raise LorankError(f"--heartbeat {heartbeat} --grace {grace}: need heartbeat >= 1 "
                          "and grace > heartbeat (seconds)")
    beats = {} if _is_sqlite(url) else {"heartbeat_interval": int(heartbeat),
                                        "grace_period": int(grace)}
    pruner = (optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2)
              if prune else optuna.pruners.NopPruner())
    for attempt in range(6):  # workers starting together race to create the schema
        try:
            with host_lock(url, out), warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                rdb = optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url), **beats)
                return optuna.create_study(study_name=STUDY_NAME, storage=rdb,
                                           load_if_exists=True, direction="minimize",
                                           pruner=pruner)
        except Exception as err:  # sqlalchemy / driver errors vary; the user needs one line
            reason = str(err).splitlines()[0][:200]
            racing = ("already exists", "unique constraint", "locked", "duplicate key")
            if any(r in reason.lower() for r in racing) and attempt < 5:
                time.sleep(0.5 + attempt)
                continue
            raise LorankError(f"--storage {url}: cannot open the study storage ({reason})"
                              ) from None
    raise AssertionError("unreachable")


def _is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


@contextlib.contextmanager
def host_lock(url: str, out: Path):
    """Serialize a read-then-write between this host's workers when the storage is SQLite:
    it has no DDL locking (schema creation) and ignores SELECT ... FOR UPDATE, so two workers
    could both pop the same waiting trial in `study.ask()` and run it twice (seen in CI).
    Other databases lock the row themselves."""
    if not url.startswith("sqlite:///"):
        yield
        return
    lock_path = Path(out) / ".sweep.lock"
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _engine_kwargs(url: str) -> dict[str, Any]:
    # a server's pooled connections die when it restarts: test each before use
    return {"connect_args": {"timeout": 60}} if _is_sqlite(url) else {"pool_pre_ping": True}


class _Health:
    """When this process last saw the storage fail (monotonic seconds; 0: never)."""

    last_error = 0.0


def _transient(err: BaseException) -> bool:
    """A storage error that passes when the database is back (connection lost or refused,
    SQLite busy), as opposed to a bad request."""
    kinds = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)
    if isinstance(err, optuna.exceptions.StorageInternalError):
        err = err.__cause__ or err
    return isinstance(err, kinds)


def _retry(fn, *args, patience: float | None = None, **kwargs):
    """Call `fn`, retrying while the storage is unreachable, for up to `patience` seconds
    (STORAGE_PATIENCE by default); other errors, and the last transient one, propagate."""
    deadline = time.monotonic() + (STORAGE_PATIENCE if patience is None else patience)
    delay = 0.2
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            if not _transient(err):
                raise
            _Health.last_error = time.monotonic()
            if time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(2 * delay, 5.0)


def _backend(study: optuna.Study):
    """The study's RDBStorage (under Optuna's cache), read without the cache."""
    return getattr(study._storage, "_backend", study._storage)


def heartbeat_of(study: optuna.Study) -> tuple[int, int] | None:
    """(heartbeat, grace) seconds when the study's storage beats, else None (SQLite)."""
    rdb = _backend(study)
    interval = getattr(rdb, "heartbeat_interval", None)
    if interval is None:
        return None
    return int(interval), int(getattr(rdb, "grace_period", None) or 2 * interval)


class _Heartbeat:
    """Beats for one trial from a thread while this worker holds it (server storages).

    The first beat is recorded on entry, then one every heartbeat interval until exit, during
    training too. Each beat also reads the trial's state: once another worker has settled it
    (failed as stale after this worker stalled past the grace period), `settled` is set and
    the run stops. A failed beat (database away) is retried at the next interval. Without a
    heartbeat (SQLite) it does nothing and `settled` stays clear."""

    def __init__(self, study: optuna.Study, trial_id: int):
        self.rdb, self.trial_id = _backend(study), trial_id
        self.timing = heartbeat_of(study)
        self.settled = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _Heartbeat:
        if self.timing is not None:
            _retry(self.rdb.record_heartbeat, self.trial_id)
            self._thread = threading.Thread(target=self._beat, daemon=True,
                                            name=f"lorank-heartbeat-{self.trial_id}")
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def check(self) -> bool:
        """True once the trial is no longer running (settled elsewhere); False when unknown."""
        if self.timing is None or self.settled.is_set():
            return self.settled.is_set()
        try:
            if self.rdb.get_trial(self.trial_id).state != TrialState.RUNNING:
                self.settled.set()
        except Exception as err:
            if not _transient(err):
                raise
            _Health.last_error = time.monotonic()
        return self.settled.is_set()

    def _beat(self) -> None:
        assert self.timing is not None
        while not self._stop.wait(self.timing[0]):
            try:
                self.rdb.record_heartbeat(self.trial_id)
                self.check()
            except Exception:  # never end the beats: the next one may reach the database
                _Health.last_error = time.monotonic()


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


def _key(params: dict[str, Any]) -> tuple:
    return (int(params["rank"]), float(params["lr"]), int(params["seed"]))


def _point_of(trial: optuna.trial.FrozenTrial) -> dict[str, Any] | None:
    fixed = trial.system_attrs.get("fixed_params") or trial.params
    return fixed if fixed and {"rank", "lr", "seed"} <= set(fixed) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _worker_file(out: Path, host: str, pid: int) -> Path:
    return Path(out) / "workers" / f"{host}-{pid}"


def register_worker(out: Path) -> Path:
    """Mark this process as a live worker of the sweep (for orphan detection on this host)."""
    path = _worker_file(out, socket.gethostname(), os.getpid())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(str(time.time()))
    return path


def _other_live_workers(out: Path) -> bool:
    host, me = socket.gethostname(), os.getpid()
    for f in (Path(out) / "workers").glob(f"{host}-*"):
        pid = int(f.name.rsplit("-", 1)[1])
        if pid != me and _alive(pid):
            return True
    return False


def recover_interrupted(study: optuna.Study, out: Path, orphan_age: float = 600.0) -> int:
    """Settle RUNNING trials whose worker died (e.g. kill -9, or its machine went away): finish
    them from their result file when it was written, otherwise fail them so their point is
    enqueued again. Returns how many it settled.

    With a heartbeat (server storage) a trial is dead when its last beat is older than the
    grace period (Optuna's stale-trial check, on the database's clock), wherever its worker
    ran; `pop_trial` beats for a trial before it takes it, so this covers a worker killed
    between popping and its first beat too. None is judged while this process has seen the
    storage fail within the grace period (beats missed during an outage say nothing about the
    workers).

    With SQLite a trial is dead when its recorded worker (host, pid) on this host is gone, or is
    this very process (which recovers only between trials, so a trial marked with its pid is
    left from an earlier process that had the same pid). A trial with no worker recorded yet
    (killed between popping and marking) is dead when no other worker of this sweep lives on
    this host, or once it is older than `orphan_age` seconds.
    """
    host, n = socket.gethostname(), 0
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    # Look for live workers only after listing the trials: a worker registers before it asks
    # for a trial, so every trial listed above that still lacks a pid belongs to a worker whose
    # file is already there (checking first raced with a worker starting meanwhile).
    timing = heartbeat_of(study)
    if timing is None:
        others = _other_live_workers(out)
    else:
        stale = _stale_trial_ids(study, grace=timing[1]) if running else set()
    now = time.time()
    for t in running:
        attrs = t.user_attrs
        if timing is not None:
            dead = t._trial_id in stale
        elif "pid" in attrs:
            pid = int(attrs["pid"])
            dead = attrs.get("host") == host and (pid == os.getpid() or not _alive(pid))
        else:
            age = now - t.datetime_start.timestamp() if t.datetime_start else 0.0
            dead = not others or age > orphan_age
        if dead and _settle_dead(study, out, t, "interrupted"):
            n += 1
    return n


def _stale_trial_ids(study: optuna.Study, grace: int) -> set[int]:
    """RUNNING trials whose last heartbeat is older than the grace period (Optuna's check);
    none while this process has seen the storage fail within the grace period."""
    if _Health.last_error and time.monotonic() - _Health.last_error < grace:
        return set()
    return set(_backend(study)._get_stale_trial_ids(study._study_id))


def _settle_dead(study: optuna.Study, out: Path, t: optuna.trial.FrozenTrial,
                 status: str) -> bool:
    """Settle a RUNNING trial whose worker is gone: from its result file if it wrote one, else
    FAIL with `status` (its point is then enqueued again). False if another worker settled it
    first."""
    record = _result_file_record(out, t)
    try:
        if record is not None:
            _finish(study, t._trial_id, record)
        else:
            study._storage.set_trial_user_attr(t._trial_id, "status", status)
            study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    return True


def _point_name(point: dict[str, Any]) -> str:
    return f"r{point['rank']}_lr{point['lr']:g}_s{point['seed']}"


def _result_path(out: Path, point: dict[str, Any]) -> Path:
    return Path(out) / "trials" / f"{_point_name(point)}.json"


def checkpoint_dir(out: Path, point: dict[str, Any]) -> Path:
    """Where a grid point's run checkpoints at each evaluation, so a killed run resumes."""
    return Path(out) / "checkpoints" / _point_name(point)


def _result_file_record(out: Path, t: optuna.trial.FrozenTrial) -> dict[str, Any] | None:
    point = _point_of(t)
    path = _result_path(out, point) if point else None
    if path is None or not path.exists():
        return None
    record = json.loads(path.read_text())
    return record if record.get("trial") == t.number else None


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


def settle_points(finished: list[dict[str, Any]], spec: SweepSpec
                  ) -> list[tuple[dict[str, Any], str]]:
    """The settle rule: once every grid point has its answer, one more seed at the best lr of
    each rank whose verdict (within tolerance or not) could flip within its seed noise
    (`lorank.scoring.hinging_ranks`), with the reason; none at a rank with MAX_SEEDS seeds.
    Asked again after those run, it adds the next seed only where the verdict still hinges."""
    if not spec.settle:
        return []
    answered = {_key(t) for t in finished}
    if any(_key(p) not in answered for p in spec.grid()):
        return []
    curve = {r: row for r, row in rank_loss_curve(finished).items() if row}
    if len(curve) < 2:
        return []
    right = curve_right_rank(curve)
    seeds = {r: int(row["seeds"]) for r, row in curve.items()}
    points = []
    for rank, why in hinging_ranks(right, seeds).items():
        lr = curve[rank]["lr"]
        used = {t["seed"] for t in finished if t["rank"] == rank} | set(spec.seeds)
        points.append(({"rank": rank, "lr": lr, "seed": max(used) + 1},
                       f"settle: rank {rank} {why}"))
    return points


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


def dominated_reason(finished: list[dict[str, Any]], spec: SweepSpec,
                     point: dict[str, Any]) -> str | None:
    """Why a later seed's run at this point can be skipped, or None to run it.

    The rank-loss curve takes the best lr per rank by seed mean; an lr whose first-seed run lost
    to that rank's best first-seed run by more than `spec.skip_margin` nats cannot win unless
    its second seed moves by more than the margin. Only decided once every lr of the rank has
    finished at the first seed, and only against runs that finished ok."""
    first = spec.seeds[0]
    if spec.skip_margin is None or point["seed"] == first:
        return None
    at_first = {t["lr"]: t for t in finished if t["rank"] == point["rank"] and t["seed"] == first}
    mine = at_first.get(point["lr"])
    if set(at_first) < set(spec.lrs) or mine is None or mine["status"] != "ok":
        return None
    best = min((t for t in at_first.values() if t["status"] == "ok"), key=lambda t: t["value"])
    gap = mine["value"] - best["value"]
    if gap <= spec.skip_margin or _best_lr(finished, point["rank"]) == point["lr"]:
        return None
    return (f"{SKIPPED} (seed {first}: {mine['value']:.4f} against "
            f"{best['value']:.4f} at lr {best['lr']:g}, gap {gap:.3f} > {spec.skip_margin:g})")


def _best_lr(finished: list[dict[str, Any]], rank: int) -> float | None:
    """The rank's best lr so far by the seed mean of its finished runs' losses."""
    values: dict[float, list[float]] = {}
    for t in finished:
        if t["rank"] == rank and t["status"] == "ok":
            values.setdefault(t["lr"], []).append(t["value"])
    return min(values, key=lambda lr: np.mean(values[lr])) if values else None


def _stale_skip(record: dict[str, Any], records: list[dict[str, Any]]) -> bool:
    """A skip no longer holds once its lr leads its rank by seed mean (the first-seed winner's
    later seed did badly): the curve needs every seed at the best lr, so the point runs."""
    return (str(record["status"]).startswith(SKIPPED)
            and _best_lr(records, record["rank"]) == record["lr"])


def _settled(study: optuna.Study) -> set[int]:
    """Numbers of the trials whose point has its answer (finished, and not a stale skip)."""
    return {t["number"] for t in finished_records(study)}


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


@dataclass
class SweepResult:
    trials: list[dict[str, Any]]
    curve: dict[int, dict[str, Any]]
    out: str
    wall_seconds: float
    data_notes: list[str] = field(default_factory=list)  # which split went where (api.sweep)

    def to_dict(self) -> dict[str, Any]:
        return {"trials": self.trials, "curve": {str(k): v for k, v in self.curve.items()},
                "out": self.out, "wall_seconds": self.wall_seconds}


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


def _n_finished(study: optuna.Study) -> int:
    return len({_key(t) for t in finished_records(study)})


def _check_same_sweep(study: optuna.Study, spec: SweepSpec, meta: dict[str, Any]) -> None:
    """A study belongs to one dataset and recipe: refuse to mix results from another."""
    identity = {"recipe": spec.recipe, **{k: meta[k] for k in ("data_hash", "model") if k in meta}}
    stored = study.user_attrs.get("identity")
    if stored is None:
        study.set_user_attr("identity", identity)
        study.set_user_attr("meta", meta)
    elif json.dumps(stored, sort_keys=True) != json.dumps(identity, sort_keys=True):
        raise LorankError("this sweep's study was made with another model, dataset or recipe; "
                          "use a new --out (or --storage) for a different sweep")


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


def summarize(study: optuna.Study, spec: SweepSpec, out: Path | None = None,
              wall_seconds: float = 0.0) -> SweepResult:
    """Per trial records and the rank–loss curve: L(r) = min over lr of the seed-mean loss."""
    trials = finished_records(study)
    curve = rank_loss_curve(trials)
    result = SweepResult(trials, curve, str(out) if out else "", wall_seconds)
    if out is not None and trials:
        atomic_write_text(Path(out) / "sweep.json", json.dumps(
            result.to_dict() | {"spec": asdict(spec), "meta": study.user_attrs.get("meta", {}),
                                "commands": study.user_attrs.get("commands", [])},
            indent=1))
        if curve:
            plot_rank_curve({"sweep": curve}, Path(out) / "rank_loss.png",
                            title="sweep: best validation loss per rank")
            plot_learning_curves(trials, curve, Path(out) / "learning_curves.png")
    return result


def rank_loss_curve(trials: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Best learning rate per rank (by seed-mean loss), with its per-example losses and spread.

    `per_example` is the seed-mean of per-example losses at that lr (paired across ranks),
    `se` the standard error over examples, `seed_sd` the SD of the seeds' mean losses.
    """
    ok = [t for t in trials if t["status"] == "ok" and t["per_example"]]
    curve: dict[int, dict[str, Any]] = {}
    for rank in sorted({t["rank"] for t in ok}):
        best = None
        for lr in sorted({t["lr"] for t in ok if t["rank"] == rank}):
            runs = [t for t in ok if t["rank"] == rank and t["lr"] == lr]
            per_ex = np.mean([np.asarray(t["per_example"], float) for t in runs], axis=0)
            loss = float(np.nanmean(per_ex))
            if best is None or loss < best["loss"]:
                seed_means = [float(np.nanmean(t["per_example"])) for t in runs]
                best = {"loss": loss, "lr": lr, "seeds": len(runs),
                        "se": float(np.nanstd(per_ex, ddof=1) / math.sqrt(len(per_ex))),
                        "seed_sd": float(np.std(seed_means, ddof=1)) if len(runs) > 1 else 0.0,
                        "per_example": per_ex.tolist()}
        curve[rank] = best
    return curve


def sweep_evidence(out: Path, data_hash: str | None = None) -> Evidence:
    """A finished (or part-done) sweep as Evidence for `recommend`: the measured curve, which
    `decide` trusts above every estimate. Refuses a sweep made on other data."""
    path = Path(out) / "sweep.json"
    try:
        sweep = json.loads(path.read_text())
        curve = {int(r): row for r, row in sweep["curve"].items() if row}
    except FileNotFoundError:
        raise LorankError(f"{path}: not found (run `lorank sweep --out {out}` first)") from None
    except (json.JSONDecodeError, KeyError, AttributeError, ValueError) as err:
        raise LorankError(f"{path}: not a lorank sweep summary ({err})") from None
    if not curve:
        raise LorankError(f"{path}: no finished run yet")
    stored = (sweep.get("meta") or {}).get("data_hash")
    if data_hash and stored and stored != data_hash:
        raise LorankError(f"{path}: this sweep was run on other data (data hash {stored[:12]}, "
                          f"this data {data_hash[:12]}); sweep this dataset or pass its own")
    right = curve_right_rank(curve)
    r_star, best = right.r_star, right.best_rank
    spec = sweep.get("spec") or {}
    grid = len(spec.get("ranks", [])) * len(spec.get("lrs", [])) * len(spec.get("seeds", []))
    trials = sweep.get("trials", [])
    complete = grid > 0 and len(trials) >= grid
    lr = curve[r_star]["lr"]
    return Evidence(
        name="sweep", kind="curve", suggested_rank=r_star, interval=(r_star, best),
        per_rank={r: f"{row['loss']:.4f} ±{row['se']:.4f} lr {row['lr']:g}"
                  for r, row in sorted(curve.items())},
        curve={r: {"loss": row["loss"], "se": row["se"], "lo": row["loss"] - 1.96 * row["se"],
                   "hi": row["loss"] + 1.96 * row["se"], "n": len(row["per_example"])}
               for r, row in sorted(curve.items())},
        assumptions=["one independent run per rank, learning rate and seed with the sweep's "
                     "recipe; L(r) is the seed-mean loss at rank r's best learning rate"],
        notes=[f"best rank {best} (loss {right.L_best:.4f}); rank {r_star} is within "
               f"{right.tol[r_star]:.4f} of it: train it at lr {lr:g}, its best in the sweep"]
        + ([] if complete else [f"the sweep is incomplete ({len(trials)} of {grid} runs)"]),
        details={"confidence": "high" if complete and min(
                     row["seeds"] for row in curve.values()) > 1 else "medium",
                 "tol": right.tol[r_star], "truth": right.to_dict(),
                 "best_lr": {r: row["lr"] for r, row in sorted(curve.items())},
                 "n_trials": len(trials), "grid": grid, "sweep": str(out),
                 "recipe": spec.get("recipe", {})},  # its scaling rule goes into the export
        cost_seconds=float(sum(t.get("wall_seconds") or 0.0 for t in trials)),
    )


def model_factory_from(base_model) -> Any:
    """Each trial trains on a fresh copy of the loaded base model."""
    return lambda: copy.deepcopy(base_model)
