"""Every input path of the foundation: cached `datasets` names, cached hub ids, GGUF files and
their safetensors cache, dtype/device options, remote code off by default, --val-data and
--format, the data profile, the capacity ceiling and the adapter's size on disk."""

from __future__ import annotations

import glob
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_llama, make_tokenizer, write_jsonl

import lorank.models as models_mod
from lorank.data import DataProfile, prepare
from lorank.errors import LorankError
from lorank.estimators.capacity import capacity_evidence
from lorank.models import load_model, resolve_source
from lorank.targets import adapter_bytes, resolve_targets

ROWS = [{"prompt": f"q{i}:", "completion": f" a{i % 7}"} for i in range(24)]


def test_package_level_api_mirrors_the_cli():
    import lorank.api
    import lorank.sweep  # a submodule: must not shadow or be shadowed by an API verb

    assert lorank.recommend is lorank.api.recommend
    assert lorank.prepare_inputs is lorank.api.prepare_inputs
    assert lorank.sweep.run_sweep is not None
    with pytest.raises(AttributeError):
        lorank.no_such_verb  # noqa: B018


def test_a_cached_datasets_name_loads_offline(tmp_path, monkeypatch):
    """A hub dataset already in the `datasets` cache loads with the network off (--offline);
    an uncached name is refused with one line (no download is attempted)."""
    import datasets
    import datasets.config

    from lorank.data import read_dataset

    cache = tmp_path / "datasets-cache"
    source = write_jsonl(tmp_path / "d.jsonl", ROWS)
    datasets.load_dataset("json", data_files={"train": str(source)}, cache_dir=str(cache))
    built = Path(glob.glob(str(cache / "json" / "*" / "*" / "*"))[0])
    planted = cache / "someone___toy" / "default" / "0.0.0" / built.name
    shutil.copytree(built, planted)
    for arrow in planted.glob("json-*.arrow"):  # the cache module names files by dataset
        arrow.rename(arrow.with_name(arrow.name.replace("json-", "toy-", 1)))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # hub_offline must set it
    records, fmt = read_dataset("someone/toy", offline=True)
    assert fmt == "prompt-completion" and records == ROWS
    assert datasets.config.HF_HUB_OFFLINE is False  # restored afterwards
    with pytest.raises(LorankError, match="'someone/absent' is not a local file or folder, nor "
                       "a `datasets` name in the local cache, and --offline forbids"):
        read_dataset("someone/absent", offline=True)


def _plant_in_hub_cache(hub: Path, repo_id: str, files_from: Path) -> None:
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(files_from, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)


def test_a_cached_hub_id_loads_from_the_cache_offline(tiny_llama_dir, tmp_path, monkeypatch):
    """--offline: a hub id in the Hugging Face cache loads from its snapshot, transformers
    never asked to reach the network; one not cached is one line saying how to fetch it."""
    import huggingface_hub.constants as hub_constants

    hub = tmp_path / "hub"
    _plant_in_hub_cache(hub, "someone/tiny-llama", tiny_llama_dir)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    read_from = []
    real = models_mod.AutoConfig.from_pretrained

    def config_from(path, **kw):
        read_from.append(str(path))
        return real(path, **kw)

    monkeypatch.setattr(models_mod.AutoConfig, "from_pretrained", config_from)
    loaded = load_model("someone/tiny-llama", offline=True)
    assert loaded.model.config.num_hidden_layers == 2
    assert loaded.path == "someone/tiny-llama"  # exported configs name the hub id
    assert read_from and all(Path(p).is_dir() and str(hub) in p for p in read_from)
    with pytest.raises(LorankError, match="model 'someone/not-cached' is not in the local "
                       "Hugging Face cache and --offline forbids .*hf download someone/not-cached"):
        load_model("someone/not-cached", offline=True)


def test_a_gguf_file_is_dequantized_once_then_read_from_its_cache(tmp_path, monkeypatch):
    gguf = tmp_path / "models" / "tiny.Q8_0.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF stand-in")
    assert resolve_source(str(gguf)) == (str(gguf.parent), gguf.name, None)
    with pytest.raises(LorankError, match="model file not found"):
        resolve_source(str(tmp_path / "missing.gguf"))
    monkeypatch.setenv("LORANK_CACHE", str(tmp_path / "cache"))
    dequantized = []

    def from_gguf(directory, gguf_file=None, **_):
        dequantized.append(gguf_file)
        return make_llama()

    monkeypatch.setattr(models_mod.AutoModelForCausalLM, "from_pretrained", from_gguf)
    monkeypatch.setattr(models_mod.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: make_tokenizer())
    first = models_mod._dequantized_gguf(str(gguf.parent), gguf.name)
    second = models_mod._dequantized_gguf(str(gguf.parent), gguf.name)
    assert first == second and dequantized == [gguf.name]  # the second load reads the cache
    assert (Path(first) / "model.safetensors").exists()
    assert not list(Path(first).parent.glob(".tmp-*"))  # staged, then moved in atomically


