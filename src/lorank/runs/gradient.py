"""The gradient spectrum run: a seeded calibration sample, the head fitted first on a
classifier, the spectrum kept under OUT/cache/ (`lorank analyze`)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from lorank import data as data_mod
from lorank.errors import LorankError
from lorank.estimators.base import Evidence
from lorank.export import ensure_writable
from lorank.models import LoadedModel
from lorank.runs.inputs import kept_measurements
from lorank.targets import TargetSet
from lorank.util import Kept


@contextmanager
def _head_restored(model: torch.nn.Module, classification: bool) -> Iterator[None]:
    """Give the caller back the classification head it passed in, however the block ends.

    The analysis fits the head in place (`gradient_spectrum(fit_head=True)`); only the head's
    parameters are kept aside, not a copy of the whole model, which on an 8B model would
    double the memory the analysis needs."""
    if not classification:
        yield
        return
    from lorank.estimators.gradient import find_classification_head

    head = find_classification_head(model)[1]
    kept = {k: v.detach().clone() for k, v in head.state_dict().items()}
    try:
        yield
    finally:
        head.load_state_dict(kept)


def run_gradient(loaded: LoadedModel, prepared: data_mod.PreparedData, targets: TargetSet, *,
                 calib: int = 256, max_rank: int | None = None, batch_size: int = 8,
                 seed: int = 0, progress: bool = True, out: Path | None = None,
                 sketch_check: bool = False, replay_mb: float | None = None,
                 kept: Kept | None = None) -> Evidence:
    """Gradient spectrum on a seeded calibration sample: how many directions the data asks for.

    A classification model first gets its new head fitted on frozen features (in place, and
    given back as it was when the analysis ends): gradients through a random head are mostly
    noise. The finished spectrum is kept in `kept` (default: OUT/cache/ with `out`), and one
    kept there for the same model, calibration sample and options is reused, not measured
    again (`replay_mb` is not an option of the result: it only trades memory for time).
    """
    import random

    from lorank.estimators.gradient import REPLAY_MB, GradientSpectrum, gradient_spectrum
    from lorank.report import write_gradient_report

    if calib < 4:
        raise LorankError(f"--calib {calib}: need at least 4 examples (two per half)")
    replay_mb = REPLAY_MB if replay_mb is None else replay_mb
    if not replay_mb >= 0:
        raise LorankError(f"--gradient-replay-mb {replay_mb}: expected a size in MiB >= 0 (0: no replay)")
    if max_rank is None:
        max_rank = min(64, targets.max_rank)
    targets.check_rank(max_rank)
    sample = list(prepared.train)
    if len(sample) > calib:
        sample = random.Random(seed).sample(sample, calib)
    if len(sample) < 4:
        raise LorankError(f"calibration set has {len(sample)} examples: need at least 4 "
                          "(two per half)")
    start = time.perf_counter()
    model = loaded.model
    head_note = None
    fractions = (0.25, 0.5, 1.0) if len(sample) >= 16 else (0.5, 1.0) if len(sample) >= 8 \
        else (1.0,)
    classification = prepared.task == "classification"
    kept = kept if kept is not None else kept_measurements(out, loaded)
    names = [t.name for t in targets.layers]
    key = {"calibration": data_mod.data_hash(sample), "n_train": len(prepared.train),
           "targets": names, "max_rank": max_rank, "batch_size": batch_size, "seed": seed,
           "fractions": fractions, "sketch_check": sketch_check, "fit_head": classification,
           "pad_token_id": loaded.pad_token_id}
    stored = kept.load("gradient", key, "gradient spectrum")
    if stored is not None:
        spectrum = GradientSpectrum.from_dict(stored["spectrum"])
    else:
        with _head_restored(model, classification):
            try:
                spectrum = gradient_spectrum(model, sample, names,
                                             pad_token_id=loaded.pad_token_id, max_rank=max_rank,
                                             batch_size=batch_size, seed=seed,
                                             fractions=fractions, n_train=len(prepared.train),
                                             sketch_check=sketch_check, replay_mb=replay_mb,
                                             fit_head=classification, progress=progress)
            except ValueError as err:
                raise LorankError(str(err)) from None
    fit = spectrum.settings["head_fit"]
    if fit is not None:
        head_note = (f"head '{fit['head']}' fitted on frozen features first "
                     f"(loss {fit['loss_before']:.3f} -> {fit['loss_after']:.3f})")
    evidence = spectrum.to_evidence()
    evidence.name = "gradient"
    if head_note:
        evidence.notes.insert(0, head_note)
    if stored is not None:  # what measuring it cost, when it was measured
        evidence.cost_seconds = stored["cost_seconds"]
    else:
        evidence.cost_seconds = time.perf_counter() - start
        kept.store("gradient", key, {"spectrum": spectrum.to_dict(),
                                     "cost_seconds": evidence.cost_seconds})
    if out is not None:
        evidence.details["files"] = write_gradient_report(spectrum, ensure_writable(Path(out)))
    return evidence
