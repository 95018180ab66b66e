"""Data: load records, detect their format, tokenize with loss masks, split, profile.

Tokenized examples are plain dicts so every stage (estimators, Trainer, sweep) shares them:
  causal LM:       {"input_ids": list[int], "labels": list[int]}   (labels -100 = no loss)
  classification:  {"input_ids": list[int], "labels": int}
Only completion / assistant tokens carry loss; prompts, instructions and user turns do not.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorank.errors import LorankError

IGNORE_INDEX = -100
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")

# format -> columns it needs (detection tries them in this order)
FORMATS: dict[str, tuple[str, ...]] = {
    "chat": ("messages",),
    "alpaca": ("instruction", "output"),
    "prompt-completion": ("prompt", "completion"),
    "classification": ("text", "label"),
    "text": ("text",),
}
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


# ---------------------------------------------------------------------------------------------
# loading

# split names as `datasets` and the Hub write them: the training split, then the one that
# becomes the validation set, in order of preference (matched without regard to case)
TRAIN_SPLITS = ("train", "training")
VAL_SPLITS = ("validation", "valid", "val", "dev", "test", "testing", "eval", "evaluation")
UNSPLIT = ""  # the one split of a file, or of a folder whose files name no split


def load_splits(source: str | Path, *, offline: bool = False
                ) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """Records per split of a data source, and notes on files that were not read.

    A file, or a folder whose files name no split, has the one split UNSPLIT. A folder written
    by `datasets`' `save_to_disk` is read with `datasets.load_from_disk`; any other folder is
    split as `datasets` and the Hub split a repository (`train-*.parquet`,
    `data/validation-00000-of-00001.parquet`, `test.jsonl`, a `dev/` folder); anything else is
    a `datasets` name, loaded with `datasets.load_dataset` (downloaded unless offline)."""
    path = Path(source)
    if path.is_dir():
        if _saved_by_datasets(path):
            return _read_saved_dataset(path), []
        return _read_folder(path)
    if path.is_file():
        return {UNSPLIT: _read_file(path)}, []
    if path.suffix in DATA_SUFFIXES or str(source).startswith(("/", "./", "../", "~")):
        raise LorankError(f"data file not found: {source}")
    return _read_hub_dataset(str(source), offline=offline), []


def load_records(source: str | Path, *, offline: bool = False) -> list[dict[str, Any]]:
    """The training records of a file, a folder (its train split, if its files name splits), a
    `save_to_disk` folder or a `datasets` name."""
    return read_records(source, offline=offline).train


@dataclass
class Records:
    """What the data sources give: training records, validation records (`val_source`'s, else
    the source's own validation split, else None: `prepare` splits some off), where each came
    from (for messages) and notes saying which split went where."""

    train: list[dict[str, Any]]
    val: list[dict[str, Any]] | None
    source: str
    train_from: str
    val_from: str | None = None
    notes: list[str] = field(default_factory=list)
    fmt: str = ""


def _split_label(source: str | Path, split: str) -> str:
    return str(source) if split == UNSPLIT else f"split '{split}' of {source}"


def _by_name(splits: dict[str, Any], names: tuple[str, ...], skip: str | None = None
             ) -> str | None:
    lower = {str(n).lower(): n for n in splits if n != skip}
    return next((lower[n] for n in names if n in lower), None)


def _train_split(splits: dict[str, Any], source: str | Path) -> str:
    if UNSPLIT in splits or len(splits) == 1:
        return next(iter(splits))
    name = _by_name(splits, TRAIN_SPLITS)
    if name is None:
        raise LorankError(f"{source}: splits {', '.join(map(repr, splits))} but none named "
                          "train; expected a train split (train-*.parquet, train.jsonl, a "
                          "'train' split) or one file")
    return name


def read_records(source: str | Path, *, val_source: str | Path | None = None,
                 offline: bool = False) -> Records:
    """Training and validation records of `source` (and `val_source`), as a user expects them:
    a source's train split trains; its validation split (validation, valid, val, dev, test...)
    validates unless `val_source` is given, which then wins; the notes say which went where."""
    splits, notes = load_splits(source, offline=offline)
    train_name = _train_split(splits, source)
    own_val = _by_name(splits, VAL_SPLITS, skip=train_name) if train_name != UNSPLIT else None
    records = Records(splits[train_name], None, str(source), _split_label(source, train_name))
    if train_name != UNSPLIT:
        records.notes.append(f"training data: {records.train_from} "
                             f"({len(records.train):,} records)")
    if val_source is not None:
        val_splits, val_notes = load_splits(val_source, offline=offline)
        notes += val_notes
        name = next(iter(val_splits)) if UNSPLIT in val_splits or len(val_splits) == 1 \
            else _by_name(val_splits, VAL_SPLITS)
        if name is None:
            raise LorankError(f"{val_source}: splits {', '.join(map(repr, val_splits))} but "
                              f"none named {'/'.join(VAL_SPLITS[:5])}; expected a validation "
                              "split or one file")
        records.val, records.val_from = val_splits[name], _split_label(val_source, name)
        ignored = f"; {_split_label(source, own_val)} not used" if own_val else ""
        records.notes.append(f"validation data: {records.val_from} (--val-data, "
                             f"{len(records.val):,} records){ignored}")
    elif own_val is not None:
        records.val, records.val_from = splits[own_val], _split_label(source, own_val)
        records.notes.append(f"validation data: {records.val_from} "
                             f"({len(records.val):,} records)")
    records.notes += [f"{_split_label(source, n)} not used" for n in splits
                      if n not in (train_name, own_val)]
    records.notes += notes
    return records


def _saved_by_datasets(path: Path) -> bool:
    """A folder `Dataset.save_to_disk` or `DatasetDict.save_to_disk` wrote."""
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file())


def _read_saved_dataset(path: Path) -> dict[str, list[dict[str, Any]]]:
    import datasets

    from lorank.hub import first_line

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # a damaged folder: missing shards, bad JSON, bad Arrow
        raise LorankError(f"{path}: unreadable `datasets` folder, expected what save_to_disk "
                          f"writes ({first_line(err)})") from None
    if isinstance(loaded, datasets.DatasetDict):
        return {str(name): ds.to_list() for name, ds in loaded.items()}
    return {UNSPLIT: loaded.to_list()}


def _read_folder(path: Path) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """A folder's data files by split, found with `datasets`' own rules for a repository; a
    folder whose files name no split is one split. Notes name data files that were not read."""
    from datasets.data_files import FILES_TO_IGNORE, DataFilesDict, get_data_patterns

    from lorank.hub import first_line

    found = sorted(p for p in path.rglob("*") if p.suffix in DATA_SUFFIXES and p.is_file()
                   and p.name not in FILES_TO_IGNORE
                   and not any(part.startswith((".", "__"))
                               for part in p.relative_to(path).parts))
    if not found:
        raise LorankError(f"{path}: directory holds no {'/'.join(DATA_SUFFIXES)} files")
    try:
        patterns = get_data_patterns(str(path))
        resolved = DataFilesDict.from_patterns(patterns, str(path))
    except (OSError, ValueError) as err:
        raise LorankError(f"{path}: cannot tell the folder's splits apart "
                          f"({first_line(err)})") from None
    files = {str(name): sorted(Path(f) for f in fs if Path(f).suffix in DATA_SUFFIXES)
             for name, fs in resolved.items()}
    files = {name: fs for name, fs in files.items() if fs}
    unsplit = {str(k): list(v) for k, v in patterns.items()} == {"train": ["**"]}
    if unsplit or not files:
        files = {UNSPLIT: found}
    taken = {f.resolve() for fs in files.values() for f in fs}
    skipped = [str(p.relative_to(path)) for p in found if p.resolve() not in taken]
    notes = [f"not read: {len(skipped)} file(s) under {path} whose names name no split "
             f"({', '.join(skipped[:3])}{', ...' if len(skipped) > 3 else ''})"] if skipped else []
    return {name: [r for f in fs for r in _read_file(f)] for name, fs in files.items()}, notes


def _read_file(path: Path) -> list[dict[str, Any]]:
    """Records of one file. Text files must be UTF-8 (a leading byte-order mark is dropped);
    anything unreadable ends in a `LorankError` naming the file (and line where known)."""
    suffix = path.suffix
    if suffix == ".parquet":
        return _read_parquet(path)
    if suffix not in DATA_SUFFIXES:
        raise LorankError(f"{path}: unsupported file type; expected {', '.join(DATA_SUFFIXES)}")
    try:
        if suffix == ".jsonl":
            return _read_jsonl(path)
        if suffix == ".json":
            return _read_json(path)
        return _read_csv(path)
    except UnicodeDecodeError:
        raise LorankError(_not_utf8(path)) from None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8-sig") as fh:
        return _json_lines(fh, path)


def _json_lines(lines, path: Path) -> list[dict[str, Any]]:
    """Records of JSON Lines text, one object per line; blank lines are skipped."""
    records = []
    for lineno, line in enumerate(lines, 1):
        line = line.lstrip("\ufeff")  # files joined with `cat` keep each one's mark
        if not line.strip():
            continue
        obj = _parse_json(line, path, lineno)
        if not isinstance(obj, dict):
            raise LorankError(f"{path}:{lineno}: expected a JSON object per line")
        records.append(obj)
    return records


def _read_json(path: Path) -> list[dict[str, Any]]:
    """A JSON list of objects (or {'data': [...]}), or JSON Lines, which is what
    `Dataset.to_json` and `DataFrame.to_json(orient="records", lines=True)` write to .json."""
    text = path.read_text(encoding="utf-8-sig")
    lines = text.split("\n")  # read_text has already made every line end a \n
    try:
        obj = _parse_json(text, path)
    except LorankError:
        if not _json_lines_text(text):
            raise
        return _json_lines(lines, path)
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    elif isinstance(obj, dict) and sum(1 for ln in lines if ln.strip()) == 1:
        obj = [obj]  # JSON Lines with one record
    if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
        raise LorankError(f"{path}: expected a JSON list of objects (or {{'data': [...]}}) or "
                          "JSON Lines (one object per line)")
    return obj


def _json_lines_text(text: str) -> bool:
    """Whether text that is not one JSON document reads as JSON Lines: its first line is a
    whole JSON value followed by more lines."""
    first, _, rest = text.lstrip("\ufeff").lstrip().partition("\n")
    if not rest.strip():
        return False
    try:
        json.loads(first)
    except (ValueError, RecursionError):
        return False
    return True


def _parse_json(text: str, path: Path, lineno: int | None = None) -> Any:
    """`json.loads`, its failures as one `LorankError` naming the file and line: `lineno` for a
    JSON Lines line, else the line in the file the parser stopped at."""
    where = f"{path}:{lineno}" if lineno else str(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise LorankError(f"{path}:{lineno or err.lineno}: malformed JSON ({err.msg})") from None
    except RecursionError:
        raise LorankError(f"{where}: JSON nested too deeply to read") from None
    except ValueError as err:  # e.g. an integer longer than Python converts from text
        raise LorankError(f"{where}: unreadable JSON value ({err})") from None


def _read_csv(path: Path) -> list[dict[str, Any]]:
    records = []
    limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # a long document is one field; the default stops at 128 KiB
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            try:
                for row in reader:
                    if None in row:  # values past the header's columns
                        columns = len(reader.fieldnames or ())
                        raise LorankError(
                            f"{path}:{reader.line_num}: {columns + len(row[None])} values but "
                            f"the header names {columns} columns")
                    records.append(dict(row))
            except csv.Error as err:
                raise LorankError(f"{path}:{reader.line_num}: malformed CSV ({err})") from None
    finally:
        csv.field_size_limit(limit)
    return records


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
        return table.to_pylist()
    except pa.ArrowException as err:
        # "Could not open Parquet input source '<path>': <why>. <advice>" -> "<why>"
        reason = str(err).split("': ", 1)[-1].split(". ", 1)[0].strip() or type(err).__name__
        with path.open("rb") as fh:
            head = fh.read(4)
        kind = "not a Parquet file" if head != b"PAR1" else "unreadable Parquet file"
        raise LorankError(f"{path}: {kind} ({reason})") from None


def _not_utf8(path: Path) -> str:
    """Where a file stops being UTF-8: its first undecodable line and byte. A line ending
    (0x0A) is never part of a multi-byte character, so the file can be checked line by line."""
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return (f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[err.start]:02x}); "
                        "save the file as UTF-8")
    return f"{path}: not UTF-8 text; save the file as UTF-8"


def _read_hub_dataset(name: str, *, offline: bool = False) -> dict[str, list[dict[str, Any]]]:
    """A `datasets` name, every split: from the cache, downloaded when missing unless offline
    (`offline` or HF_HUB_OFFLINE)."""
    import contextlib

    import datasets
    from datasets.exceptions import DatasetNotFoundError

    from lorank import hub

    reason = hub.offline_reason(offline)
    try:
        with hub.hub_offline() if reason else contextlib.nullcontext():
            loaded = datasets.load_dataset(name)
    except Exception as err:  # one line, whatever `datasets` or huggingface_hub raised
        if reason is not None:
            raise LorankError(
                f"data '{name}' is not a local file or folder, nor a `datasets` name in the "
                f"local cache, and {reason} forbids downloading it: "
                f"{hub.how_to_go_online(reason)} once to download it ({hub.first_line(err)})"
            ) from None
        if isinstance(err, DatasetNotFoundError):
            why = (f"no local file or folder of that name, and {hub.first_line(err)} (if it is "
                   "private or gated, set HF_TOKEN or run `hf auth login`)")
        else:
            why = hub.hub_error(err, name, "dataset")
        raise LorankError(f"data '{name}': {why}") from None
    if isinstance(loaded, datasets.DatasetDict):
        return {str(split): ds.to_list() for split, ds in loaded.items()}
    return {UNSPLIT: loaded.to_list()}


def detect_format(records: list[dict[str, Any]], source: str = "data") -> str:
    """The first format whose columns the records hold (see FORMATS)."""
    if not records:
        raise LorankError(f"{source}: empty dataset (no records)")
    columns = set(records[0])
    for name, needed in FORMATS.items():
        if all(c in columns for c in needed):
            return name
    known = "; ".join(f"{n}: {', '.join(c)}" for n, c in FORMATS.items())
    raise LorankError(
        f"{source}: unknown columns {sorted(columns)}; expected one of the formats ({known})"
    )


def check_columns(records: list[dict[str, Any]], fmt: str, source: str = "data") -> None:
    """Every record must have the format's columns; name the first record that does not."""
    if fmt not in FORMATS:
        raise LorankError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    for i, record in enumerate(records, 1):
        missing = [c for c in FORMATS[fmt] if c not in record or record[c] is None]
        if missing:
            raise LorankError(f"{source}: record {i}: missing field '{missing[0]}' for format {fmt}")
        problem = _field_problem(record, fmt)
        if problem:
            raise LorankError(f"{source}: record {i}: {problem}")


TEXT_FIELDS = ("text", "prompt", "completion", "instruction", "input", "output")


def _field_problem(record: dict[str, Any], fmt: str) -> str | None:
    """What is wrong with a record's values for `fmt` (None if nothing): a list or an object
    where text belongs would otherwise be tokenized as its Python repr, and a malformed chat
    message fail deep inside the tokenizer's template."""
    for name in (*FORMATS[fmt], *(("input",) if fmt == "alpaca" else ())):  # alpaca's optional
        value = record.get(name)
        if name in TEXT_FIELDS and isinstance(value, (list, dict)):
            kind = "list" if isinstance(value, list) else "object"
            return f"field '{name}': expected text, got a JSON {kind}"
        if name in TEXT_FIELDS and _lone_surrogate(value):
            return f"field '{name}': {NOT_UNICODE}"
    if fmt == "classification" and isinstance(record["label"], (list, dict)):
        return "field 'label': expected a class name or number"
    if fmt == "chat":
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            return "field 'messages': expected a non-empty list of {role, content} objects"
        for j, message in enumerate(messages):
            if not isinstance(message, dict):
                return f"messages[{j}]: expected an object with 'role' and 'content'"
            if not isinstance(message.get("role"), str):
                return f"messages[{j}]: expected a string 'role'"
            content = message.get("content")
            # content parts (a list) and a tool call without content are the templates' to read
            if not (isinstance(content, (str, list)) or content is None and "tool_calls" in message):
                return f"messages[{j}]: expected a string 'content'"
            if _lone_surrogate(message):
                return f"messages[{j}]: {NOT_UNICODE}"
    return None


NOT_UNICODE = "not valid Unicode text (a lone surrogate, as a JSON escape like \\ud800 makes)"


def _lone_surrogate(value: Any) -> bool:
    """Whether a string in `value` (searched through lists and objects) holds a lone UTF-16
    surrogate, which JSON escapes can make but no tokenizer encodes."""
    if isinstance(value, str):
        if value.isascii():
            return False
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_lone_surrogate(k) or _lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_lone_surrogate(v) for v in value)
    return False


