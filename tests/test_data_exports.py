"""Data as people export it, each shape written by the library that makes it: `datasets`'
save_to_disk (a Dataset, a DatasetDict), JSON Lines in a .json file (`Dataset.to_json`), a UTF-8
byte-order mark, and hub-style folders of split files (`train-*.parquet`, `data/validation-...`).
A split named validation/valid/dev/test becomes the validation set unless --val-data is
given, and the notes say which split went where; bad input stays one line."""

from __future__ import annotations

import json
import sys

import datasets
import pandas as pd
import pytest
from conftest import write_jsonl

from lorank import cli, data
from lorank.errors import LorankError

ROWS = [{"prompt": f"q{i}:", "completion": f" a{i % 7}"} for i in range(30)]
TRAIN, TEST, VALID = ROWS[:20], ROWS[20:25], ROWS[25:]


def ds(rows):
    return datasets.Dataset.from_list(rows)


# ----------------------------------------------------------------------------- save_to_disk


def test_a_saved_dataset_loads(tmp_path, tokenizer):
    ds(ROWS).save_to_disk(tmp_path / "saved")
    records = data.read_data(tmp_path / "saved")
    assert records.train == ROWS and records.val is None and records.fmt == "prompt-completion"
    prepared = data.prepare(tmp_path / "saved", tokenizer, seed=0)
    assert len(prepared.train) + len(prepared.val) == 30
    assert prepared.notes == [f"validation data: 3 of the 30 records of {tmp_path / 'saved'}, "
                              "split off by seed 0"]


def test_a_saved_dataset_dict_keeps_its_splits(tmp_path, tokenizer):
    folder = tmp_path / "saved-dict"
    datasets.DatasetDict({"train": ds(TRAIN), "test": ds(TEST)}).save_to_disk(folder)
    assert data.load_records(folder) == TRAIN  # not the splits merged
    prepared = data.prepare(folder, tokenizer)
    assert (len(prepared.train), len(prepared.val)) == (20, 5)
    assert prepared.notes == [f"training data: split 'train' of {folder} (20 records)",
                              f"validation data: split 'test' of {folder} (5 records)"]


def test_validation_is_preferred_to_test_and_other_splits_are_named(tmp_path):
    folder = tmp_path / "three"
    datasets.DatasetDict({"train": ds(TRAIN), "test": ds(TEST), "validation": ds(VALID),
                          "unsupervised": ds(TEST)}).save_to_disk(folder)
    records = data.read_data(folder)
    assert records.val == VALID
    assert f"split 'test' of {folder} not used" in records.notes
    assert f"split 'unsupervised' of {folder} not used" in records.notes


def test_val_data_given_wins_over_the_folders_split(tmp_path, tokenizer):
    folder = tmp_path / "saved-dict"
    datasets.DatasetDict({"train": ds(TRAIN), "validation": ds(TEST)}).save_to_disk(folder)
    val = write_jsonl(tmp_path / "val.jsonl", VALID)
    prepared = data.prepare(folder, tokenizer, val_source=val)
    assert (len(prepared.train), len(prepared.val)) == (20, 5)
    assert prepared.notes[-1] == (f"validation data: {val} (--val-data, 5 records); "
                                  f"split 'validation' of {folder} not used")
    assert prepared.data_hash == data.data_hash(TRAIN + VALID)


def test_a_damaged_saved_dataset_is_one_error(tmp_path):
    folder = tmp_path / "saved"
    ds(ROWS).save_to_disk(folder)
    for arrow in folder.glob("*.arrow"):
        arrow.unlink()
    with pytest.raises(LorankError) as err:
        data.read_dataset(folder)
    message = str(err.value)
    assert message.startswith(f"{folder}: unreadable `datasets` folder, expected what "
                              "save_to_disk writes (")
    assert "\n" not in message


# ------------------------------------------------------------------------ JSON Lines in .json


def test_json_lines_in_a_json_file(tmp_path):
    path = tmp_path / "export.json"
    ds(ROWS).to_json(path)  # JSON Lines, the `datasets` default
    assert data.load_records(path) == ROWS
    one = tmp_path / "one.json"
    ds(ROWS[:1]).to_json(one)  # one record: one object on one line
    assert data.load_records(one) == ROWS[:1]
    frame = tmp_path / "frame.json"
    pd.DataFrame(ROWS).to_json(frame, orient="records", lines=True)
    assert data.load_records(frame) == ROWS


def test_json_lines_in_a_json_file_names_the_bad_line(tmp_path):
    path = tmp_path / "export.json"
    ds(ROWS[:3]).to_json(path)
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:-3]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LorankError, match=r"export.json:2: malformed JSON"):
        data.read_dataset(path)
    path.write_text('{"prompt": "a", "completion": "b"}\n[1, 2]\n')
    with pytest.raises(LorankError, match=r"export.json:2: expected a JSON object per line"):
        data.read_dataset(path)
    path.write_text('{"prompt": "a",\n "completion": "b"}\n')  # one object, pretty-printed
    with pytest.raises(LorankError, match=r"export.json: expected a JSON list of objects .* or "
                       r"JSON Lines"):
        data.read_dataset(path)


# ---------------------------------------------------------------------------- byte-order mark


