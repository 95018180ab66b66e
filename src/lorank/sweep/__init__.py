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

Modules, lowest first (each imports only those before it): `grid` (points, the recipe, a
point's files), `curve` (the rank–loss curve and the settle and skip rules), `storage`
(opening the study, the host lock, retries), `trial_queue` (finished records, enqueue, pop,
claim), `liveness` (heartbeat, registered workers, settling dead workers' trials), `summary`
(sweep.json, plots, Evidence), `trial_run` (one point's run in its trial), `worker` (the loop,
`run_sweep`). Every name callers use is re-exported here, so `lorank.sweep.X` keeps working;
a test that replaces a name patches the module that looks it up (`train_lora` in
`trial_run`, `_alive` in `liveness`).
"""

from lorank.sweep.curve import dominated_reason, rank_loss_curve, settle_points
from lorank.sweep.grid import FINISHED, SKIPPED, SweepSpec, checkpoint_dir
from lorank.sweep.liveness import recover_interrupted, register_worker
from lorank.sweep.storage import (
    GRACE_PERIOD,
    HEARTBEAT_INTERVAL,
    STORAGE_PATIENCE,
    STUDY_NAME,
    _Health,
    heartbeat_of,
    host_lock,
    open_study,
    storage_url,
)
from lorank.sweep.summary import SweepResult, summarize, sweep_evidence
from lorank.sweep.trial_queue import enqueue_missing, finished_records, pop_trial
from lorank.sweep.worker import model_factory_from, run_sweep

__all__ = [
    "FINISHED",
    "GRACE_PERIOD",
    "HEARTBEAT_INTERVAL",
    "SKIPPED",
    "STORAGE_PATIENCE",
    "STUDY_NAME",
    "SweepResult",
    "SweepSpec",
    "checkpoint_dir",
    "dominated_reason",
    "enqueue_missing",
    "finished_records",
    "heartbeat_of",
    "host_lock",
    "model_factory_from",
    "open_study",
    "pop_trial",
    "rank_loss_curve",
    "recover_interrupted",
    "register_worker",
    "run_sweep",
    "settle_points",
    "storage_url",
    "summarize",
    "sweep_evidence",
    # private, kept importable from here for the tests that read or set it
    "_Health",
]
