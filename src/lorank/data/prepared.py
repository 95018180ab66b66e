"""The prepared dataset: records read, tokenized and split into train and validation sets."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorank.data.formats import (
    check_columns,
    check_labels,
    detect_format,
    label_vocabulary,
    tokenize,
)
from lorank.data.reading import Records, read_records
from lorank.errors import LorankError


@dataclass
class PreparedData:
    """Tokenized train and validation sets plus what produced them."""

    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    fmt: str
    task: str
    label_ids: dict[str, int] | None
    data_hash: str
    source: str
    dropped: int = 0
    duplicate_rate: float = 0.0
    notes: list[str] = field(default_factory=list)  # which split went where

    @property
    def num_labels(self) -> int | None:
        return len(self.label_ids) if self.label_ids else None


def data_hash(records: list[dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps(r, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def read_data(source: str | Path, fmt: str | None = None, *,
              val_source: str | Path | None = None, offline: bool = False) -> Records:
    """Load and validate the training and validation records (see `read_records`); the format
    is detected from the training records (or given) and every record is checked against it."""
    records = read_records(source, val_source=val_source, offline=offline)
    if not records.train:
        raise LorankError(f"{records.train_from}: empty dataset (no records)")
    records.fmt = fmt or detect_format(records.train, records.train_from)
    check_columns(records.train, records.fmt, records.train_from)
    if records.val is not None:
        if not records.val:
            raise LorankError(f"{records.val_from}: empty dataset (no records)")
        check_columns(records.val, records.fmt, str(records.val_from))
    return records


def read_dataset(source: str | Path, fmt: str | None = None, *, offline: bool = False
                 ) -> tuple[list[dict], str]:
    """Load and validate records; return the training records with their (detected or given)
    format."""
    records = read_data(source, fmt, offline=offline)
    return records.train, records.fmt


def prepare(source: str | Path, tokenizer, *, fmt: str | None = None,
            val_source: str | Path | None = None, val_fraction: float = 0.1,
            max_val: int = 256, max_length: int = 512, seed: int = 0,
            offline: bool = False) -> PreparedData:
    """Load, tokenize, mask and split; the split is seeded so the same inputs give the same sets."""
    return prepare_records(read_data(source, fmt, val_source=val_source, offline=offline),
                           tokenizer, val_fraction=val_fraction, max_val=max_val,
                           max_length=max_length, seed=seed)


def prepare_records(records: Records, tokenizer, *, val_fraction: float = 0.1,
                    max_val: int = 256, max_length: int = 512, seed: int = 0) -> PreparedData:
    """Tokenize, mask and split records `read_data` gave; with no validation records, a
    seeded `val_fraction` of the training records (at most `max_val`) is split off."""
    fmt, source = records.fmt, records.train_from
    train_all, val_given = records.train, records.val
    if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
        raise LorankError("format chat: the model's tokenizer has no chat template")
    task = "classification" if fmt == "classification" else "causal"
    label_ids = label_vocabulary(train_all + (val_given or [])) \
        if task == "classification" else None
    if label_ids is not None:
        check_labels(label_ids, source)
    keys = [json.dumps(r, sort_keys=True, default=str) for r in train_all]
    duplicate_rate = 1.0 - len(set(keys)) / len(keys)
    notes = list(records.notes)

    if val_given is None:
        order = list(range(len(train_all)))
        random.Random(seed).shuffle(order)
        n_val = min(max_val, max(1, int(round(val_fraction * len(train_all)))))
        if len(train_all) < 2:
            raise LorankError(f"{source}: need at least 2 records to split off validation")
        val_records = [train_all[i] for i in order[:n_val]]
        train_records = [train_all[i] for i in order[n_val:]]
        train_at = [(source, i + 1) for i in order[n_val:]]
        val_at = [(source, i + 1) for i in order[:n_val]]
        notes.append(f"validation data: {n_val:,} of the {len(train_all):,} records of "
                     f"{source}, split off by seed {seed}")
    else:
        val_records, train_records = val_given, train_all
        train_at = [(source, i) for i in range(1, len(train_all) + 1)]
        val_at = [(records.val_from, i) for i in range(1, len(val_given) + 1)]

    def tok_all(rs, at):
        out = []
        for r, (where, i) in zip(rs, at, strict=True):
            try:
                out.append(tokenize(r, fmt, tokenizer, max_length, label_ids))
            except LorankError as err:
                raise LorankError(f"{where}: record {i}: {err}") from None
        return [e for e in out if e is not None], sum(e is None for e in out)

    train, dropped_train = tok_all(train_records, train_at)
    val, dropped_val = tok_all(val_records, val_at)
    if not train:
        raise LorankError(
            f"{source}: no supervised tokens after masking and truncation to --max-length "
            f"{max_length} (format {fmt}"
            + ("; only turns with role 'assistant' are trained on)" if fmt == "chat" else ")")
        )
    if not val:
        raise LorankError(f"{records.val_from or source}: validation set has no supervised "
                          "tokens")
    return PreparedData(train, val, fmt, task, label_ids,
                        data_hash(train_all + (val_given or [])), records.source,
                        dropped_train + dropped_val, duplicate_rate, notes)
