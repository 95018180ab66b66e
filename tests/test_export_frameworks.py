"""`lorank export --to FRAMEWORK` and snippets.md: each framework's config parses, carries the
recommendation (rank, alpha, rsLoRA, targets, per-layer ranks where the framework has them,
the measured learning rate), and bad input ends in one error line with exit code 2."""

from __future__ import annotations

import ast
import json
import math

import pytest
import yaml
from test_cli import run

from lorank.decide import decide
from lorank.estimators.base import Evidence
from lorank.export import read_recommendation, write_outputs
from lorank.frameworks import (
    FRAMEWORKS,
    export_config,
    measured_learning_rate,
    torchtune_modules,
)
from lorank.planned_run import lr_slope
from lorank.targets import resolve_targets

RANKS = [1, 2, 4, 8]
BEST_LR = {1: 8e-3, 2: 8e-3, 4: 2e-3, 8: 5e-4}
PATTERN = {"model.layers.0.self_attn.q_proj": 8, "model.layers.1.mlp.down_proj": 2}


def sweep_evidence() -> Evidence:
    """A sweep as `sweep_evidence` shapes it: ranks 1-2 clearly worse, rank 4 its pick, a best
    lr per rank (int keys, as before the JSON round trip) and the recipe's scaling rule."""
    curve = {r: {"loss": 1.0 + (0.5 if r < 4 else 0.0) + 0.001 * r, "se": 0.01} for r in RANKS}
    return Evidence("sweep", "curve", 4, curve=curve,
                    details={"best_lr": dict(BEST_LR),
                             "recipe": {"lora_alpha": 8.0, "use_rslora": True}})


@pytest.fixture
def swept(tmp_path, tiny_llama, tiny_llama_dir):
    """A recommend directory decided by a sweep on the tiny Llama saved in tiny_llama_dir."""
    rec = decide([sweep_evidence()], resolve_targets(tiny_llama), ranks=RANKS,
                 inputs={"model": str(tiny_llama_dir), "data": "train.jsonl", "max_length": 64})
    write_outputs(rec, tmp_path / "rec", base_model=str(tiny_llama_dir))
    return tmp_path / "rec"


@pytest.fixture
def per_layer(tmp_path, tiny_llama, tiny_llama_dir):
    """A recommend directory decided by a gradient estimate with per-layer ranks (no lr)."""
    gradient = Evidence("gradient", "estimate", 4, interval=(2, 8), rank_pattern=dict(PATTERN))
    rec = decide([gradient], resolve_targets(tiny_llama), ranks=RANKS,
                 inputs={"model": str(tiny_llama_dir)})
    assert rec.rank_pattern == PATTERN
    write_outputs(rec, tmp_path / "rec-layers")
    return tmp_path / "rec-layers"


