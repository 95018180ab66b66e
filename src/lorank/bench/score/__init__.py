"""Bench: score every method on every task against the sweep's ground truth, from disk.

Layout: `RESULTS/<task>/sweep.json` (written by `lorank sweep --task`), and
`RESULTS/<task>/estimators/<name>.json` (Evidence written by `lorank bench --run`). Scoring
reads only these files, so re-scoring a new estimator costs no re-training.

Methods that pick one rank for all layers are scored from the sweep's curve at no extra cost.
Search baselines (Optuna TPE, successive halving) are replayed on the sweep's recorded runs:
every run is deterministic from its seed, so replaying a sampler over the recorded outcomes
is what running it would have produced, at the cost it would have spent.

Modules, lowest first (each imports only those before it): `truth` (the stored sweep, r* and
how sure it is, which sweeps are complete), `replays` (search baselines and single-lr
ceilings replayed on the recorded runs), `gradient_rules` (every gradient-spectrum variant,
leave-one-task-out), `calibration` (the capacity fit's rows), `method_rows` (every method's
row on a task, and over tasks), `tables` (the generated block of BENCHMARKS.md),
`estimator_runs` (running lorank's estimators on a task), `run` (`run_bench`). Every name
callers use is re-exported here, so `lorank.bench.score.X` keeps working.
"""

from lorank.bench.score.calibration import calibration_rows
from lorank.bench.score.estimator_runs import BENCH_ESTIMATORS, run_task_estimators
from lorank.bench.score.gradient_rules import RULE_QUANTILES, gradient_rule_picks, select_rule
from lorank.bench.score.method_rows import (
    FIXED,
    LAYERWISE_LABELS,
    held_out_capacity_pick,
    overall,
    probe_cost_split,
    rule_of_thumb,
    score_layerwise,
    score_task,
    spearman,
)
from lorank.bench.score.replays import (
    replay_lr_pilot,
    replay_successive_halving,
    replay_tpe,
    single_lr_picks,
    tpe_budget,
)
from lorank.bench.score.run import probe_curves, run_bench
from lorank.bench.score.tables import END, START, markdown_tables, rule_tables, update_markdown
from lorank.bench.score.truth import (
    full_sweep_steps,
    load_sweep,
    params_table,
    pending_tasks,
    seconds_per_step,
    seed_losses,
    sweep_gap,
    truth,
    truth_report,
)

__all__ = [
    "BENCH_ESTIMATORS",
    "END",
    "FIXED",
    "LAYERWISE_LABELS",
    "RULE_QUANTILES",
    "START",
    "calibration_rows",
    "full_sweep_steps",
    "gradient_rule_picks",
    "held_out_capacity_pick",
    "load_sweep",
    "markdown_tables",
    "overall",
    "params_table",
    "pending_tasks",
    "probe_cost_split",
    "probe_curves",
    "replay_lr_pilot",
    "replay_successive_halving",
    "replay_tpe",
    "rule_of_thumb",
    "rule_tables",
    "run_bench",
    "run_task_estimators",
    "score_layerwise",
    "score_task",
    "seconds_per_step",
    "seed_losses",
    "select_rule",
    "single_lr_picks",
    "spearman",
    "sweep_gap",
    "tpe_budget",
    "truth",
    "truth_report",
    "update_markdown",
]
