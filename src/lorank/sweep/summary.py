"""A sweep's result: its finished records and rank–loss curve (`SweepResult`), written as
sweep.json with its plots, and read back as Evidence for `recommend`.

sweep.json holds the finished trials, the curve (per rank: best lr, seed-mean loss, per-example
losses, standard error, seed spread), the spec, the study's meta and the commands that worked
on the study. `sweep_evidence` reads a finished or part-done sweep.json and refuses one made on
other data.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna

from lorank.errors import LorankError
from lorank.estimators.base import Evidence
from lorank.plots import plot_learning_curves, plot_rank_curve
from lorank.scoring import curve_right_rank
from lorank.sweep.curve import rank_loss_curve
from lorank.sweep.grid import SweepSpec
from lorank.sweep.trial_queue import finished_records
from lorank.util import atomic_write_text


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
