"""Trained adapters: inspect reads rank use from the saved factors; shrink re-factorizes exactly
(at full rank the shrunk adapter reproduces the original's outputs; at a lower rank it loads,
runs and keeps the best rank-k update), with one-line errors for what is not a LoRA adapter."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_llama
from peft import LoraConfig, PeftModel, get_peft_model

from lorank.adapters import inspect_adapter, shrink_adapter, verdict
from lorank.errors import LorankError


def _saved_adapter(path, planted: int | None = None, rslora: bool = True):
    """A rank-8 adapter on q/v of the tiny Llama with random (trained-looking) factors; with
    `planted`, every update has exactly that rank."""
    model = get_peft_model(make_llama(), LoraConfig(r=8, lora_alpha=16, use_rslora=rslora,
                                                    target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(0)
    for module in model.modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            a.data = torch.randn(a.shape, generator=g) * 0.3
            b.data = torch.randn(b.shape, generator=g) * 0.3
            if planted is not None:
                b.data[:, planted:] = 0
    model.save_pretrained(path)
    return model


def _outputs(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("rslora", [True, False])
def test_shrink_at_full_rank_reproduces_the_adapter(tmp_path, rslora):
    original = _saved_adapter(tmp_path / "a", rslora=rslora).eval()
    summary = shrink_adapter(tmp_path / "a", tmp_path / "b", rank=8)
    assert summary["max_relative_error"] < 1e-6
    shrunk = PeftModel.from_pretrained(make_llama(), tmp_path / "b").eval()
    ids = torch.arange(3, 40).reshape(1, -1)
    assert torch.allclose(_outputs(original, ids), _outputs(shrunk, ids), atol=1e-4)


def test_shrink_to_a_lower_rank_loads_runs_and_keeps_a_planted_rank(tmp_path):
    original = _saved_adapter(tmp_path / "a", planted=2).eval()
    layers = inspect_adapter(tmp_path / "a")
    assert all(lay.energy[2] == pytest.approx(1.0) for lay in layers)
    assert all(lay.rank_for(0.01) == 2 for lay in layers)
    assert verdict(layers).startswith("mostly unused")
    summary = shrink_adapter(tmp_path / "a", tmp_path / "b", rank=2)
    assert summary["params_after"] == summary["params_before"] // 4
    assert summary["max_relative_error"] < 1e-5  # the planted rank loses nothing
    shrunk = PeftModel.from_pretrained(make_llama(), tmp_path / "b").eval()
    ids = torch.arange(3, 40).reshape(1, -1)
    assert torch.allclose(_outputs(original, ids), _outputs(shrunk, ids), atol=1e-4)
    config = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["rank_pattern"] == {}


def test_shrink_by_tolerance_writes_per_layer_ranks(tmp_path):
    _saved_adapter(tmp_path / "a")
    summary = shrink_adapter(tmp_path / "a", tmp_path / "b", tol=0.5)
    assert summary["max_relative_error"] <= 0.5 + 1e-9
    ranks = {name: layer["rank"] for name, layer in summary["layers"].items()}
    assert max(ranks.values()) < 8
    model = PeftModel.from_pretrained(make_llama(), tmp_path / "b")
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            key = name.split("base_model.model.", 1)[1]
            assert module.lora_A["default"].weight.shape[0] == ranks[key]


def test_bad_adapters_are_one_line_errors(tmp_path):
    with pytest.raises(LorankError, match="no such adapter directory"):
        inspect_adapter(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LorankError, match="not a PEFT adapter"):
        inspect_adapter(tmp_path / "empty")
    _saved_adapter(tmp_path / "a")
    with pytest.raises(LorankError, match="above the adapter's own rank 8"):
        shrink_adapter(tmp_path / "a", tmp_path / "b", rank=16)
    with pytest.raises(LorankError, match="exactly one of"):
        shrink_adapter(tmp_path / "a", tmp_path / "b")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg | {"peft_type": "IA3"}))
    with pytest.raises(LorankError, match="expected 'LORA'"):
        inspect_adapter(tmp_path / "a")


def test_cli_inspect_and_shrink(monkeypatch, capsys, tmp_path):
    from test_cli import assert_one_line_error, run

    _saved_adapter(tmp_path / "a", planted=2)
    code, out, _ = run(monkeypatch, capsys, "inspect", str(tmp_path / "a"))
    assert code == 0 and "mostly unused" in out and "rank use per layer" in out
    code, out, _ = run(monkeypatch, capsys, "shrink", str(tmp_path / "a"), "--rank", "2",
                       "--out", str(tmp_path / "b"))
    assert code == 0 and "rank 2" in out and (tmp_path / "b" / "adapter_config.json").exists()
    code, _, err = run(monkeypatch, capsys, "shrink", str(tmp_path / "a"), "--rank", "64",
                       "--out", str(tmp_path / "c"))
    assert_one_line_error(code, err, "above the adapter's own rank")
    code, _, err = run(monkeypatch, capsys, "inspect", str(tmp_path / "nothing"))
    assert_one_line_error(code, err, "no such adapter directory")
