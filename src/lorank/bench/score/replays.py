"""Search baselines and single-lr ceilings replayed on a sweep's recorded runs.

Every run of the sweep is deterministic from its seed, so replaying a sampler over the
recorded outcomes is what running it would have produced, at the cost it would have spent:
Optuna TPE over (rank, lr) with a budget of full runs, successive halving on the recorded
learning curves, the probes' learning-rate pilot, and r* of the sweep's own curve at one lr
(the most a probe that trains at one lr could see). The search space is the recipe's grid.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import optuna

from lorank.errors import LorankError
from lorank.scoring import RightRank, curve_right_rank, score


def replay_tpe(sweep: dict[str, Any], budget_runs: int, seed: int = 0) -> tuple[int, int]:
    """Optuna TPE over (rank, lr) with `budget_runs` full runs, replayed on seed-0 outcomes."""
    spec = sweep["spec"]
    outcome = {(t["rank"], t["lr"]): t["value"] for t in sweep["trials"]
               if t["seed"] == spec["seeds"][0] and t["status"] == "ok"}
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(budget_runs, 10))
    study = optuna.create_study(direction="minimize", sampler=sampler)
    for _ in range(budget_runs):
        trial = study.ask()
        r = trial.suggest_categorical("rank", spec["ranks"])
        lr = trial.suggest_categorical("lr", spec["lrs"])
        value = outcome.get((r, lr))
        study.tell(trial, value if value is not None else float("inf"))
    best = study.best_trial.params
    return int(best["rank"]), budget_runs * int(spec["recipe"]["steps"])


def tpe_budget(probe_runs: list[float]) -> int:
    """Full runs TPE gets: what lorank's dearest probe spent on this task, in runs of the
    recipe, rounded up (a search cannot train part of a run); 2 when no probe was run."""
    return max(1, math.ceil(max(probe_runs) - 1e-9)) if probe_runs else 2


def _in_grid(trial: dict[str, Any], spec: dict[str, Any]) -> bool:
    return trial["rank"] in spec["ranks"] and any(
        math.isclose(trial["lr"], lr, rel_tol=1e-9) for lr in spec["lrs"])


def replay_successive_halving(sweep: dict[str, Any], eta: int = 2,
                              budget_steps: float | None = None, seed: int = 0
                              ) -> tuple[int, int, int]:
    """Successive halving over (rank, lr) on the recorded learning curves (seed 0).

    Rung k trains the surviving configs to the k-th evaluation point; the best 1/eta go on.
    With `budget_steps`, it starts from the most configs (drawn at random with `seed`) whose
    rungs fit the budget, at least one. Returns the pick, the steps spent, the configs started.
    The search space is the recipe's grid (spec ranks x lrs), as for TPE and the sweep's cost:
    runs added at other lrs to check that the grid brackets the best are not configs to draw.
    """
    spec = sweep["spec"]
    seed0 = [t for t in sweep["trials"] if t["seed"] == spec["seeds"][0] and t["status"] == "ok"
             and _in_grid(t, spec)]
    curves = {(t["rank"], t["lr"]): t.get("curve") or [] for t in seed0}
    configs = sorted(k for k, c in curves.items() if c)
    if not configs:
        raise LorankError("successive halving needs learning curves in sweep.json")
    n_rungs = min(len(curves[k]) for k in configs)
    rung_steps = [curves[configs[0]][rung][0] for rung in range(n_rungs)]

    def spend(n: int) -> int:
        total, prev, alive = 0, 0, n
        for rung, step in enumerate(rung_steps):
            total += alive * (step - prev)
            prev = step
            if rung < n_rungs - 1:
                alive = max(1, alive // eta)
        return total

    n = len(configs)
    if budget_steps is not None:
        n = max([1] + [m for m in range(1, len(configs) + 1) if spend(m) <= budget_steps])
        order = np.random.default_rng(seed).permutation(len(configs))
        configs = sorted(configs[i] for i in order[:n])
    alive = list(configs)
    for rung in range(n_rungs):
        alive.sort(key=lambda k, rung=rung: curves[k][rung][2])
        if rung < n_rungs - 1:
            alive = alive[: max(1, len(alive) // eta)]
    return int(alive[0][0]), spend(n), n


def single_lr_picks(sweep: dict[str, Any], right: RightRank,
                    params: dict[int, float]) -> list[dict[str, Any]]:
    """What a method that reads the whole rank curve at one learning rate would pick, at best.

    For each lr of the grid run at every rank, r* of the sweep's own curve at that lr (same
    rule, same seeds), scored against the truth (best lr per rank). A probe trains at one lr,
    so this is its ceiling: where the best lr moves with rank, no single-lr curve has the
    truth's shape.
    """
    from lorank.sweep import rank_loss_curve  # numpy only, but its module loads the trainer

    ranks = {int(r) for r in sweep["curve"]}
    out = []
    for lr in sweep["spec"]["lrs"]:
        curve = rank_loss_curve([t for t in sweep["trials"] if t["lr"] == lr])
        if set(curve) != ranks or not all(curve.values()):
            continue
        at_lr = curve_right_rank(curve)
        out.append(score(f"sweep curve at lr {lr:g}", at_lr.r_star, right, params, 0.0)
                   | {"lr": lr})
    return out


def replay_lr_pilot(sweep: dict[str, Any], seed: int = 0, rank: int | None = None) -> float | None:
    """The lr the probe's pilot would pick, replayed on the sweep's runs at `rank` (default: the
    nested probe's, the middle candidate; the SVD probe's is R): the lowest validation loss at
    the first evaluation (a quarter of the schedule) of that seed."""
    from lorank.estimators.probe import pilot_rank

    rank = rank or pilot_rank([int(r) for r in sweep["curve"]])
    first = {t["lr"]: t["curve"][0][2] for t in sweep["trials"]
             if t["rank"] == rank and t["seed"] == seed and t["lr"] in sweep["spec"]["lrs"]
             and t.get("curve")}
    if len(first) < 2:
        return None
    return min(first, key=lambda lr: (first[lr] if math.isfinite(first[lr]) else math.inf, lr))