def calls(tree: ast.AST, name: str) -> list[ast.Call]:
    """Every call of `name` (a bare name or the last attribute) in a parsed snippet."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            called = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) \
                else None
            if called == name:
                found.append(node)
    return found


def kwargs(call: ast.Call) -> dict:
    """Keyword arguments of a call whose values are literals (others as their AST node)."""
    out = {}
    for kw in call.keywords:
        try:
            out[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:
            out[kw.arg] = kw.value
    return out


# ---------------------------------------------------------------------------------------------
# the learning rate the evidence supports


def test_sweep_gives_its_best_lr_at_the_recommended_rank(swept):
    rec = read_recommendation(swept)
    assert rec.rank == 4
    lr, source = measured_learning_rate(rec)
    assert lr == BEST_LR[4] and "sweep" in source and "rank 4" in source


def test_probe_gives_the_lr_its_pilot_chose(tiny_llama):
    probe = Evidence("svd-probe", "curve", 2,
                     curve={r: {"loss": 1.0 + (0.3 if r < 2 else 0.0), "se": 0.01} for r in RANKS},
                     details={"learning_rate": 4e-3, "lr_pilot": {"learning_rate": 4e-3}})
    rec = decide([probe], resolve_targets(tiny_llama), ranks=RANKS)
    lr, source = measured_learning_rate(rec)
    assert lr == 4e-3 and "pilot" in source


def test_a_pilot_lr_from_another_rank_moves_by_the_benchmark_slope(tiny_llama):
    """The pilot found 4e-3 best at rank 8; the pick is rank 2: under rsLoRA the best lr is
    higher at lower rank, by (2/8)^slope."""
    probe = Evidence("svd-probe", "curve", 2,
                     curve={r: {"loss": 1.0 + (0.3 if r < 2 else 0.0), "se": 0.01} for r in RANKS},
                     details={"learning_rate": 4e-3,
                              "lr_pilot": {"learning_rate": 4e-3, "rank": 8}})
    rec = decide([probe], resolve_targets(tiny_llama), ranks=RANKS)
    assert rec.rank == 2
    lr, source = measured_learning_rate(rec)
    assert lr == pytest.approx(4e-3 * (2 / 8) ** lr_slope()) and lr > 4e-3
    assert "rank 8" in source and "moved to rank 2" in source


def test_estimates_measure_no_lr_and_every_config_says_so(per_layer):
    rec = read_recommendation(per_layer)
    assert measured_learning_rate(rec)[0] is None
    for name in FRAMEWORKS:
        text = export_config(rec, name)
        assert "no learning rate measured" in text, name
    assert "learning_rate" not in yaml.safe_load(export_config(rec, "axolotl"))
    assert "learning_rate" not in yaml.safe_load(export_config(rec, "llamafactory"))
    assert "optimizer" not in yaml.safe_load(export_config(rec, "torchtune"))
    assert "learning_rate" not in kwargs(calls(ast.parse(export_config(rec, "trl")), "SFTConfig")[0])


# ---------------------------------------------------------------------------------------------
# PEFT


@pytest.mark.parametrize("fixture", ["swept", "per_layer"])
def test_peft_snippet_builds_the_recommended_lora_config(fixture, request):
    """Run as written (it loads the tiny Llama from its directory): the LoraConfig equals the
    recommendation and the model is wrapped with it."""
    from peft import PeftModel

    rec = read_recommendation(request.getfixturevalue(fixture))
    namespace: dict = {}
    exec(compile(export_config(rec, "peft"), "peft_snippet", "exec"), namespace)  # noqa: S102
    config = namespace["config"]
    assert config.r == rec.rank and config.lora_alpha == rec.lora_alpha
    assert set(config.target_modules) == set(rec.target_modules)
    assert dict(config.rank_pattern) == rec.rank_pattern
    assert config.use_rslora == rec.use_rslora
    assert isinstance(namespace["model"], PeftModel)
    if fixture == "swept":
        assert namespace["learning_rate"] == BEST_LR[4]
        assert config.rank_pattern == {}
    else:
        assert config.rank_pattern == PATTERN and "learning_rate" not in namespace


# ---------------------------------------------------------------------------------------------
# TRL


def test_trl_passes_the_base_model_and_peft_config_never_a_peft_model(swept, tiny_llama_dir):
    text = export_config(read_recommendation(swept), "trl")
    tree = ast.parse(text)
    compile(tree, "trl_snippet", "exec")
    (trainer,) = calls(tree, "SFTTrainer")
    args = kwargs(trainer)
    assert args["model"] == str(tiny_llama_dir)  # the base model's id or directory
    assert isinstance(args["peft_config"], ast.Name) and args["peft_config"].id == "peft_config"
    assert not calls(tree, "get_peft_model") and "PeftModel" not in text
    (config,) = calls(tree, "LoraConfig")
    lora = kwargs(config)
    assert (lora["r"], lora["lora_alpha"], lora["use_rslora"]) == (4, 8, True)
    assert kwargs(calls(tree, "SFTConfig")[0])["learning_rate"] == BEST_LR[4]
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert {"LoraConfig", "SFTConfig", "SFTTrainer", "load_dataset"} <= imported


# ---------------------------------------------------------------------------------------------
# YAML frameworks


def test_axolotl_yaml_has_the_documented_keys(swept, per_layer):
    rec = read_recommendation(swept)
    cfg = yaml.safe_load(export_config(rec, "axolotl"))
    assert cfg["adapter"] == "lora"
    assert (cfg["lora_r"], cfg["lora_alpha"], cfg["peft_use_rslora"]) == (4, 8, True)
    assert isinstance(cfg["lora_alpha"], int)  # an int in Axolotl's schema
    assert cfg["lora_target_modules"] == list(rec.target_modules)
    assert cfg["lora_dropout"] == 0.0
    assert cfg["learning_rate"] == BEST_LR[4] and isinstance(cfg["learning_rate"], float)
    assert "lora_rank_pattern" not in cfg
    layered = yaml.safe_load(export_config(read_recommendation(per_layer), "axolotl"))
    assert layered["lora_rank_pattern"] == PATTERN and layered["lora_r"] == 4


def test_llamafactory_yaml_has_the_documented_keys(swept, per_layer):
    rec = read_recommendation(swept)
    cfg = yaml.safe_load(export_config(rec, "llamafactory"))
    assert cfg["finetuning_type"] == "lora"
    assert (cfg["lora_rank"], cfg["lora_alpha"], cfg["use_rslora"]) == (4, 8, True)
    assert cfg["lora_target"].split(",") == list(rec.target_modules)
    assert cfg["learning_rate"] == BEST_LR[4]
    text = export_config(read_recommendation(per_layer), "llamafactory")
    assert "per-layer ranks are not supported" in text and "global rank 4" in text
    assert yaml.safe_load(text)["lora_rank"] == 4


def test_torchtune_yaml_uses_its_module_names_and_the_same_scale(swept, per_layer):
    rec = read_recommendation(swept)
    cfg = yaml.safe_load(export_config(rec, "torchtune"))
    model = cfg["model"]
    assert model["lora_attn_modules"] == ["q_proj", "k_proj", "v_proj", "output_proj"]
    assert model["apply_lora_to_mlp"] is True and model["apply_lora_to_output"] is False
    assert model["lora_rank"] == 4
    # torchtune scales by alpha / r: alpha * sqrt(r) keeps rsLoRA's alpha / sqrt(r)
    assert model["lora_alpha"] / 4 == pytest.approx(rec.lora_alpha / math.sqrt(4))
    assert cfg["optimizer"]["lr"] == BEST_LR[4]
    text = export_config(read_recommendation(per_layer), "torchtune")
    assert "per-layer ranks are not supported" in text


def test_torchtune_module_name_mapping():
    m = torchtune_modules(["q_proj", "o_proj", "v_proj"])
    assert m["lora_attn_modules"] == ["q_proj", "v_proj", "output_proj"]
    assert not m["apply_lora_to_mlp"] and not m["apply_lora_to_output"]
    m = torchtune_modules(["model.layers.0.mlp.gate_proj", "up_proj", "down_proj", "lm_head"])
    assert m["lora_attn_modules"] == [] and m["apply_lora_to_mlp"] and m["apply_lora_to_output"]
    assert torchtune_modules(["query", "k_proj"])["unmapped"] == ["query"]


def test_torchtune_without_rslora_keeps_alpha(swept):
    data = json.loads((swept / "recommendation.json").read_text())
    data["use_rslora"] = False
    (swept / "recommendation.json").write_text(json.dumps(data))
    cfg = yaml.safe_load(export_config(read_recommendation(swept), "torchtune"))
    assert cfg["model"]["lora_alpha"] == data["lora_alpha"]


def test_small_learning_rates_stay_numbers_in_yaml(swept):
    """PyYAML (YAML 1.1) reads 1e-05 as a string; the exports write 1.0e-05."""
    data = json.loads((swept / "recommendation.json").read_text())
    data["evidence"][0]["details"]["best_lr"]["4"] = 1e-5
    (swept / "recommendation.json").write_text(json.dumps(data))
    rec = read_recommendation(swept)
    assert yaml.safe_load(export_config(rec, "axolotl"))["learning_rate"] == 1e-5
    assert yaml.safe_load(export_config(rec, "llamafactory"))["learning_rate"] == 1e-5
    assert yaml.safe_load(export_config(rec, "torchtune"))["optimizer"]["lr"] == 1e-5


# ---------------------------------------------------------------------------------------------
# Unsloth


def test_unsloth_snippet_calls_get_peft_model_with_the_recommendation(swept, per_layer):
    rec = read_recommendation(swept)
    tree = ast.parse(export_config(rec, "unsloth"))
    compile(tree, "unsloth_snippet", "exec")
    (peft,) = calls(tree, "get_peft_model")
    args = kwargs(peft)
    assert (args["r"], args["lora_alpha"], args["use_rslora"]) == (4, 8, True)
    assert args["target_modules"] == list(rec.target_modules)
    assert isinstance(peft.args[0], ast.Name) and peft.args[0].id == "model"
    (load,) = calls(tree, "from_pretrained")
    assert kwargs(load)["load_in_4bit"] is False
    assert "rank_pattern" not in args
    text = export_config(read_recommendation(per_layer), "unsloth")
    assert "per-layer ranks are not supported" in text and "rank_pattern=" not in text


# ---------------------------------------------------------------------------------------------
# snippets.md and the command


def test_snippets_md_holds_every_export(swept):
    """snippets.md (written by write_outputs) holds each framework's export verbatim."""
    rec = read_recommendation(swept)
    md = (swept / "snippets.md").read_text()
    for name in FRAMEWORKS:
        assert f"(`--to {name}`)" in md
        assert export_config(rec, name).rstrip("\n") in md, name