def test_a_byte_order_mark_is_fine(tmp_path):
    csv_path = tmp_path / "excel.csv"
    pd.DataFrame(ROWS).to_csv(csv_path, index=False, encoding="utf-8-sig")
    assert csv_path.read_bytes().startswith(b"\xef\xbb\xbf")
    assert data.read_dataset(csv_path) == (ROWS, "prompt-completion")
    json_path = tmp_path / "bom.json"
    ds(ROWS).to_json(json_path)
    json_path.write_bytes(b"\xef\xbb\xbf" + json_path.read_bytes())
    assert data.read_dataset(json_path) == (ROWS, "prompt-completion")


# ------------------------------------------------------------------------ hub-style folders


def test_top_level_split_files_are_splits_not_one_set(tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    ds(TRAIN[:10]).to_parquet(folder / "train-00000-of-00002.parquet")
    ds(TRAIN[10:]).to_parquet(folder / "train-00001-of-00002.parquet")
    ds(TEST).to_parquet(folder / "test-00000-of-00001.parquet")
    (folder / "README.md").write_text("# a dataset card\n")
    records = data.read_data(folder)
    assert records.train == TRAIN and records.val == TEST
    assert records.notes == [f"training data: split 'train' of {folder} (20 records)",
                             f"validation data: split 'test' of {folder} (5 records)"]


def test_a_hub_repository_layout(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "repo"
    (folder / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(TRAIN), folder / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(VALID),
                   folder / "data" / "validation-00000-of-00001.parquet")
    pd.DataFrame(TEST).to_parquet(folder / "data" / "test-00000-of-00001.parquet")
    prepared = data.prepare(folder, tokenizer)
    assert (len(prepared.train), len(prepared.val)) == (20, 5)
    assert prepared.notes == [f"training data: split 'train' of {folder} (20 records)",
                              f"validation data: split 'validation' of {folder} (5 records)",
                              f"split 'test' of {folder} not used"]
    assert prepared.data_hash == data.data_hash(TRAIN + VALID)


def test_split_files_and_a_file_naming_no_split(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", TRAIN)
    write_jsonl(folder / "dev.jsonl", TEST)
    write_jsonl(folder / "notes.jsonl", VALID)
    records = data.read_data(folder)
    assert records.train == TRAIN and records.val == TEST
    assert records.notes[-1] == (f"not read: 1 file(s) under {folder} whose names name no "
                                 "split (notes.jsonl)")


def test_files_naming_no_split_are_one_set(tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    write_jsonl(folder / "part1.jsonl", TRAIN)
    write_jsonl(folder / "part2.jsonl", TEST)
    records = data.read_data(folder)
    assert records.train == TRAIN + TEST and records.val is None and records.notes == []


def test_splits_without_a_train_split_are_one_error(tmp_path):
    folder = tmp_path / "eval-only"
    folder.mkdir()
    write_jsonl(folder / "test.jsonl", TEST)
    write_jsonl(folder / "validation.jsonl", VALID)
    with pytest.raises(LorankError, match=r"eval-only: splits 'validation', 'test' but none "
                       r"named train; expected a train split"):
        data.read_dataset(folder)


def test_a_validation_split_with_other_columns_names_it(tmp_path):
    folder = tmp_path / "repo"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", TRAIN)
    write_jsonl(folder / "test.jsonl", [{"prompt": "q"}])
    with pytest.raises(LorankError, match=rf"split 'test' of {folder}: record 1: missing "
                       r"field 'completion'"):
        data.read_dataset(folder)


def test_classification_labels_of_the_validation_split_count(tmp_path):
    folder = tmp_path / "cls"
    rows = [{"text": f"t{i}", "label": i % 2} for i in range(12)]
    datasets.DatasetDict({"train": ds(rows), "validation": ds([{"text": "x", "label": 2}])}
                         ).save_to_disk(folder)
    from conftest import make_tokenizer

    prepared = data.prepare(folder, make_tokenizer())
    assert prepared.num_labels == 3


def test_the_run_says_which_split_went_where(tmp_path, tiny_llama_dir, monkeypatch, capsys):
    """`lorank recommend` on a folder with splits and --val-data: the terminal and
    recommendation.json say the explicit validation set won over the folder's."""
    folder = tmp_path / "export"
    datasets.DatasetDict({"train": ds(TRAIN), "test": ds(TEST)}).save_to_disk(folder)
    val = write_jsonl(tmp_path / "val.jsonl", VALID)
    monkeypatch.setattr(sys, "argv", ["lorank", "recommend", "-m", str(tiny_llama_dir), "-d",
                                      str(folder), "--val-data", str(val), "--max-length", "32",
                                      "--out", str(tmp_path / "o"), "--quiet"])
    cli.main()
    out = " ".join(capsys.readouterr().out.split())  # the summary wraps to the terminal
    ignored = (f"validation data: {val} (--val-data, 5 records); split 'test' of {folder} not "
               "used")
    assert f"training data: split 'train' of {folder} (20 records)" in out
    assert ignored in out
    rec = json.loads((tmp_path / "o" / "recommendation.json").read_text())
    assert ignored in rec["inputs"]["profile"]["notes"]