# ---------------------------------------------------------------------------------------------
# tokenizing


def tokenize(record: dict[str, Any], fmt: str, tokenizer, max_length: int,
             label_ids: dict[str, int] | None = None) -> dict[str, Any] | None:
    """One record -> tokenized example, or None when truncation leaves no supervised token."""
    if fmt == "classification":
        ids = tokenizer(str(record["text"]), truncation=True, max_length=max_length)["input_ids"]
        return {"input_ids": list(ids), "labels": label_ids[str(record["label"])]}
    if fmt == "chat":
        ids, labels = _chat_tokens(record["messages"], tokenizer)
    else:
        prompt, completion = _prompt_completion(record, fmt)
        prompt_ids = _encode(tokenizer, prompt, special=True) if prompt else []
        completion_ids = _encode(tokenizer, completion, special=not prompt)
        if tokenizer.eos_token_id is not None:
            completion_ids = completion_ids + [tokenizer.eos_token_id]
        ids = prompt_ids + completion_ids
        labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    ids, labels = ids[:max_length], labels[:max_length]
    if all(lab == IGNORE_INDEX for lab in labels[1:]):  # the first label is never predicted
        return None
    return {"input_ids": ids, "labels": labels}


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _prompt_completion(record: dict[str, Any], fmt: str) -> tuple[str, str]:
    if fmt == "text":
        return "", str(record["text"])
    if fmt == "prompt-completion":
        return str(record["prompt"]), str(record["completion"])
    if fmt == "alpaca":
        extra = record.get("input") or ""
        template = ALPACA_PROMPT_INPUT if extra else ALPACA_PROMPT
        return template.format(instruction=record["instruction"], input=extra), str(record["output"])
    raise LorankError(f"format {fmt}: not a generation format")


