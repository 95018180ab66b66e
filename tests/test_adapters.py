"""Trained adapters: inspect reads rank use from the saved factors; shrink re-factorizes exactly
(at full rank the shrunk adapter reproduces the original's outputs; at a lower rank it loads,
runs and keeps the best rank-k update), with one-line errors for what is not a LoRA adapter."""

from __future__ import annotations

import json
import random

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


# ------------------------------------------------------------------- with data: loss per rank

LETTERS = "abcdefghijklmnop"
SUCCESSOR = dict(zip(LETTERS, "fkbpamhdlogcejni", strict=True))  # one 16-cycle


def _successor_data(path, n: int = 80):
    """Strings where each letter's successor is fixed (a permutation): learnable from the
    current token alone, by a map of rank up to 16."""
    from conftest import write_jsonl

    rng = random.Random(0)
    rows = []
    for _ in range(n):
        text = rng.choice(LETTERS)
        for _ in range(8):
            text += SUCCESSOR[text[-1]]
        rows.append({"prompt": text[:2], "completion": text[2:]})
    return write_jsonl(path, rows)


def _planted_head_adapter(base_dir, data, path, keep: int) -> None:
    """A rank-8 lm_head adapter that the data needs: the least-squares map from the base
    model's last hidden states (training split) to the next letter, its top 8 directions, of
    which only the first `keep` are kept (keep=8: a full-rank adapter whose every direction
    lowers the loss; keep=2: true rank 2 inside rank 8)."""
    from lorank.api import prepare_inputs
    from lorank.data import collate

    loaded, prepared = prepare_inputs(str(base_dir), data)
    batch = collate(prepared.train, loaded.pad_token_id)
    with torch.no_grad():
        hidden = loaded.model.model(input_ids=batch["input_ids"],
                                    attention_mask=batch["attention_mask"]).last_hidden_state
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    target = torch.nn.functional.one_hot(labels[mask], loaded.model.config.vocab_size) * 5.0
    fit = torch.linalg.lstsq(hidden[:, :-1][mask], target - target.mean(0)).solution
    u, s, vh = torch.linalg.svd(fit.T, full_matrices=False)
    model = get_peft_model(loaded.model, LoraConfig(r=8, lora_alpha=8, target_modules=["lm_head"]))
    head = model.base_model.model.lm_head
    scale = head.scaling["default"]
    root = s[:8].sqrt() * (torch.arange(8) < keep)
    head.lora_B["default"].weight.data = u[:, :8] * root / scale
    head.lora_A["default"].weight.data = root[:, None] * vh[:8]
    model.save_pretrained(path, save_embedding_layers=False)


@pytest.fixture
def planted(tmp_path, tiny_llama_dir, one_thread):
    """(data, full-rank adapter, rank-2-inside-8 adapter) on the tiny Llama saved in a folder
    (each adapter's config names it as the base model)."""
    data = _successor_data(tmp_path / "successor.jsonl")
    _planted_head_adapter(tiny_llama_dir, data, tmp_path / "full", keep=8)
    _planted_head_adapter(tiny_llama_dir, data, tmp_path / "two", keep=2)
    return data, tmp_path / "full", tmp_path / "two"


def test_inspect_with_data_gives_the_loss_per_truncated_rank(planted, tiny_llama_dir):
    from lorank.api import inspect, prepare_inputs
    from lorank.train import per_example_losses

    data, full, _ = planted
    report = inspect(full, data=str(data), progress=False)
    curve = report.losses
    assert curve.ranks == [1, 2, 4, 8] and set(curve.loss) == {1, 2, 4, 8}
    assert curve.n_examples == 8 and report.model == str(tiny_llama_dir)
    # the full-rank truncation (an SVD re-factorization) is the untouched adapter
    loaded, prepared = prepare_inputs(str(tiny_llama_dir), data)
    untouched = PeftModel.from_pretrained(loaded.model, full).eval()
    plain = per_example_losses(untouched, prepared.val, loaded.pad_token_id)
    assert curve.loss[8] == pytest.approx(float(plain.mean()), abs=1e-5)
    assert curve.per_example[8] == pytest.approx(plain.tolist(), abs=1e-5)
    # every direction of the planted full-rank map lowers the loss: not "could be smaller"
    assert curve.state == "saturated" and curve.smallest_within == 8
    assert curve.loss[4] > curve.loss[8] + curve.tol[4]
    assert report.loss_verdict.startswith("saturated: the validation loss still falls")


