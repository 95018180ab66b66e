"""Which workers are alive, and settling the trials of those that are not.

With a database server, the worker holding a trial beats for it from a thread
(`_Heartbeat`), and a trial whose last beat is older than the grace period (by the database's
clock) is dead, wherever its worker ran. With SQLite, each worker registers a file under
`out/workers/` (`register_worker`) and a trial is dead when its recorded process on this host
is gone. `recover_interrupted` settles the dead trials: finished from the point's result file
where the run wrote one, else failed so that the point is enqueued again.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from lorank.sweep.grid import _point_of, _result_path
from lorank.sweep.storage import _backend, _Health, _retry, _transient, heartbeat_of
from lorank.sweep.trial_queue import _finish


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


def _result_file_record(out: Path, t: optuna.trial.FrozenTrial) -> dict[str, Any] | None:
    point = _point_of(t)
    path = _result_path(out, point) if point else None
    if path is None or not path.exists():
        return None
    record = json.loads(path.read_text())
    return record if record.get("trial") == t.number else None
