"""Reading data: files (.jsonl/.json/.csv/.parquet), folders of them, `save_to_disk` folders
and hub datasets, and picking their train and validation splits."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorank.errors import LorankError

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")

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
