"""Benchmark task builders: deterministic, well-formed, split the way each task needs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorank.bench import tasks
from lorank.bench.tasks import TASKS, acronyms, build_task, man_pages, wordnet

# What each task reads; a task whose data is absent is skipped with the install command.
DATA = {
    "wordnet-base": wordnet.WORDNET_DIR / "data.noun",
    "dict-vera": acronyms.VERA_DIR / "vera.index",
    "manpages-dev": man_pages.MAN_DIR / "man3" / "strlen.3.gz",
}


def need(name: str) -> None:
    for src in TASKS[name].sources:
        if src in DATA and not DATA[src].exists():
            pytest.skip(f"Debian package {src} not installed (bash scripts/install-task-data.sh)")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def build(name: str, out: Path, seed: int = 0, limit: int | None = None) -> dict:
    need(name)
    return build_task(name, out, seed=seed, limit=limit)


def test_unknown_task_names_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown task 'nope'; known: format-json, facts-100, facts-300"):
        build_task("nope", tmp_path)


def test_missing_package_says_how_to_install(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(wordnet, "WORDNET_DIR", tmp_path / "no-wordnet")  # read there
    with pytest.raises(ValueError, match=r"wordnet-base.*bash scripts/install-task-data.sh"):
        build_task("format-json", tmp_path / "out")


def test_recipes_are_complete() -> None:
    assert len(TASKS) >= 6
    for spec in TASKS.values():
        assert spec.model in ("smollm2-135m", "minilm-l6")
        assert spec.ranks == (1, 2, 4, 8, 16, 32, 64)
        assert spec.seeds == (0, 1) and spec.scaling == "rslora"
        assert len(spec.lrs) >= 2 and spec.targets == "all-linear"
        assert spec.n_runs == 7 * len(spec.lrs) * 2 and spec.sweep_hours() > 0
        assert 16 <= spec.mean_tokens <= 96
        json.dumps(spec.to_dict())
    # the estimate scales with the work: the nested memorization sizes cost in proportion
    hours = [TASKS[f"facts-{n}"].sweep_hours() for n in (100, 300, 1000)]
    assert hours[0] < hours[1] < hours[2]


@pytest.mark.parametrize("name", list(TASKS))
def test_build_is_deterministic_and_well_formed(name: str, tmp_path: Path) -> None:
    a = build(name, tmp_path / "a", seed=0, limit=40)
    b = build(name, tmp_path / "b", seed=0, limit=40)
    c = build(name, tmp_path / "c", seed=1, limit=40)
    for key in ("train", "val", "task"):
        assert a[key].read_bytes() == b[key].read_bytes(), key
    assert a["train"].read_bytes() != c["train"].read_bytes()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "task.json",
        "train.jsonl",
        "val.jsonl",
    ]  # no temporary files left behind

    spec = TASKS[name]
    columns = {"prompt-completion": {"prompt", "completion"}, "chat": {"messages"},
               "classification": {"text", "label"}}[spec.format]
    for split in ("train", "val"):
        rows = read_jsonl(a[split])
        assert len(rows) == 40
        for row in rows:
            assert set(row) == columns
            if "messages" in row:  # a system turn, then user and assistant, all non-empty
                assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
                row = {m["role"]: m["content"] for m in row["messages"]}
            assert all(isinstance(v, str) and v.strip() for v in row.values())
            if "completion" in row:
                assert row["completion"].startswith(" ")
    info = json.loads(a["task"].read_text())
    assert info["seed"] == 0 and info["task"]["name"] == name
    assert info["n_train"] == info["n_val"] == 40
    for src, version in info["sources"].items():
        assert version, f"no version recorded for {src}"


def test_facts_are_nested_and_validated_on_trained_facts(tmp_path: Path) -> None:
    pairs = {}
    for n in (100, 300, 1000):
        paths = build(f"facts-{n}", tmp_path / str(n))
        train, val = read_jsonl(paths["train"]), read_jsonl(paths["val"])
        assert len(train) == n and len(val) == min(n, 300)
        facts = [(r["prompt"].removeprefix("Acronym: "), r["completion"]) for r in train]
        assert all(r["prompt"].startswith("Acronym: ") for r in train)
        assert len({a for a, _ in facts}) == n  # one expansion per acronym
        trained = {r["completion"]: r["prompt"] for r in train}
        for r in val:
            assert r["prompt"].startswith("What does ")  # the other template
            assert r["completion"] in trained and r["prompt"] != trained[r["completion"]]
        pairs[n] = facts
    assert pairs[300][:100] == pairs[100]
    assert pairs[1000][:300] == pairs[300]


def test_code_split_is_disjoint_by_function(tmp_path: Path) -> None:
    paths = build("code-docstring", tmp_path)
    train, val = read_jsonl(paths["train"]), read_jsonl(paths["val"])
    assert len(train) == TASKS["code-docstring"].n_train
    assert len(val) == TASKS["code-docstring"].n_val
    code = [r["prompt"].split("\n", 1)[1] for r in train]
    assert not {r["prompt"].split("\n", 1)[1] for r in val} & set(code)
    assert len(set(code)) == len(code)
    assert all(r["prompt"].endswith("# Summary:") and "def " in r["prompt"] for r in train)


def test_lexname_has_ten_balanced_classes_and_disjoint_synsets(tmp_path: Path) -> None:
    paths = build("wordnet-lexname", tmp_path)
    train, val = read_jsonl(paths["train"]), read_jsonl(paths["val"])
    for rows, per_class in ((train, 250), (val, 50)):
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["label"]] = counts.get(r["label"], 0) + 1
        assert sorted(counts) == sorted(tasks.LEXNAME_CLASSES)
        assert set(counts.values()) == {per_class}
    assert not {r["text"] for r in train} & {r["text"] for r in val}
    info = json.loads(paths["task"].read_text())
    assert info["builder"]["labels"] == list(tasks.LEXNAME_CLASSES)


def test_format_json_completion_is_the_prompt_rendered(tmp_path: Path) -> None:
    paths = build("format-json", tmp_path, limit=100)
    train, val = read_jsonl(paths["train"]), read_jsonl(paths["val"])
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in val}
    for r in train + val:
        record = json.loads(r["completion"])
        assert list(record) == ["word", "pos", "def", "syn", "ex"]
        for text in (record["word"], record["def"], *record["syn"]):
            assert text in r["prompt"]  # nothing to remember: only the format is learned
        if record["ex"] is not None:
            assert record["ex"] in r["prompt"]


def test_man_names_split_is_disjoint(tmp_path: Path) -> None:
    paths = build("man-names", tmp_path)
    train, val = read_jsonl(paths["train"]), read_jsonl(paths["val"])
    assert len(train) == TASKS["man-names"].n_train
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in val}
    assert not {r["completion"] for r in train} & {r["completion"] for r in val}


def test_wordnet_chat_holds_out_headwords(tmp_path: Path) -> None:
    paths = build("wordnet-chat", tmp_path, seed=0, limit=40)
    heads = {split: {json.loads(line)["messages"][1]["content"].split(" (")[0]
                     for line in paths[split].read_text().splitlines()}
             for split in ("train", "val")}
    assert len(heads["train"]) == 40 and not heads["train"] & heads["val"]
