"""The sweep's grid: its points, the recipe they share, and where each point's files live.

A point is a dict {"rank", "lr", "seed"}; `_key` is its identity (int rank, float lr, int
seed), the same whichever trial, record or grid it comes from, and `_point_of` reads it from a
trial (the queue's fixed params). Each point has one result file,
`out/trials/r{rank}_lr{lr}_s{seed}.json`, written before its trial is settled so that recovery
can finish the trial from it, and one checkpoint directory under `out/checkpoints/`, from
which a re-run of the point resumes. `FINISHED` (the trial attribute that says a point has its
answer) and `SKIPPED` (the status of a point settled without training) are the words every
other sweep module reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from lorank.train import TrainConfig

FINISHED = "finished"  # user attr: the grid point has its answer (ok, diverged or pruned)
SKIPPED = "skipped: dominated"  # status of a later seed's point settled by `dominated_reason`


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


def _key(params: dict[str, Any]) -> tuple:
    return (int(params["rank"]), float(params["lr"]), int(params["seed"]))


def _point_of(trial: optuna.trial.FrozenTrial) -> dict[str, Any] | None:
    fixed = trial.system_attrs.get("fixed_params") or trial.params
    return fixed if fixed and {"rank", "lr", "seed"} <= set(fixed) else None


def _point_name(point: dict[str, Any]) -> str:
    return f"r{point['rank']}_lr{point['lr']:g}_s{point['seed']}"


def _result_path(out: Path, point: dict[str, Any]) -> Path:
    return Path(out) / "trials" / f"{_point_name(point)}.json"


def checkpoint_dir(out: Path, point: dict[str, Any]) -> Path:
    """Where a grid point's run checkpoints at each evaluation, so a killed run resumes."""
    return Path(out) / "checkpoints" / _point_name(point)
