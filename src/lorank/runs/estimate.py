"""One estimator run by name (`recommend`'s `estimators`): capacity, gradient or probe."""

from __future__ import annotations

import time
from typing import Any

from lorank import data as data_mod
from lorank.errors import LorankError
from lorank.estimators.base import Evidence
from lorank.estimators.capacity import (
    capacity_evidence,
    frozen_head_bits,
    head_sample,
    load_calibration,
)
from lorank.models import LoadedModel
from lorank.planned_run import PlannedRun
from lorank.runs.gradient import run_gradient
from lorank.runs.probe import run_probe
from lorank.targets import TargetSet
from lorank.util import Kept

ESTIMATORS = ("capacity", "gradient", "probe")


def run_estimator(name: str, loaded: LoadedModel, prepared: data_mod.PreparedData,
                  prof: data_mod.DataProfile, targets: TargetSet, ranks: list[int], *,
                  batch_size: int, seed: int, progress: bool, profile_seconds: float,
                  probe: dict[str, Any] | None = None, run: PlannedRun | None = None,
                  kept: Kept | None = None) -> Evidence:
    """Dispatch one estimator by name; `kept`: finished measurements to reuse and to keep."""
    kept = kept if kept is not None else Kept(None)
    if name == "capacity":
        start = time.perf_counter()
        head, head_seconds = None, 0.0
        if prepared.task == "classification":
            key = {"examples": data_mod.data_hash(head_sample(prepared.train, seed)),
                   "batch_size": batch_size, "seed": seed}
            stored = kept.load("head-bits", key, "frozen-feature head loss")
            if stored is not None:
                head, head_seconds = stored["head"], float(stored["seconds"])
            else:
                head = frozen_head_bits(loaded.model, prepared.train,
                                        pad_token_id=loaded.pad_token_id,
                                        batch_size=batch_size, seed=seed)
                head_seconds = time.perf_counter() - start
                kept.store("head-bits", key, {"head": head, "seconds": head_seconds})
        return capacity_evidence(prof, targets, ranks, run=run, head=head,
                                 calibration=load_calibration(),
                                 seconds=profile_seconds + head_seconds)
    if name == "gradient":
        gradient = (probe or {}).get("gradient", {})
        return run_gradient(loaded, prepared, targets, calib=gradient.get("calib", 256),
                            max_rank=gradient.get("max_rank"), batch_size=batch_size,
                            seed=seed, progress=progress, out=(probe or {}).get("out"),
                            sketch_check=gradient.get("sketch_check", False),
                            replay_mb=gradient.get("replay_mb"), kept=kept)
    if name == "probe":
        probe = probe or {}
        return run_probe(loaded, prepared, targets, prof, method=probe.get("method", "svd"),
                         max_rank=probe.get("max_rank", 64), budget=probe.get("budget"),
                         lr=probe.get("lr", 1e-3), batch_size=batch_size, seed=seed,
                         progress=progress, out=probe.get("out"), kept=kept)
    raise LorankError(f"--estimators {name}: unknown estimator (known: {', '.join(ESTIMATORS)})")
