"""The Hugging Face Hub as every Hugging Face tool uses it, without touching the network: a hub
model id or `datasets` name downloads when it is not cached and the network is allowed (the
call is checked at the huggingface_hub / `datasets` boundary), `--offline` or HF_HUB_OFFLINE
reads the cache only, and what the Hub refuses (gated, not found, 401) is one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import huggingface_hub.constants as hub_constants
import pytest
from test_cli import run

import lorank
import lorank.api
from lorank import cli, hub
from lorank.errors import LorankError
from lorank.models import load_model, resolve_source

REPO = "someone/tiny-llama"
ROWS = [{"prompt": f"q{i}:", "completion": f" a{i % 7}"} for i in range(24)]


@pytest.fixture
def online(monkeypatch):
    """The network allowed, as far as lorank can tell (the downloads themselves are fakes)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache of this test's own."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def plant(cache: Path, repo_id: str, files_from: Path) -> Path:
    """A model in the cache's own layout: models--org--name/snapshots/<rev>/, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("a" * 40)
    shutil.copytree(files_from, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    return snapshot


class FakeDownload:
    """Stands in for `huggingface_hub.snapshot_download`: records each call and 'downloads' by
    planting `files_from` in the cache on the first call."""

    def __init__(self, cache: Path, files_from: Path):
        self.cache, self.files_from, self.calls = cache, files_from, []

    def __call__(self, repo_id, **kwargs):
        self.calls.append({"repo_id": repo_id, **kwargs})
        snapshot = self.cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / ("a" * 40)
        if not snapshot.exists():
            plant(self.cache, repo_id, self.files_from)
        return str(snapshot)


def one_line_error(code: int, err: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# --------------------------------------------------------------------------------- models


def test_a_hub_id_not_cached_downloads_when_the_network_is_allowed(tiny_llama_dir, hub_cache,
                                                                   online, monkeypatch):
    fake = FakeDownload(hub_cache, tiny_llama_dir)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    loaded = load_model(REPO)
    assert loaded.model.config.num_hidden_layers == 2 and loaded.path == REPO
    (call,) = fake.calls
    assert call["repo_id"] == REPO and call["local_files_only"] is False
    assert "token" not in call  # huggingface_hub's own: HF_TOKEN or `hf auth login`
    patterns = call["allow_patterns"]
    assert "model.safetensors" in patterns and "config.json" not in patterns  # via *.json
    assert not any(p.endswith((".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf", ".py"))
                   for p in patterns)  # safetensors only, and no code without being asked


def test_remote_code_is_fetched_only_when_asked(tiny_llama_dir, hub_cache, online, monkeypatch):
    fake = FakeDownload(hub_cache, tiny_llama_dir)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    resolve_source(REPO)
    resolve_source(REPO, trust_remote_code=True)
    assert ["*.py" in c["allow_patterns"] for c in fake.calls] == [False, True]


def test_a_sharded_checkpoint_fetches_exactly_its_shards(tiny_llama_dir, tmp_path, hub_cache,
                                                         online, monkeypatch):
    """The first call brings config, tokenizer and the index; the index names the shards,
    which the second call fetches (no other weight files of the repository come along)."""
    from conftest import make_llama, make_tokenizer

    sharded = tmp_path / "sharded"
    make_llama().save_pretrained(sharded, max_shard_size="20KB")
    make_tokenizer().save_pretrained(sharded)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    fake = FakeDownload(hub_cache, sharded)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    loaded = load_model(REPO)
    assert loaded.model.config.num_hidden_layers == 2
    assert [c["allow_patterns"] for c in fake.calls][1] == shards


@pytest.mark.parametrize("how", ["flag", "env"])
def test_offline_reads_the_cache_only(tiny_llama_dir, hub_cache, monkeypatch, how):
    """--offline (offline=True) and HF_HUB_OFFLINE=1 read a cached model with
    local_files_only=True, and the real huggingface_hub finds it in the cache's layout."""
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    if how == "env":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    plant(hub_cache, REPO, tiny_llama_dir)
    calls = []
    real = huggingface_hub.snapshot_download

    def recorded(repo_id, **kwargs):
        calls.append(kwargs["local_files_only"])
        return real(repo_id, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", recorded)
    loaded = load_model(REPO, offline=how == "flag")
    assert loaded.model.config.num_hidden_layers == 2
    assert calls and all(calls)
    reason = "--offline" if how == "flag" else "HF_HUB_OFFLINE"
    fix = "run without --offline" if how == "flag" else "unset HF_HUB_OFFLINE"
    message = (f"model 'someone/absent' is not in the local Hugging Face cache and {reason} "
               f"forbids downloading it: fetch it with `hf download someone/absent` or {fix}")
    with pytest.raises(LorankError) as err:
        load_model("someone/absent", offline=how == "flag")
    assert str(err.value) == message


def test_a_partial_snapshot_counts_as_not_cached(tiny_llama_dir, tmp_path, hub_cache,
                                                 monkeypatch):
    """Offline, a snapshot holding the config but no weights is not a model to load."""
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(tiny_llama_dir / "config.json", partial / "config.json")
    plant(hub_cache, REPO, partial)
    with pytest.raises(LorankError, match="not in the local Hugging Face cache and --offline"):
        load_model(REPO, offline=True)


def test_offline_not_cached_is_one_line_at_the_cli(hub_cache, pc_data, tmp_path, monkeypatch,
                                                   capsys):
    for command in ("recommend", "analyze", "probe", "sweep"):
        code, _, err = run(monkeypatch, capsys, command, "-m", "someone/absent", "-d",
                           str(pc_data), "--offline", "--out", str(tmp_path / command),
                           "--quiet")
        line = one_line_error(code, err)
        assert "someone/absent" in line and "hf download someone/absent" in line, command
    code, _, err = run(monkeypatch, capsys, "targets", "-m", "someone/absent", "--offline")
    assert "hf download someone/absent" in one_line_error(code, err)


def _http_error(cls, status: int):
    response = SimpleNamespace(status_code=status, headers={}, request=None)
    return cls(f"{status} Client Error.\n\nlong explanation\nover several lines",
               response=response)


@pytest.mark.parametrize(("error", "expected"), [
    ("gated", "gated on the Hugging Face Hub: accept its terms at "
              "https://huggingface.co/someone/gated, then set HF_TOKEN"),
    ("missing", "no local file or folder of that name, and the Hugging Face Hub has no such "
                "repository (if it is private, set HF_TOKEN or run `hf auth login`)"),
    ("401", "the Hugging Face Hub refused access (HTTP 401): set HF_TOKEN"),
    ("network", "the Hugging Face Hub cannot be reached and it is not in the local cache"),
])
def test_what_the_hub_refuses_is_one_line(online, hub_cache, pc_data, tmp_path, monkeypatch,
                                          capsys, error, expected):
    from huggingface_hub import errors

    raised = {
        "gated": lambda: _http_error(errors.GatedRepoError, 403),
        "missing": lambda: _http_error(errors.RepositoryNotFoundError, 404),
        "401": lambda: _http_error(errors.HfHubHTTPError, 401),
        "network": lambda: errors.LocalEntryNotFoundError("Got: ConnectError\nplease check"),
    }[error]

    def refuse(repo_id, **kwargs):
        assert kwargs["local_files_only"] is False
        raise raised()

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    code, _, err = run(monkeypatch, capsys, "recommend", "-m", "someone/gated", "-d",
                       str(pc_data), "--out", str(tmp_path / "o"), "--quiet")
    line = one_line_error(code, err)
    assert line.startswith("error: model 'someone/gated': " + expected), line


def test_a_name_that_is_no_hub_id_lists_what_is_expected():
    with pytest.raises(LorankError, match=r"expected a local directory, a .gguf file, a hub id "
                       r"\(org/name\), or an alias"):
        resolve_source("no-such-model")


def test_offline_is_a_keyword_of_the_api_and_an_option_of_the_cli():
    import inspect

    import typer

    for fn in (lorank.api.recommend, lorank.api.sweep, lorank.api.prepare_inputs, load_model):
        assert inspect.signature(fn).parameters["offline"].default is False, fn.__name__
    commands = typer.main.get_command(cli.app).commands
    for name in ("recommend", "analyze", "probe", "sweep", "targets"):
        opts = {o for p in commands[name].params for o in getattr(p, "opts", [])}
        assert "--offline" in opts, name


def test_offline_reason():
    assert hub.offline_reason(True) == "--offline"
    assert hub.looks_like_repo_id("org/name") and not hub.looks_like_repo_id("./org/name")
    assert not hub.looks_like_repo_id("a/b/c") and not hub.looks_like_repo_id("name")


# ------------------------------------------------------------------------------- datasets


def _fake_load_dataset(seen: list, splits: dict[str, list[dict]]):
    import datasets

    def load_dataset(name, *args, **kwargs):
        seen.append({"name": name, "hub_offline": hub_constants.HF_HUB_OFFLINE,
                     "datasets_offline": datasets.config.HF_HUB_OFFLINE, **kwargs})
        return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})

    return load_dataset


