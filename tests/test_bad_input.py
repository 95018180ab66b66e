"""Bad data files and target lists end in one `error:` line naming the file (and line) or the
names at fault, exit code 2; a UTF-8 byte-order mark is not bad input."""

from __future__ import annotations

import json
import re
import sys

import pytest

from lorank import cli, data
from lorank.errors import LorankError
from lorank.targets import resolve_targets


def run(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["lorank", *args])
    capsys.readouterr()  # what the fixtures printed
    code = 0
    try:
        cli.main()
    except SystemExit as exit_:
        code = exit_.code or 0
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, pattern: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines and lines[0].startswith("error: "), err
    assert re.search(pattern, " ".join(lines)), err


@pytest.mark.parametrize(("name", "content", "line"), [
    ("latin1.jsonl", '{"text": "ok"}\n{"text": "café"}\n', 2),
    ("latin1.csv", "text,label\nok,a\ncafé,b\n", 3),
    ("latin1.json", '[{"text": "ok"},\n {"text": "café"}]', 2),
])
def test_latin1_file_is_one_error_naming_file_and_line(monkeypatch, capsys, tiny_llama_dir,
                                                       tmp_path, name, content, line):
    path = tmp_path / name
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(LorankError, match=rf"{name}:{line}: not UTF-8 text \(byte 0xe9\)"):
        data.read_dataset(path)
    code, err = run(monkeypatch, capsys, "recommend", "-m", str(tiny_llama_dir), "-d", str(path),
                    "--out", str(tmp_path / "o"), "--quiet")
    assert_one_line_error(code, err, rf"{name}:{line}: not UTF-8 text")


@pytest.mark.parametrize("name", ["bom.jsonl", "bom.json", "bom.csv"])
def test_utf8_byte_order_mark_is_dropped(tmp_path, name):
    rows = [{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": "c2"}]
    text = {
        "bom.jsonl": "".join(json.dumps(r) + "\r\n" for r in rows),
        "bom.json": json.dumps(rows),
        "bom.csv": "prompt,completion\r\np1,c1\r\np2,c2\r\n",
    }[name]
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    records, fmt = data.read_dataset(path)
    assert records == rows and fmt == "prompt-completion"


def test_jsonl_files_joined_keep_no_byte_order_mark_inside(tmp_path):
    path = tmp_path / "joined.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n\xef\xbb\xbf{"text": "b"}\n')
    assert data.load_records(path) == [{"text": "a"}, {"text": "b"}]


def test_csv_renamed_parquet_is_one_error(monkeypatch, capsys, tiny_llama_dir, tmp_path):
    path = tmp_path / "data.parquet"
    path.write_text("prompt,completion\na,b\n")
    with pytest.raises(LorankError, match=r"data.parquet: not a Parquet file \(.*magic bytes"):
        data.read_dataset(path)
    code, err = run(monkeypatch, capsys, "recommend", "-m", str(tiny_llama_dir), "-d", str(path),
                    "--out", str(tmp_path / "o"), "--quiet")
    assert_one_line_error(code, err, r"data.parquet: not a Parquet file \(")


def test_truncated_parquet_is_one_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "cut.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": "a" * 100}] * 20), path)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(LorankError, match=r"cut.parquet: (not a|unreadable) Parquet file \("):
        data.read_dataset(path)


def test_csv_row_with_more_values_than_columns(tmp_path):
    path = tmp_path / "wide.csv"
    path.write_text("text,label\na,x\nb,y,extra\n")
    with pytest.raises(LorankError, match=r"wide.csv:3: 3 values but the header names 2"):
        data.read_dataset(path)


def test_csv_fields_longer_than_the_csv_modules_default_limit_load(tmp_path):
    path = tmp_path / "long.csv"
    long = "x" * 200_000  # the csv module stops at 131,072 characters by default
    path.write_text(f"text\n{long}\nshort\n")
    assert data.load_records(path) == [{"text": long}, {"text": "short"}]


@pytest.mark.parametrize(("content", "message"), [
    ("[" * 100_000 + "]" * 100_000, "JSON nested too deeply"),
    ('[{"text": "a", "label": ' + "9" * 5000 + "}]", "unreadable JSON value"),
])
def test_json_the_parser_cannot_hold_is_one_error(tmp_path, content, message):
    path = tmp_path / "deep.json"
    path.write_text(content)
    with pytest.raises(LorankError, match=message):
        data.read_dataset(path)


def test_a_misspelt_target_name_is_an_error_not_dropped(tiny_llama):
    with pytest.raises(LorankError, match=r"vproj matches no linear module.*q_proj.*v_proj"):
        resolve_targets(tiny_llama, "q_proj,vproj")
    with pytest.raises(LorankError, match=r"kproj, vproj match no linear module"):
        resolve_targets(tiny_llama, "q_proj,kproj,vproj")
    assert len(resolve_targets(tiny_llama, "q_proj, v_proj").layers) == 4


def test_a_regex_matching_nothing_is_the_same_error(tiny_llama):
    with pytest.raises(LorankError, match=r"re:.*c_attn: matches no linear module.*q_proj"):
        resolve_targets(tiny_llama, r"re:.*c_attn")


def test_misspelt_target_at_the_cli(monkeypatch, capsys, tiny_llama_dir):
    code, err = run(monkeypatch, capsys, "targets", "-m", str(tiny_llama_dir),
                    "--targets", "q_proj,vproj")
    assert_one_line_error(code, err, r"--targets q_proj,vproj: vproj matches no linear module")


def test_a_lone_surrogate_from_a_json_escape_is_one_error(tmp_path, tokenizer):
    path = tmp_path / "surrogate.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "a\\ud800b"}\n')
    with pytest.raises(LorankError, match=r"record 2: field 'text': not valid Unicode"):
        data.prepare(path, tokenizer)
    chat = tmp_path / "chat.jsonl"
    chat.write_text('{"messages": [{"role": "user", "content": "\\udc80"}]}\n')
    with pytest.raises(LorankError, match=r"record 1: messages\[0\]: not valid Unicode"):
        data.read_dataset(chat)


def test_a_conversation_opening_with_the_assistant_supervises_its_turn(tokenizer):
    messages = [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "yo"}]
    out = data.tokenize({"messages": messages}, "chat", tokenizer, 64)
    assert out is not None
    supervised = [t for t in out["labels"] if t != data.IGNORE_INDEX]
    assert tokenizer.decode(supervised) == "hi</s>"  # the turn's text and end, not its header


def test_a_chat_template_that_rejects_a_conversation_is_one_error(tmp_path, tokenizer):
    tokenizer.chat_template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('must start with user') }}"
        "{% endif %}" + tokenizer.chat_template)
    rows = [{"messages": [{"role": "user", "content": f"q{i}"},
                          {"role": "assistant", "content": f"a{i}"}]} for i in range(4)]
    rows.append({"messages": [{"role": "assistant", "content": "a"}]})
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(LorankError, match=r"chat.jsonl: record 5: the chat template rejects "
                                          r"the conversation \(must start with user\)"):
        data.prepare(path, tokenizer)
