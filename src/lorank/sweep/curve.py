"""The rank–loss curve of a sweep's finished runs, and the two rules that read it to add or
skip points.

`rank_loss_curve`: L(r) is the seed-mean loss at rank r's best learning rate, kept with its
per-example losses (paired across ranks) and spreads. `settle_points`: once every grid point
has its answer, one more seed at the best lr of each rank whose verdict hinges on seed noise.
`dominated_reason`: a later seed's run at an lr that lost by more than the skip margin at the
first seed is skipped, and `_stale_skip` withdraws such a skip once its lr leads the rank.
Each reads records as `finished_records` returns them and touches no storage.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lorank.scoring import curve_right_rank, hinging_ranks
from lorank.sweep.grid import SKIPPED, SweepSpec, _key


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