@pytest.mark.parametrize("name", list(FRAMEWORKS))
def test_export_prints_the_config(monkeypatch, capsys, swept, name):
    code, out, err = run(monkeypatch, capsys, "export", str(swept), "--to", name)
    assert code == 0, err
    assert out == export_config(read_recommendation(swept), name)


def test_export_out_writes_the_file(monkeypatch, capsys, swept, tmp_path):
    target = tmp_path / "configs" / "axolotl.yaml"
    code, out, err = run(monkeypatch, capsys, "export", str(swept), "--to", "axolotl",
                         "--out", str(target))
    assert code == 0, err
    assert target.read_text() == export_config(read_recommendation(swept), "axolotl")
    assert f"wrote {target}" in out
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]  # no temp file left


def one_line_error(code: int, err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_export_bad_inputs_end_in_one_line(monkeypatch, capsys, swept, tmp_path):
    line = one_line_error(*run(monkeypatch, capsys, "export", str(tmp_path / "nope"),
                               "--to", "peft")[::2])
    assert "no such directory" in line
    empty = tmp_path / "empty"
    empty.mkdir()
    line = one_line_error(*run(monkeypatch, capsys, "export", str(empty), "--to", "peft")[::2])
    assert "recommendation.json: not found" in line
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "recommendation.json").write_text('{"rank": 4,\n')
    line = one_line_error(*run(monkeypatch, capsys, "export", str(broken), "--to", "peft")[::2])
    assert "malformed JSON" in line
    (broken / "recommendation.json").write_text('{"rank": 4}')
    line = one_line_error(*run(monkeypatch, capsys, "export", str(broken), "--to", "peft")[::2])
    assert "missing lora_alpha, use_rslora, target_modules" in line
    (broken / "recommendation.json").write_text(
        '{"rank": "four", "lora_alpha": 8, "use_rslora": true, "target_modules": ["q_proj"]}')
    line = one_line_error(*run(monkeypatch, capsys, "export", str(broken), "--to", "peft")[::2])
    assert "field rank" in line
    line = one_line_error(*run(monkeypatch, capsys, "export", str(swept), "--to", "deepspeed")[::2])
    assert "--to deepspeed: unknown framework" in line and "torchtune" in line
    line = one_line_error(*run(monkeypatch, capsys, "export", str(swept), "--to", "peft",
                               "--out", str(tmp_path))[::2])
    assert "is a directory" in line


def test_a_minimal_hand_written_recommendation_exports(tmp_path):
    (tmp_path / "recommendation.json").write_text(json.dumps(
        {"rank": 16, "lora_alpha": 32, "use_rslora": False, "target_modules": ["q_proj", "v_proj"]}))
    rec = read_recommendation(tmp_path)
    cfg = yaml.safe_load(export_config(rec, "torchtune"))
    assert cfg["model"]["lora_attn_modules"] == ["q_proj", "v_proj"]
    assert cfg["model"]["lora_alpha"] == 32
    assert "BASE_MODEL" in export_config(rec, "trl")
    for name in ("peft", "trl", "unsloth"):
        compile(export_config(rec, name), name, "exec")


def test_version(monkeypatch, capsys):
    from lorank import __version__

    code, out, _ = run(monkeypatch, capsys, "--version")
    assert code == 0 and out.strip() == f"lorank {__version__}"
