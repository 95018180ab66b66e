"""Fuzzed data files: whatever a .jsonl, .json, .csv or .parquet file holds (random bytes,
values of the wrong type, byte-order marks, CRLF line ends, huge lines, text that is not
UTF-8), reading it (`read_dataset`) and preparing it (`prepare`: tokenizing, masking,
splitting) end in a result or in one `LorankError`, never in another exception.

A fixed budget of derandomized examples: the same cases on every run, well under a minute."""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from conftest import make_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorank import data
from lorank.errors import LorankError

FUZZ = settings(max_examples=200, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
TOKENIZER = make_tokenizer()

COLUMNS = ("text", "label", "prompt", "completion", "instruction", "input", "output",
           "messages", "\ufeffprompt")
KEYS = st.sampled_from(COLUMNS) | st.text(max_size=6)
# every code point, lone surrogates included (JSON escapes can carry them)
TEXT = (st.text(st.characters(blacklist_categories=()), max_size=24)
        | st.sampled_from(["", " ", "\r\n", "\x00", "\ufeff", "a\ud800b", "<|assistant|>", "</s>"])
        | st.integers(100_000, 300_000).map(lambda n: "y" * n))  # a huge line
SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | TEXT)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(KEYS, inner, max_size=3), max_leaves=6)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "tool"]) | SCALARS},
    optional={"content": VALUES, "tool_calls": VALUES})
MESSAGES = st.lists(MESSAGE | VALUES, max_size=4)


def well_formed(fmt: str) -> st.SearchStrategy[dict[str, Any]]:
    """A record of `fmt` whose values are mostly text, now and then of another type."""
    text = st.text(max_size=20) | st.text(max_size=20) | TEXT | SCALARS
    if fmt == "chat":
        turn = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]),
                                      "content": text})
        return st.fixed_dictionaries({"messages": st.lists(turn, min_size=1, max_size=4)})
    if fmt == "classification":
        return st.fixed_dictionaries({"text": text, "label": st.sampled_from(["a", "b", 1, 2.5])
                                      | SCALARS})
    return st.fixed_dictionaries({c: text for c in data.FORMATS[fmt]}, optional={"input": text})


RECORD = (st.dictionaries(KEYS, VALUES, max_size=4)
          | st.fixed_dictionaries({"messages": MESSAGES})
          | st.sampled_from(list(data.FORMATS)).flatmap(well_formed))
# files of one format (most reach tokenizing) or of any records at all
RECORDS = (st.sampled_from(list(data.FORMATS)).flatmap(
    lambda fmt: st.lists(well_formed(fmt), min_size=2, max_size=8))
    | st.lists(RECORD, max_size=6))
ENCODINGS = st.sampled_from(["utf-8", "utf-8", "utf-8-bom", "latin-1", "utf-16", "surrogatepass"])


def encode(text: str, encoding: str) -> bytes:
    if encoding == "utf-8-bom":
        return b"\xef\xbb\xbf" + text.encode("utf-8", "surrogatepass")
    if encoding in ("latin-1", "utf-16"):
        return text.encode(encoding, "replace")
    return text.encode("utf-8", "surrogatepass")  # lone surrogates: not valid UTF-8


def jsonl_bytes(records: list[Any], newline: str, encoding: str, ascii_only: bool) -> bytes:
    lines = [json.dumps(r, ensure_ascii=ascii_only) for r in records]
    return encode("".join(line + newline for line in lines), encoding)


def csv_bytes(records: list[dict], newline: str, encoding: str, ragged: bool) -> bytes:
    header = list(dict.fromkeys(k for r in records for k in r))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator=newline)
    writer.writerow(header)
    for r in records:
        row = ["" if r.get(k) is None else str(r[k]) for k in header]
        writer.writerow(row + ["extra"] if ragged else row[: len(r)])  # too many / too few
    return encode(out.getvalue(), encoding)


def parquet_bytes(records: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    try:
        pq.write_table(pa.Table.from_pylist(records), sink)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        # types Parquet cannot hold (mixed in a column, empty structs): values as JSON text
        sink = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(
            [{k: json.dumps(v) for k, v in r.items()} for r in records]), sink)
    return sink.getvalue()


def read_and_prepare(path: Path, fmt: str | None) -> None:
    """What the CLI does with a data file before any model runs on it."""
    try:
        records, found = data.read_dataset(path, fmt)
        assert isinstance(records, list) and found in data.FORMATS
        prepared = data.prepare(path, TOKENIZER, fmt=fmt, max_length=48)
        assert prepared.train and prepared.val
    except LorankError as err:
        message = str(err)
        assert message and "\n" not in message.strip(), message


@pytest.mark.parametrize("suffix", SUFFIXES)
@FUZZ
@given(content=st.binary(max_size=600)
       | st.sampled_from([b"", b"\xef\xbb\xbf", b"PAR1", b"PAR1\x00\x00PAR1", b"\r\n\r\n",
                          b"\x00" * 8, b"[" * 5000, b'{"text": "\xe9"}']))
def test_random_bytes(suffix: str, content: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"fuzz{suffix}"
        path.write_bytes(content)
        read_and_prepare(path, None)


@pytest.mark.parametrize("suffix", SUFFIXES)
@FUZZ
@given(records=RECORDS, newline=st.sampled_from(["\n", "\r\n", "\r"]), encoding=ENCODINGS,
       flag=st.booleans(), fmt=st.none() | st.sampled_from(list(data.FORMATS)),
       wrap=st.sampled_from(["list", "data", "value"]), other=VALUES)
def test_structured_files(suffix: str, records: list[dict], newline: str, encoding: str,
                          flag: bool, fmt: str | None, wrap: str, other: Any) -> None:
    if suffix == ".jsonl":
        content = jsonl_bytes(records + ([other] if flag else []), newline, encoding, flag)
    elif suffix == ".json":
        obj = {"list": records, "data": {"data": records}, "value": other}[wrap]
        content = encode(json.dumps(obj, ensure_ascii=flag), encoding)
    elif suffix == ".csv":
        content = csv_bytes(records, newline, encoding, flag)
    else:
        content = parquet_bytes(records)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"fuzz{suffix}"
        path.write_bytes(content)
        read_and_prepare(path, fmt)