def test_inspect_with_data_calls_a_planted_low_rank_adapter_smaller(planted):
    from lorank.api import inspect

    data, _, two = planted
    curve = inspect(two, data=str(data), progress=False).losses
    assert curve.state == "could be smaller" and curve.smallest_within <= 2
    assert curve.loss[2] == pytest.approx(curve.loss[8], abs=1e-5)  # rank 2 holds all of it
    assert all(curve.within(r) for r in (2, 4, 8))


def test_shrink_with_data_reports_the_loss_change(planted, tmp_path):
    from lorank.api import shrink

    data, full, two = planted
    same = shrink(full, tmp_path / "full8", rank=8, data=str(data), progress=False)["loss"]
    assert same["change"] == pytest.approx(0.0, abs=1e-5) and same["within_tolerance"]
    lossless = shrink(two, tmp_path / "two2", rank=2, data=str(data), progress=False)["loss"]
    assert lossless["change"] == pytest.approx(0.0, abs=1e-5)
    cut = shrink(full, tmp_path / "full2", rank=2, data=str(data), progress=False)["loss"]
    assert cut["change"] > cut["tol"] and not cut["within_tolerance"]
    assert cut["loss_before"] == pytest.approx(same["loss_before"])


def test_adapter_loss_bad_input_is_one_line_errors(planted, tmp_path, tiny_llama_dir):
    from conftest import make_llama, make_tokenizer

    from lorank.api import inspect, shrink

    data, full, _ = planted
    with pytest.raises(LorankError, match="no such adapter directory"):
        inspect(tmp_path / "missing", data=str(data))
    with pytest.raises(LorankError, match="above the adapter's own rank 8"):
        shrink(full, tmp_path / "out", rank=16, data=str(data))
    (tmp_path / "a-file").write_text("")
    with pytest.raises(LorankError, match="not writable"):
        shrink(full, tmp_path / "a-file" / "out", rank=2, data=str(data))
    with pytest.raises(LorankError, match="cannot write"):
        shrink(full, tmp_path / "a-file" / "out", rank=2)
    with pytest.raises(LorankError, match="is the adapter itself"):
        shrink(full, full, rank=2)
    with pytest.raises(LorankError, match="--model is used with --data"):
        inspect(full, model=str(tiny_llama_dir))
    wider = tmp_path / "wider"  # another base model: the adapter's shapes do not fit it
    make_llama(hidden=48).save_pretrained(wider)
    make_tokenizer().save_pretrained(wider)
    with pytest.raises(LorankError, match="does not fit model"):
        inspect(full, data=str(data), model=str(wider))
    cfg = json.loads((full / "adapter_config.json").read_text())
    moved = cfg | {"base_model_name_or_path": str(tmp_path / "gone")}
    (full / "adapter_config.json").write_text(json.dumps(moved))
    with pytest.raises(LorankError, match="not on this machine; pass --model"):
        inspect(full, data=str(data))
    report = inspect(full, data=str(data), model=str(tiny_llama_dir), progress=False)
    assert report.losses.ranks == [1, 2, 4, 8]


def test_cli_inspect_and_shrink_with_data(monkeypatch, capsys, planted, tmp_path):
    from test_cli import assert_one_line_error, run

    data, full, two = planted
    code, out, err = run(monkeypatch, capsys, "inspect", str(two), "--data", str(data),
                         "--quiet")
    assert code == 0, err
    assert "validation loss per truncated rank" in out and "could be smaller" in out
    code, out, err = run(monkeypatch, capsys, "shrink", str(full), "--rank", "8", "--out",
                         str(tmp_path / "same"), "--data", str(data), "--quiet")
    assert code == 0, err
    assert "change +0.0000" in out or "change -0.0000" in out
    assert "within tolerance" in out
    code, _, err = run(monkeypatch, capsys, "inspect", str(full), "--data",
                       str(tmp_path / "no-data.jsonl"))
    assert_one_line_error(code, err, "no-data.jsonl")