def test_dtype_and_device_options(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir), dtype="bfloat16", device="auto")
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert next(loaded.model.parameters()).device.type == expected
    with pytest.raises(LorankError, match="--dtype fp8: expected one of"):
        load_model(str(tiny_llama_dir), dtype="fp8")
    with pytest.raises(LorankError, match="--device tpu: expected cpu, cuda, cuda:N or auto"):
        load_model(str(tiny_llama_dir), device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(LorankError, match="CUDA is not available"):
            load_model(str(tiny_llama_dir), device="cuda")


def test_remote_code_runs_only_when_asked(tiny_llama_dir, monkeypatch):
    seen = []
    real = models_mod.AutoConfig.from_pretrained

    def config_from(path, **kw):
        seen.append(kw["trust_remote_code"])
        return real(path, **kw)

    monkeypatch.setattr(models_mod.AutoConfig, "from_pretrained", config_from)
    load_model(str(tiny_llama_dir))
    assert seen and not any(seen)  # every config read (also transformers' own) refuses it
    seen.clear()
    load_model(str(tiny_llama_dir), trust_remote_code=True)
    assert seen and all(seen)


def test_val_data_and_format_override(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    val = write_jsonl(tmp_path / "val.jsonl", ROWS[:5])
    tok = make_tokenizer()
    given = prepare(train, tok, val_source=val, max_length=32)
    assert len(given.train) == len(ROWS) and len(given.val) == 5  # nothing split off
    split = prepare(train, tok, max_length=32)
    assert len(split.train) + len(split.val) == len(ROWS) and split.val
    # both columns present: detection takes prompt/completion, --format text takes the text
    both = write_jsonl(tmp_path / "both.jsonl",
                       [r | {"text": "all of this is supervised"} for r in ROWS])
    detected = prepare(both, tok, max_length=64)
    forced = prepare(both, tok, fmt="text", max_length=64)
    assert detected.fmt == "prompt-completion" and forced.fmt == "text"
    example = forced.train[0]
    assert tok.decode(example["input_ids"]).startswith("all of this is supervised")
    assert sum(label != -100 for label in example["labels"]) >= len(example["input_ids"]) - 2
    with pytest.raises(LorankError, match="both.jsonl: record 1: missing field 'instruction' for format alpaca"):
        prepare(both, tok, fmt="alpaca", max_length=64)


def test_profile_counts_lengths_and_duplicates(tmp_path):
    from lorank.data import profile

    rows = [{"text": "x" * n} for n in range(1, 41)] + [{"text": "x" * 5}] * 10
    data = prepare(write_jsonl(tmp_path / "t.jsonl", rows), make_tokenizer(), max_length=64,
                   val_source=write_jsonl(tmp_path / "v.jsonl", rows[:3]))
    prof = profile(data, progress=False)
    lengths = sorted(len(e["input_ids"]) for e in data.train)
    assert prof.length_percentiles["max"] == lengths[-1]
    assert lengths[0] < prof.length_percentiles["p50"] < prof.length_percentiles["p90"]
    assert prof.duplicate_rate == pytest.approx(10 / 50)  # 10 repeats of a row already there


def _profile(bits: float) -> DataProfile:
    return DataProfile(format="text", task="causal", examples=100, val_examples=10,
                       supervised_tokens=int(bits), total_tokens=int(bits), length_percentiles={},
                       duplicate_rate=0.0,
                       dropped=0, base_loss_nats=0.6931, base_loss_bits=1.0, base_loss_sample=8)


def test_capacity_ceiling_is_the_first_rank_that_holds_every_bit(tiny_llama):
    """Hand-made profiles: the ceiling is the smallest rank whose adapter stores all the bits
    at 2 bits/param, grows with the bits, is absent when no rank can hold them, and says so."""
    ts = resolve_targets(tiny_llama, "all-linear")
    ranks = [1, 2, 4, 8, 16]
    params = {r: ts.params(r) for r in ranks}
    bits = 2 * params[4] - 1  # fits rank 4, not rank 2
    ev = capacity_evidence(_profile(bits), ts, ranks)
    assert ev.suggested_rank == 4 and ev.kind == "ceiling" and ev.interval == (1, 4)
    assert ev.per_rank[4] == "can hold all" and ev.per_rank[2].endswith("% of data")
    assert any("2 bits per parameter" in a for a in ev.assumptions)
    assert any("1.000 bits/token on 8 sampled examples" in a for a in ev.assumptions)
    assert capacity_evidence(_profile(2 * params[8]), ts, ranks).suggested_rank == 8
    none = capacity_evidence(_profile(2 * params[16] + 10), ts, ranks)
    assert none.suggested_rank is None and "no ceiling below it" in none.notes[0]
    # a calibrated store of 1 bit per parameter doubles the parameters needed: an estimate
    fit = {"efficiency": {"log2_e": 0.0, "epochs_slope": 0.0, "reference_epochs": 1.0},
           "tasks": ["planted"], "borrowed": False}
    one_bit = {"fits": {"generation": fit}, "rows": []}
    est = capacity_evidence(_profile(bits), ts, ranks, calibration=one_bit)
    assert est.kind == "estimate" and est.suggested_rank == 8
    assert est.details["ceiling_rank"] == 4


@pytest.mark.parametrize("rank", [1, 8])
def test_adapter_size_on_disk_matches_the_estimate(tiny_llama, tmp_path, rank):
    from peft import LoraConfig, get_peft_model

    ts = resolve_targets(tiny_llama, "all-linear")
    model = get_peft_model(tiny_llama, LoraConfig(r=rank, target_modules=ts.peft_target_modules))
    model.save_pretrained(tmp_path)
    size = os.path.getsize(tmp_path / "adapter_model.safetensors")
    header = 8 + int.from_bytes((tmp_path / "adapter_model.safetensors").read_bytes()[:8],
                                "little")
    assert size - header == adapter_bytes(ts, rank)  # tensor bytes exactly; headers aside
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == rank
