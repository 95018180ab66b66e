"""The inputs of every measurement: the model and the data loaded together, the seed, the
software versions recorded, the finished measurements kept under OUT/cache/ and the data profile."""

from __future__ import annotations

import platform
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from lorank import data as data_mod
from lorank.errors import LorankError
from lorank.models import LoadedModel, load_model, model_fingerprint
from lorank.util import KEPT_DIR, Kept


def versions() -> dict[str, str]:
    """Software versions recorded with every result."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("lorank", "torch", "transformers", "peft", "datasets", "optuna"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_inputs(model: str | LoadedModel, data: str | Path, *, format: str | None = None,
                   val_data: str | Path | None = None, max_length: int = 512, seed: int = 0,
                   dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False,
                   offline: bool = False) -> tuple[LoadedModel, data_mod.PreparedData]:
    """Load the model and the data together (the data decides the classification label count).

    A hub model id or `datasets` name downloads into the Hugging Face cache when missing;
    `offline` (or HF_HUB_OFFLINE) reads the cache only."""
    records = data_mod.read_data(data, format, val_source=val_data, offline=offline)
    fmt = records.fmt
    if isinstance(model, str):
        num_labels = None
        if fmt == "classification":
            label_ids = data_mod.label_vocabulary(records.train + (records.val or []))
            data_mod.check_labels(label_ids, records.train_from)  # before the model loads
            num_labels = len(label_ids)
        model = load_model(model, task="classification" if fmt == "classification" else None,
                           num_labels=num_labels, dtype=dtype, device=device,
                           trust_remote_code=trust_remote_code, seed=seed, offline=offline)
    if (fmt == "classification") != (model.task == "classification"):
        raise LorankError(f"{data}: format {fmt} does not fit a {model.task} model "
                          f"({model.source}); classification data needs an encoder/classifier")
    prepared = data_mod.prepare_records(records, model.tokenizer, max_length=max_length,
                                        seed=seed)
    return model, prepared


def kept_measurements(out: str | Path | None, loaded: LoadedModel) -> Kept:
    """The finished measurements kept under OUT/cache/ for this model and this software (see
    `lorank.util.Kept`); without `out`, nothing is kept or reused."""
    if out is None:
        return Kept(None)
    software = {k: v for k, v in versions().items()
                if k in ("lorank", "torch", "transformers", "peft")}
    return Kept(Path(out) / KEPT_DIR, {"model": model_fingerprint(loaded), "software": software})


def measure_profile(prepared: data_mod.PreparedData, loaded: LoadedModel, kept: Kept, *,
                    sample: int = 64, batch_size: int = 8, seed: int = 0,
                    progress: bool = True) -> tuple[data_mod.DataProfile, float]:
    """`data.profile` of the prepared data, and the seconds it took; the base model's
    measurements on it (loss and speed) are reused from `kept` when they were made on the same
    samples with the same batch size (the seconds then are those they took), and kept
    otherwise."""
    start = time.perf_counter()
    picked = data_mod.profile_samples(prepared, sample=sample, batch_size=batch_size, seed=seed)
    key = {"speed": data_mod.data_hash(picked["speed"]), "loss": data_mod.data_hash(picked["loss"]),
           "batch_size": batch_size, "pad_token_id": loaded.pad_token_id}
    what = "forward speed" if prepared.task == "classification" else "base loss"
    measured = kept.load("base-model", key, what)
    prof = data_mod.profile(prepared, loaded.model, sample=sample, batch_size=batch_size,
                            pad_token_id=loaded.pad_token_id, progress=progress, seed=seed,
                            measured=measured)
    if measured is not None:
        return prof, float(measured["seconds"])
    seconds = time.perf_counter() - start
    kept.store("base-model", key, {name: getattr(prof, name)
                                   for name in data_mod.MODEL_MEASUREMENTS} | {"seconds": seconds})
    return prof, seconds