def _chat_tokens(messages: list[dict[str, str]], tokenizer) -> tuple[list[int], list[int]]:
    """Render with the chat template; supervise only assistant turns, found by prefix lengths:
    a turn starts where the conversation before it, with the generation prompt, ends (an
    opening turn, with nothing before it, after the tokens it shares with itself emptied of
    content: its header). A template that rejects the conversation is a `LorankError`."""
    if not getattr(tokenizer, "chat_template", None):
        raise LorankError("format chat: the model's tokenizer has no chat template")

    def render(msgs, gen):
        try:
            out = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
        except Exception as err:  # the template's own checks (raise_exception) and failures
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise LorankError(f"the chat template rejects the conversation ({reason})") from None
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        return list(out)

    ids = render(messages, False)
    labels = [IGNORE_INDEX] * len(ids)
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        if i:
            start = len(render(messages[:i], True))
        else:  # no conversation before it to render
            empty = render([{**message, "content": ""}], False)
            shared = zip(ids, empty, strict=False)
            start = next((j for j, (a, b) in enumerate(shared) if a != b),
                         min(len(ids), len(empty)))
        end = len(render(messages[: i + 1], False))
        labels[start:end] = ids[start:end]
    return ids, labels


def check_labels(label_ids: dict[str, int], source: str | Path) -> None:
    if len(label_ids) < 2:
        raise LorankError(f"{source}: every record has the label {next(iter(label_ids))!r}; "
                          "classification needs at least two classes")


def label_vocabulary(records: list[dict[str, Any]]) -> dict[str, int]:
    """Label string -> class id, sorted so the mapping does not depend on record order."""
    labels = sorted({str(r["label"]) for r in records})
    return {lab: i for i, lab in enumerate(labels)}


# ---------------------------------------------------------------------------------------------
# the prepared dataset


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


def collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of tokenized examples into a batch (labels padded with -100)."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    seq_labels = isinstance(examples[0]["labels"], list)
    labels = (
        torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        if seq_labels
        else torch.tensor([int(e["labels"]) for e in examples], dtype=torch.long)
    )
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        mask[i, :n] = 1
        if seq_labels:
            labels[i, :n] = torch.tensor(e["labels"], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def supervised_tokens(example: dict[str, Any]) -> int:
    """Tokens that carry loss (labels shift by one in causal LMs: the first is never predicted)."""
    if isinstance(example["labels"], list):
        return sum(lab != IGNORE_INDEX for lab in example["labels"][1:])
    return 1


# ---------------------------------------------------------------------------------------------
# profile


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
