"""Format detection, loading, masking, splitting and profiling."""

from __future__ import annotations

import json

import pytest
from conftest import write_jsonl

from lorank import data
from lorank.errors import LorankError


@pytest.mark.parametrize("row,fmt", [
    ({"messages": [{"role": "user", "content": "a"}]}, "chat"),
    ({"instruction": "do", "input": "", "output": "done"}, "alpaca"),
    ({"prompt": "p", "completion": "c"}, "prompt-completion"),
    ({"text": "t", "label": "x"}, "classification"),
    ({"text": "t"}, "text"),
])
def test_detect_format(row, fmt):
    assert data.detect_format([row]) == fmt


def test_unknown_columns_lists_formats():
    with pytest.raises(LorankError, match=r"unknown columns \['foo'\].*prompt-completion: prompt"):
        data.detect_format([{"foo": 1}], "x.jsonl")


def test_prompt_completion_masks_prompt(tokenizer):
    ex = data.tokenize({"prompt": "abc", "completion": "de"}, "prompt-completion", tokenizer, 64)
    n_prompt = len(tokenizer("abc")["input_ids"])
    assert ex["labels"][:n_prompt] == [data.IGNORE_INDEX] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    assert ex["input_ids"][-1] == tokenizer.eos_token_id
    assert data.supervised_tokens(ex) == 3  # "d", "e", eos


def test_text_supervises_everything(tokenizer):
    ex = data.tokenize({"text": "hello"}, "text", tokenizer, 64)
    assert ex["labels"] == ex["input_ids"]


def test_alpaca_masks_instruction_and_input(tokenizer):
    rec = {"instruction": "Add", "input": "1 2", "output": "3"}
    ex = data.tokenize(rec, "alpaca", tokenizer, 256)
    supervised = [t for t in ex["labels"] if t != data.IGNORE_INDEX]
    assert tokenizer.decode(supervised, skip_special_tokens=True) == "3"
    assert "### Input:" in tokenizer.decode(ex["input_ids"])


def test_chat_supervises_only_assistant(tokenizer):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "ok"}, {"role": "assistant", "content": "zz"}]
    ex = data.tokenize({"messages": msgs}, "chat", tokenizer, 256)
    supervised = tokenizer.decode([t for t in ex["labels"] if t != data.IGNORE_INDEX])
    assert "yo" in supervised and "zz" in supervised
    assert "hi" not in supervised and "ok" not in supervised


def test_truncation_drops_examples_without_supervision(tokenizer):
    rec = {"prompt": "x" * 50, "completion": "y"}
    assert data.tokenize(rec, "prompt-completion", tokenizer, 20) is None


def test_collate_pads_labels(tokenizer):
    a = {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}
    b = {"input_ids": [5], "labels": [5]}
    batch = data.collate([a, b], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]


def test_loaders_agree(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(5)]
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "b.json").write_text(json.dumps(rows))
    (tmp_path / "c.csv").write_text("prompt,completion\n" + "".join(
        f"{r['prompt']},{r['completion']}\n" for r in rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("a.jsonl", "b.json", "c.csv", "d.parquet"):
        assert data.load_records(tmp_path / name) == rows, name
    assert len(data.load_records(tmp_path)) == 20  # a directory of them


def test_malformed_json_names_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(LorankError, match=r"bad.jsonl:2: malformed JSON"):
        data.load_records(path)


def test_missing_file():
    with pytest.raises(LorankError, match="data file not found: nowhere.jsonl"):
        data.load_records("nowhere.jsonl")


def test_empty_dataset(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(LorankError, match="empty dataset"):
        data.read_dataset(tmp_path / "empty.jsonl")


def test_missing_field_names_record(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c"}])
    with pytest.raises(LorankError, match="record 2: missing field 'completion'"):
        data.read_dataset(path)


@pytest.mark.parametrize(("row", "message"), [
    ({"text": ["a", "b"]}, "record 2: field 'text': expected text, got a JSON list"),
    ({"prompt": {"q": 1}, "completion": "c"}, "record 2: field 'prompt': expected text"),
    ({"instruction": "i", "input": ["x"], "output": "o"}, "record 2: field 'input': expected"),
    ({"text": "t", "label": ["x"]}, "record 2: field 'label': expected a class name or number"),
    ({"messages": "hi"}, "record 2: field 'messages': expected a non-empty list"),
    ({"messages": []}, "record 2: field 'messages': expected a non-empty list"),
    ({"messages": ["hi"]}, r"record 2: messages\[0\]: expected an object"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]},
     r"record 2: messages\[1\]: expected a string 'content'"),
])
def test_malformed_values_name_record_and_field(tmp_path, row, message):
    """Values of the wrong kind fail at reading with the record and field, not as a traceback
    from the chat template or as a Python repr tokenized in place of text."""
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    fmt = data.detect_format([row])
    first = good if fmt == "chat" else {k: (v if k == "label" else "ok") for k, v in row.items()}
    if fmt == "classification":
        first = {"text": "ok", "label": "x"}
    path = write_jsonl(tmp_path / "m.jsonl", [first, row])
    with pytest.raises(LorankError, match=message):
        data.read_dataset(path)


def test_one_label_is_not_a_classification_task(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": f"t{i}", "label": "same"} for i in range(6)])
    with pytest.raises(LorankError, match="every record has the label 'same'"):
        data.prepare(path, tokenizer)


def test_chat_without_assistant_turns_says_which_turns_train(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl",
                       [{"messages": [{"role": "user", "content": "hi"}]} for _ in range(4)])
    with pytest.raises(LorankError, match="only turns with role 'assistant' are trained on"):
        data.prepare(path, tokenizer)


def test_no_supervised_tokens(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "long.jsonl",
                       [{"prompt": "x" * 40, "completion": "y"} for _ in range(4)])
    with pytest.raises(LorankError, match="no supervised tokens"):
        data.prepare(path, tokenizer, max_length=8)


def test_split_is_seeded_and_disjoint(pc_data, tokenizer):
    a = data.prepare(pc_data, tokenizer, seed=1)
    b = data.prepare(pc_data, tokenizer, seed=1)
    c = data.prepare(pc_data, tokenizer, seed=2)
    assert a.val == b.val and a.train == b.train
    assert a.val != c.val
    train_ids = {tuple(e["input_ids"]) for e in a.train}
    assert not train_ids & {tuple(e["input_ids"]) for e in a.val}
    assert len(a.train) + len(a.val) == 40


def test_classification_labels_and_profile(cls_data, tokenizer):
    prep = data.prepare(cls_data, tokenizer)
    assert prep.task == "classification" and prep.label_ids == {"food": 0, "nature": 1, "thing": 2}
    prof = data.profile(prep)
    assert abs(prof.label_entropy_bits - 1.58) < 0.1
    assert prof.total_bits == pytest.approx(prof.label_entropy_bits * prof.examples)


def test_profile_measures_base_loss(pc_data, tokenizer, tiny_llama):
    prep = data.prepare(pc_data, tokenizer)
    prof = data.profile(prep, tiny_llama, sample=8, pad_token_id=0, progress=False)
    # a random 128-way model pays about ln(128) nats per token
    assert 3.5 < prof.base_loss_nats < 6.0
    assert prof.base_loss_bits == pytest.approx(prof.base_loss_nats / 0.6931, rel=1e-3)
    assert prof.supervised_tokens == sum(data.supervised_tokens(e) for e in prep.train)
    assert prof.duplicate_rate == 0.0