def test_a_datasets_name_downloads_when_allowed_and_its_splits_are_kept(online, monkeypatch):
    import datasets
    import datasets.config

    from lorank.data import read_data

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    seen = []
    monkeypatch.setattr(datasets, "load_dataset",
                        _fake_load_dataset(seen, {"train": ROWS, "test": ROWS[:4]}))
    records = read_data("someone/toy")
    assert seen == [{"name": "someone/toy", "hub_offline": False, "datasets_offline": False}]
    assert records.train == ROWS and records.val == ROWS[:4]
    assert "validation data: split 'test' of someone/toy (4 records)" in records.notes
    seen.clear()
    read_data("someone/toy", offline=True)  # the same call, with the network off
    assert seen[0]["hub_offline"] is True and seen[0]["datasets_offline"] is True
    assert datasets.config.HF_HUB_OFFLINE is False  # restored afterwards


def test_a_datasets_name_the_hub_lacks_is_one_line(online, monkeypatch, tmp_path, capsys,
                                                   tiny_llama_dir):
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    def missing(name, *args, **kwargs):
        raise DatasetNotFoundError(f"Dataset '{name}' doesn't exist on the Hub or cannot be "
                                   "accessed.\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", missing)
    code, _, err = run(monkeypatch, capsys, "recommend", "-m", str(tiny_llama_dir), "-d",
                       "someone/nothing", "--out", str(tmp_path / "o"), "--quiet")
    line = one_line_error(code, err)
    assert ("data 'someone/nothing': no local file or folder of that name, and Dataset "
            "'someone/nothing' doesn't exist on the Hub") in line and "HF_TOKEN" in line


def test_offline_datasets_name_not_cached_is_one_line(tmp_path, monkeypatch, capsys,
                                                      tiny_llama_dir):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty-cache")
    code, _, err = run(monkeypatch, capsys, "recommend", "-m", str(tiny_llama_dir), "-d",
                       "someone/absent", "--offline", "--out", str(tmp_path / "o"), "--quiet")
    line = one_line_error(code, err)
    assert ("data 'someone/absent' is not a local file or folder, nor a `datasets` name in "
            "the local cache, and --offline forbids downloading it: run without --offline "
            "once to download it") in line


def test_recommend_runs_on_a_downloaded_model(tiny_llama_dir, hub_cache, online, pc_data,
                                              tmp_path, monkeypatch, one_thread):
    """The whole verb on a hub id: downloaded once into the cache, then named by its id in the
    exported adapter config."""
    fake = FakeDownload(hub_cache, tiny_llama_dir)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    rec = lorank.recommend(REPO, pc_data, out=tmp_path / "out", max_length=32, progress=False)
    assert rec.inputs["model"] == REPO and rec.inputs["model_path"] == REPO
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == REPO
    assert fake.calls and not any(c["local_files_only"] for c in fake.calls)
