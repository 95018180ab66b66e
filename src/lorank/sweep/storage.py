"""The study's storage: SQLite in the output directory, or any SQLAlchemy URL shared by many
workers, and storage calls that outlast the database going away.

`open_study` creates or loads the sweep's one study (`STUDY_NAME`); a database server's storage
gets Optuna's heartbeat (`heartbeat` seconds between beats, `grace` seconds before a silent
trial counts as dead) and SQLite's does not (`heartbeat_of` tells which). `host_lock`
serializes a read-then-write between this host's workers where SQLite cannot lock rows.
`_retry` repeats a call that failed because the database is unreachable, for up to
`STORAGE_PATIENCE` seconds, and notes the failure in `_Health`, which the stale-trial check
reads. `_check_same_sweep` refuses to mix results from another model, dataset or recipe into
a study.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc

from lorank.errors import LorankError
from lorank.sweep.grid import SweepSpec

optuna.logging.set_verbosity(optuna.logging.WARNING)
STUDY_NAME = "lorank-sweep"
HEARTBEAT_INTERVAL = 30  # seconds between the beats of a worker holding a trial (server storage)
GRACE_PERIOD = 180  # seconds without a beat after which a trial's worker counts as dead
STORAGE_PATIENCE = 600.0  # seconds a worker retries a storage call while the database is away


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
