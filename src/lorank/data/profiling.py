"""The data profile: what the dataset holds and what the base model still pays on it."""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from lorank.data.batching import collate, supervised_tokens
from lorank.data.formats import IGNORE_INDEX
from lorank.data.prepared import PreparedData


@dataclass
class DataProfile:
    """What the dataset holds and what the base model still pays on it."""

    format: str
    task: str
    examples: int
    val_examples: int
    supervised_tokens: int
    total_tokens: int
    length_percentiles: dict[str, float]
    duplicate_rate: float
    dropped: int
    base_loss_nats: float | None = None
    base_loss_bits: float | None = None
    base_loss_sample: int = 0
    label_entropy_bits: float | None = None
    forward_seconds_per_token: float = 0.0
    num_labels: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def total_bits(self) -> float:
        """Bits the base model pays on the training set's supervised tokens (or labels)."""
        if self.task == "classification":
            return float(self.label_entropy_bits or 0.0) * self.examples
        return float(self.base_loss_bits or 0.0) * self.supervised_tokens

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["total_bits"] = self.total_bits
        return d


MODEL_MEASUREMENTS = ("forward_seconds_per_token", "base_loss_nats", "base_loss_bits",
                      "base_loss_sample")  # the fields of a DataProfile that run the model


def profile_samples(data: PreparedData, *, sample: int = 64, batch_size: int = 8,
                    seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """The examples `profile` runs the model on: "speed" (one batch, timed) and "loss" (the
    seeded sample whose base-model loss is measured; none for classification)."""
    speed = random.Random(seed + 1).sample(data.train, min(batch_size, len(data.train)))
    loss = [] if data.task == "classification" else \
        random.Random(seed).sample(data.train, min(sample, len(data.train)))
    return {"speed": speed, "loss": loss}


def profile(data: PreparedData, model=None, *, sample: int = 64, batch_size: int = 8,
            pad_token_id: int = 0, progress: bool = True, seed: int = 0,
            measured: dict[str, Any] | None = None) -> DataProfile:
    """Count examples and tokens; measure the base model's loss on a seeded sample.

    `measured` holds the MODEL_MEASUREMENTS of an earlier profile of the same model, samples
    (`profile_samples`) and options: they are taken as they are and the model is not run."""
    lengths = np.array([len(e["input_ids"]) for e in data.train])
    sup = sum(supervised_tokens(e) for e in data.train)
    prof = DataProfile(
        format=data.fmt, task=data.task, examples=len(data.train), val_examples=len(data.val),
        supervised_tokens=sup, total_tokens=int(lengths.sum()),
        length_percentiles={f"p{q}": float(np.percentile(lengths, q)) for q in (50, 90, 99)}
        | {"max": float(lengths.max())},
        duplicate_rate=data.duplicate_rate, dropped=data.dropped, num_labels=data.num_labels,
        notes=list(data.notes),
    )
    if measured is not None:
        for name in MODEL_MEASUREMENTS:
            setattr(prof, name, measured[name])
        model = None
    picked = profile_samples(data, sample=sample, batch_size=batch_size, seed=seed)
    if model is not None:
        prof.forward_seconds_per_token = _forward_speed(model, picked["speed"], pad_token_id)
    if data.task == "classification":
        counts = np.bincount([e["labels"] for e in data.train], minlength=data.num_labels or 1)
        p = counts[counts > 0] / counts.sum()
        prof.label_entropy_bits = float(-(p * np.log2(p)).sum())
        prof.notes.append("classification: the bits to learn are the label entropy per example")
        return prof
    if model is not None:
        nats, tokens = _summed_loss(model, picked["loss"], pad_token_id, batch_size, progress)
        prof.base_loss_nats = nats / max(tokens, 1)
        prof.base_loss_bits = prof.base_loss_nats / math.log(2)
        prof.base_loss_sample = len(picked["loss"])
    return prof


@torch.no_grad()
def _forward_speed(model, picked, pad_token_id) -> float:
    """Seconds per token of one forward pass (after a warm-up), for budget conversions."""
    import time

    batch = {k: v.to(next(model.parameters()).device)
             for k, v in collate(picked, pad_token_id).items() if k != "labels"}
    model(**batch)
    start = time.perf_counter()
    model(**batch)
    return (time.perf_counter() - start) / max(int(batch["attention_mask"].sum()), 1)


@torch.no_grad()
def _summed_loss(model, examples, pad_token_id, batch_size, progress) -> tuple[float, int]:
    """Summed next-token loss (nats) over supervised tokens, and their count."""
    from lorank.util import progress_bar

    total, tokens = 0.0, 0
    device = next(model.parameters()).device
    batches = [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)]
    with progress_bar(progress) as bar:
        task = bar.add_task("base-model loss", total=len(batches))
        for chunk in batches:
            batch = {k: v.to(device) for k, v in collate(chunk, pad_token_id).items()}
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits.float()
            labels = batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1),
                ignore_index=IGNORE_INDEX, reduction="sum")
            total += float(loss)
            tokens += int((labels != IGNORE_INDEX).sum())
            bar.advance(task)
    return total, tokens
