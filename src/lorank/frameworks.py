"""Frameworks: a `Recommendation` as the configuration of PEFT and five fine-tuning frameworks.

One function per framework turns a `Recommendation` into text: `peft_config_text`,
`trl_config_text`, `axolotl_config_text`, `llamafactory_config_text`, `unsloth_config_text`,
`torchtune_config_text` (`FRAMEWORKS` maps the `lorank export --to` names to them). Both
`lorank export` (`export_config`) and the `snippets.md` that `recommend` writes (`snippets`)
call the same functions.

The keys were checked against each framework's own source (the newest stored snapshot):
  - PEFT: `peft.LoraConfig` (0.22, installed): r, lora_alpha, use_rslora, target_modules,
    rank_pattern, alpha_pattern, modules_to_save, lora_dropout, bias, task_type;
  - TRL: trl/trainer/sft_trainer.py (v1.9.0, f2cd577): `SFTTrainer(model: str | PreTrainedModel
    | PeftModel, args, train_dataset, peft_config)`; a PeftModel together with a peft_config
    raises ValueError, so the snippet passes the base model id and the peft_config only;
    trl/trainer/sft_config.py: `SFTConfig.learning_rate` (default 2e-5);
  - Axolotl: src/axolotl/utils/schemas/peft.py (067b021): adapter, lora_r, lora_alpha (int),
    lora_dropout, lora_target_modules, lora_modules_to_save, peft_use_rslora, lora_rank_pattern
    (regex -> int, forwarded to PEFT's rank_pattern; added in v0.18.0, docs/lora.qmd);
    schemas/training.py: learning_rate;
  - LLaMA-Factory: src/llamafactory/hparams/finetuning_args.py (ff6d4d1): finetuning_type,
    lora_rank, lora_alpha (int; default lora_rank * 2, so always written), lora_dropout,
    lora_target (comma-separated), additional_target, use_rslora; no per-module rank;
    learning_rate as in examples/train_lora/*.yaml;
  - Unsloth: unsloth/models/llama.py (015bdef) `FastLanguageModel.get_peft_model(model, r,
    target_modules, lora_alpha, lora_dropout, bias, ..., use_rslora, modules_to_save, ...)`:
    no rank_pattern parameter; loader.py `FastLanguageModel.from_pretrained(model_name,
    max_seq_length, load_in_4bit=True, ...)`;
  - torchtune: torchtune/models/llama3_2/_model_builders.py (bd2a0fc, v0.6.1) `lora_*` builders:
    lora_attn_modules (q_proj, k_proj, v_proj, output_proj), apply_lora_to_mlp,
    apply_lora_to_output, lora_rank, lora_alpha, lora_dropout; torchtune/modules/peft/lora.py
    scales by alpha / rank (no rsLoRA, so an rsLoRA recommendation exports the alpha that gives
    the same scale); recipes/configs/llama3_2/1B_lora_single_device.yaml: optimizer.lr.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorank.decide import CURVE_TRUST, Recommendation
from lorank.errors import LorankError
from lorank.planned_run import lr_at_rank, lr_slope

# ---------------------------------------------------------------------------------------------
# what every framework's config shares


def measured_learning_rate(rec: Recommendation) -> tuple[float | None, str]:
    """(learning rate, where it comes from) when the evidence that decided the rank measured
    one, else (None, why there is none).

    The deciding evidence is the most trusted curve (`decide.CURVE_TRUST`: sweep, then probe);
    a sweep gives its best learning rate at the recommended rank (`details["best_lr"]`, or at
    its own pick when the recommended rank was not swept), a probe the learning rate it trained
    at (`details["learning_rate"]`, chosen by its pilot when `details["lr_pilot"]` is present).
    A best learning rate measured at another rank than the recommended one (the sweep's pick,
    the pilot's rank) is moved to it by the benchmark's lr-by-rank slope (`planned_run.lr_at_rank`:
    under rsLoRA the best lr falls with rank); a learning rate given to a probe without a pilot is
    not a measured best and is passed on as it is. Estimates and ceilings measure no learning rate.
    """
    curves = [e for e in rec.evidence
              if e.get("kind") == "curve" and e.get("suggested_rank") is not None]
    curves.sort(key=lambda e: CURVE_TRUST.index(e.get("name"))
                if e.get("name") in CURVE_TRUST else len(CURVE_TRUST))
    if not curves:
        names = ", ".join(sorted({str(e.get("name")) for e in rec.evidence})) or "none"
        return None, (f"no learning rate measured (evidence: {names}; a sweep or a probe "
                      "measures one)")
    chosen, details = curves[0], curves[0].get("details") or {}
    name = chosen.get("name")
    try:
        if name == "sweep":
            best = {int(r): float(lr) for r, lr in (details.get("best_lr") or {}).items()}
            pick = int(chosen["suggested_rank"])
            if rec.rank in best and best[rec.rank] > 0:
                return best[rec.rank], f"the sweep's best learning rate at rank {rec.rank}"
            if pick in best and best[pick] > 0:
                return lr_at_rank(best[pick], pick, rec.rank), (
                    f"the sweep's best learning rate at its pick, rank {pick} (rank {rec.rank} "
                    f"was not swept){_moved(best[pick], pick, rec.rank)}")
            return None, "no learning rate measured (the sweep recorded none at this rank)"
        lr = details.get("learning_rate") or (details.get("config") or {}).get("learning_rate")
        lr = float(lr) if lr is not None else None
    except (TypeError, ValueError, AttributeError):
        return None, f"no learning rate measured ({name}'s record of it is unreadable)"
    if lr is None or not math.isfinite(lr) or lr <= 0:
        return None, f"no learning rate measured ({name} recorded none)"
    pilot = details.get("lr_pilot") or {}
    if not pilot:
        return lr, f"the learning rate the {name} measured the rank at (as given to it)"
    at = int(pilot.get("rank") or rec.rank)
    return lr_at_rank(lr, at, rec.rank), (f"the {name}'s learning-rate pilot found {lr:g} best "
                                          f"at rank {at}{_moved(lr, at, rec.rank)}")


def _moved(lr: float, at: int, rank: int) -> str:
    """How a best lr measured at rank `at` was moved to `rank` (nothing when they agree)."""
    if at == rank:
        return ""
    return (f"; moved to rank {rank} as {lr:g} x ({rank}/{at})^{lr_slope():g} (the best lr's "
            "slope over rank in the benchmark's sweeps, under rsLoRA)")


def base_model(rec: Recommendation) -> str | None:
    """What a framework's `from_pretrained` can load: the model the user named, or for an
    alias or a .gguf file the local Hugging Face directory lorank loaded."""
    source, path = rec.inputs.get("model"), rec.inputs.get("model_path")
    if source and not _is_alias_or_gguf(str(source)):
        return str(source)
    return str(path or source) if (path or source) else None


def _is_alias_or_gguf(source: str) -> bool:
    from lorank.models import ALIASES

    return source in ALIASES or source.endswith(".gguf")


def rslora_free_alpha(rec: Recommendation) -> float:
    """The alpha that gives a framework scaling by alpha / r the recommendation's scale:
    alpha * sqrt(r) under rsLoRA (scale alpha / sqrt(r)), else alpha itself."""
    return rec.lora_alpha * math.sqrt(rec.rank) if rec.use_rslora else rec.lora_alpha


def _num(x: float) -> str:
    """A number as Python source: 8.0 -> 8, 12.5 -> 12.5."""
    x = float(x)
    return str(int(x)) if x.is_integer() else repr(x)


def _py(value: Any) -> str:
    """A string, list or map of strings and numbers as Python source, strings double-quoted."""
    return repr(value) if isinstance(value, bool) else json.dumps(value)


def _yaml_num(x: float) -> str:
    """A number as YAML that PyYAML (YAML 1.1) also reads as a number: integral -> 8,
    1e-05 -> 1.0e-05 (YAML 1.1 floats need a dot and a signed exponent)."""
    x = float(x)
    if x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    text = repr(x)
    mantissa, _, exponent = text.partition("e")
    if exponent:
        return f"{mantissa if '.' in mantissa else mantissa + '.0'}e{exponent}"
    return text


def _yaml(value: Any) -> str:
    """A flow-style YAML value (strings, lists and maps as JSON, which YAML reads as is)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return _yaml_num(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {_yaml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    return json.dumps(value)


def _int_alpha(alpha: float, key: str, framework: str) -> tuple[int, list[str]]:
    """A framework whose alpha is an int: the rounded value and, when rounding changed it, a
    comment saying so."""
    rounded = max(1, round(alpha))
    if math.isclose(rounded, alpha, rel_tol=1e-9):
        return rounded, []
    return rounded, [f"# {key}: {framework} takes an integer; {alpha:g} rounded to {rounded} "
                     f"(scale changes by {rounded / alpha:.3f}x)"]


def _header(rec: Recommendation, framework: str) -> list[str]:
    scale = "rsLoRA, scale alpha/sqrt(r)" if rec.use_rslora else "scale alpha/r"
    return [f"# lorank recommendation for {framework}: rank {rec.rank}, lora_alpha "
            f"{rec.lora_alpha:g} ({scale}), confidence {rec.confidence}"]


def _lr_comment(rec: Recommendation, default: str) -> tuple[float | None, str]:
    lr, source = measured_learning_rate(rec)
    if lr is None:
        return None, f"# learning rate: {source}; {default}"
    return lr, f"# learning rate {lr:g}: {source}"


def _no_rank_pattern(rec: Recommendation, framework: str, where: str) -> list[str]:
    """The comment for a framework with no per-module rank setting."""
    if not rec.rank_pattern:
        return [f"# per-layer ranks: {framework} has none ({where}); none recommended either"]
    return [f"# per-layer ranks are not supported by {framework} ({where}): the global rank "
            f"{rec.rank} is used for every module; lorank's per-layer ranks "
            f"({len(rec.rank_pattern)} modules) are in recommendation.json's rank_pattern"]


def _model_line(rec: Recommendation) -> tuple[str, list[str]]:
    model = base_model(rec)
    if model is None:
        return "BASE_MODEL", ["# BASE_MODEL: the model the recommendation was made for (not "
                              "recorded in recommendation.json)"]
    return model, []


# ---------------------------------------------------------------------------------------------
# one function per framework


def _lora_config_call(rec: Recommendation, indent: str = "    ") -> list[str]:
    """`LoraConfig(...)` arguments as Python source lines (shared by PEFT and TRL)."""
    args = [f"r={rec.rank}", f"lora_alpha={_num(rec.lora_alpha)}",
            f"use_rslora={rec.use_rslora}", f"target_modules={_py(list(rec.target_modules))}"]
    if rec.rank_pattern:
        args.append(f"rank_pattern={_py(dict(rec.rank_pattern))}")
    if rec.alpha_pattern:
        alphas = {k: float(v) for k, v in rec.alpha_pattern.items()}
        args.append(f"alpha_pattern={_py(alphas)}")
    if rec.modules_to_save:
        args.append(f"modules_to_save={_py(list(rec.modules_to_save))}")
    args += ["lora_dropout=0.0", 'bias="none"', f"task_type={_py(rec.task_type)}"]
    return [f"{indent}{a}," for a in args]


AUTO_CLASS = {"CAUSAL_LM": "AutoModelForCausalLM",
              "SEQ_CLS": "AutoModelForSequenceClassification"}


def peft_config_text(rec: Recommendation) -> str:
    """PEFT: a complete Python snippet that loads the base model and wraps it with
    `get_peft_model(model, LoraConfig(...))`, the LoraConfig carrying rank, alpha, rsLoRA,
    targets and any per-layer `rank_pattern`; `learning_rate` holds the measured rate (or a
    comment says none was measured)."""
    model, notes = _model_line(rec)
    auto = AUTO_CLASS.get(rec.task_type, "AutoModelForCausalLM")
    lr, lr_note = _lr_comment(rec, "keep your trainer's default")
    lines = _header(rec, "PEFT") + notes + [
        "from peft import LoraConfig, get_peft_model",
        f"from transformers import {auto}",
        "",
        f"model = {auto}.from_pretrained({_py(model)})",
        "config = LoraConfig(",
        *_lora_config_call(rec),
        ")",
        "model = get_peft_model(model, config)",
        "# or: LoraConfig.from_pretrained(\"path/to/the/recommend/folder\") (adapter_config.json)",
        lr_note,
    ]
    if lr is not None:
        lines.append(f"learning_rate = {lr!r}  # pass to your optimizer or "
                     "TrainingArguments(learning_rate=learning_rate)")
    return "\n".join(lines) + "\n"


def _dataset_call(rec: Recommendation) -> str:
    data = str(rec.inputs.get("data") or "train.jsonl")
    builders = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
    builder = builders.get(Path(data).suffix.lower())
    if builder:
        return f"load_dataset({_py(builder)}, data_files={_py(data)}, split=\"train\")"
    return f"load_dataset({_py(data)}, split=\"train\")"


def trl_config_text(rec: Recommendation) -> str:
    """TRL: a complete Python snippet `SFTTrainer(model=<base model id>, train_dataset=...,
    peft_config=LoraConfig(...), args=SFTConfig(...))`. The base model goes in as its id (or
    directory), never as a PeftModel: TRL refuses a PeftModel together with a peft_config.
    `SFTConfig.learning_rate` is the measured rate, or SFTConfig's default with a comment."""
    model, notes = _model_line(rec)
    lr, lr_note = _lr_comment(rec, "SFTConfig's default (2e-5) is kept")
    if rec.task_type != "CAUSAL_LM":
        notes.append(f"# SFTTrainer trains causal language models; this recommendation is for "
                     f"{rec.task_type}: use the PEFT snippet with transformers' Trainer instead")
    config_args = ['output_dir="lorank-sft"'] + ([f"learning_rate={lr!r}"] if lr is not None
                                                  else [])
    lines = _header(rec, "TRL") + notes + [
        "from datasets import load_dataset",
        "from peft import LoraConfig",
        "from trl import SFTConfig, SFTTrainer",
        "",
        "peft_config = LoraConfig(",
        *_lora_config_call(rec),
        ")",
        f"train_dataset = {_dataset_call(rec)}",
        lr_note,
        "trainer = SFTTrainer(",
        f"    model={_py(model)},  # the base model: SFTTrainer adds the adapter from peft_config",
        "    train_dataset=train_dataset,",
        "    peft_config=peft_config,",
        f"    args=SFTConfig({', '.join(config_args)}),",
        ")",
        "trainer.train()",
    ]
    return "\n".join(lines) + "\n"


def axolotl_config_text(rec: Recommendation) -> str:
    """Axolotl: YAML with base_model, adapter: lora, lora_r, lora_alpha (an integer in its
    schema), lora_dropout, lora_target_modules, peft_use_rslora, lora_rank_pattern (per-layer
    ranks, when the recommendation has them), lora_modules_to_save, and learning_rate when
    measured."""
    model, notes = _model_line(rec)
    alpha, alpha_notes = _int_alpha(rec.lora_alpha, "lora_alpha", "Axolotl")
    lr, lr_note = _lr_comment(rec, "Axolotl needs one: set learning_rate yourself")
    lines = _header(rec, "Axolotl") + notes + alpha_notes + [
        f"base_model: {_yaml(model)}",
        "adapter: lora",
        f"lora_r: {rec.rank}",
        f"lora_alpha: {alpha}",
        "lora_dropout: 0.0",
        f"lora_target_modules: {_yaml(list(rec.target_modules))}",
        f"peft_use_rslora: {_yaml(rec.use_rslora)}",
    ]
    if rec.rank_pattern:
        lines += ["# per-layer ranks (regex -> rank, PEFT's rank_pattern); needs Axolotl >= "
                  "0.18, which added lora_rank_pattern (older versions: drop it, lora_r is used)",
                  f"lora_rank_pattern: {_yaml(dict(rec.rank_pattern))}"]
    if rec.alpha_pattern:
        lines.append(f"lora_alpha_pattern: "
                     f"{_yaml({k: max(1, round(v)) for k, v in rec.alpha_pattern.items()})}")
    if rec.modules_to_save:
        lines.append(f"lora_modules_to_save: {_yaml(list(rec.modules_to_save))}")
    lines.append(lr_note)
    if lr is not None:
        lines.append(f"learning_rate: {_yaml_num(lr)}")
    return "\n".join(lines) + "\n"


def llamafactory_config_text(rec: Recommendation) -> str:
    """LLaMA-Factory: YAML with model_name_or_path, stage: sft, finetuning_type: lora,
    lora_rank, lora_alpha (always written: its default is 2 x lora_rank), lora_dropout,
    lora_target (comma-separated), use_rslora, additional_target (modules_to_save) and
    learning_rate when measured; it has no per-module rank, which a comment says."""
    model, notes = _model_line(rec)
    alpha, alpha_notes = _int_alpha(rec.lora_alpha, "lora_alpha", "LLaMA-Factory")
    lr, lr_note = _lr_comment(rec, "keep your config's learning_rate")
    if rec.task_type != "CAUSAL_LM":
        notes.append(f"# stage sft trains causal language models; this recommendation is for "
                     f"{rec.task_type}")
    lines = _header(rec, "LLaMA-Factory") + notes + alpha_notes + _no_rank_pattern(
        rec, "LLaMA-Factory", "hparams/finetuning_args.py has lora_rank only") + [
        f"model_name_or_path: {_yaml(model)}",
        "stage: sft",
        "do_train: true",
        "finetuning_type: lora",
        f"lora_rank: {rec.rank}",
        f"lora_alpha: {alpha}",
        "lora_dropout: 0.0",
        f"lora_target: {_yaml(','.join(rec.target_modules))}",
        f"use_rslora: {_yaml(rec.use_rslora)}",
    ]
    if rec.modules_to_save:
        lines.append(f"additional_target: {_yaml(','.join(rec.modules_to_save))}")
    lines.append(lr_note)
    if lr is not None:
        lines.append(f"learning_rate: {_yaml_num(lr)}")
    return "\n".join(lines) + "\n"


def unsloth_config_text(rec: Recommendation) -> str:
    """Unsloth: a complete Python snippet `FastLanguageModel.from_pretrained(...)` (unquantized:
    lorank measured the rank on the full-precision model) then
    `FastLanguageModel.get_peft_model(model, r=..., lora_alpha=..., target_modules=[...],
    use_rslora=...)`; get_peft_model has no per-module rank, which a comment says;
    `learning_rate` holds the measured rate (or a comment says none was measured)."""
    model, notes = _model_line(rec)
    lr, lr_note = _lr_comment(rec, "keep your trainer's default")
    max_len = int(rec.inputs.get("max_length") or 2048)
    args = [f"r={rec.rank}", f"lora_alpha={_num(rec.lora_alpha)}", "lora_dropout=0.0",
            f"target_modules={_py(list(rec.target_modules))}", f"use_rslora={rec.use_rslora}"]
    if rec.modules_to_save:
        args.append(f"modules_to_save={_py(list(rec.modules_to_save))}")
    lines = _header(rec, "Unsloth") + notes + _no_rank_pattern(
        rec, "Unsloth", "FastLanguageModel.get_peft_model takes one r") + [
        "from unsloth import FastLanguageModel",
        "",
        "model, tokenizer = FastLanguageModel.from_pretrained(",
        f"    model_name={_py(model)},",
        f"    max_seq_length={max_len},",
        "    load_in_4bit=False,  # the rank was measured on the unquantized model",
        ")",
        "model = FastLanguageModel.get_peft_model(",
        "    model,",
        *[f"    {a}," for a in args],
        ")",
        lr_note,
    ]
    if lr is not None:
        lines.append(f"learning_rate = {lr!r}  # pass to SFTConfig(learning_rate=learning_rate)")
    return "\n".join(lines) + "\n"


# Hugging Face module names -> torchtune's
TORCHTUNE_ATTN = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj",
                  "o_proj": "output_proj", "output_proj": "output_proj"}
TORCHTUNE_MLP = {"gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"}
TORCHTUNE_OUTPUT = {"lm_head", "output"}


def torchtune_modules(target_modules: list[str]) -> dict[str, Any]:
    """torchtune's LoRA switches for PEFT `target_modules` (last name of each entry):
    `lora_attn_modules` (q_proj, k_proj, v_proj, output_proj from o_proj, in that order),
    `apply_lora_to_mlp` (any of gate_proj, up_proj, down_proj: torchtune adapts the three
    together), `apply_lora_to_output` (lm_head), and `unmapped`, the names torchtune has no
    switch for."""
    names = [t.rsplit(".", 1)[-1] for t in target_modules]
    order = ["q_proj", "k_proj", "v_proj", "output_proj"]
    attn = {TORCHTUNE_ATTN[n] for n in names if n in TORCHTUNE_ATTN}
    return {
        "lora_attn_modules": [m for m in order if m in attn],
        "apply_lora_to_mlp": any(n in TORCHTUNE_MLP for n in names),
        "apply_lora_to_output": any(n in TORCHTUNE_OUTPUT for n in names),
        "mlp_names": sorted({n for n in names if n in TORCHTUNE_MLP}),
        "unmapped": sorted({n for n in names if n not in TORCHTUNE_ATTN
                            and n not in TORCHTUNE_MLP and n not in TORCHTUNE_OUTPUT}),
    }


def torchtune_config_text(rec: Recommendation) -> str:
    """torchtune: YAML for a recipe config's `model:` section (lora_attn_modules with
    torchtune's names, apply_lora_to_mlp, apply_lora_to_output, lora_rank, lora_alpha,
    lora_dropout) and `optimizer.lr` when measured. torchtune scales by alpha / r and has no
    rsLoRA, so an rsLoRA recommendation exports alpha * sqrt(r), the same scale; it has no
    per-module rank, which a comment says."""
    mods = torchtune_modules(list(rec.target_modules))
    alpha = rslora_free_alpha(rec)
    lr, lr_note = _lr_comment(rec, "keep the recipe's optimizer.lr")
    notes = []
    if rec.use_rslora:
        notes.append(f"# lora_alpha {_yaml_num(round(alpha, 6))} = {rec.lora_alpha:g} * "
                     f"sqrt({rec.rank}): torchtune scales by alpha/r and has no rsLoRA; this "
                     f"gives the recommended scale {rec.lora_alpha:g}/sqrt({rec.rank})")
    if mods["apply_lora_to_mlp"] and len(mods["mlp_names"]) < 3:
        notes.append(f"# apply_lora_to_mlp adapts all three MLP projections; lorank targeted "
                     f"{', '.join(mods['mlp_names'])} only")
    if mods["unmapped"]:
        notes.append(f"# no torchtune switch for {', '.join(mods['unmapped'])}: not adapted")
    if any("." in t for t in rec.target_modules):
        notes.append("# lorank's targets are listed by full module name; torchtune adapts the "
                     "chosen kinds of module in every layer")
    lines = _header(rec, "torchtune") + notes + _no_rank_pattern(
        rec, "torchtune", "its lora_* model builders take one lora_rank") + [
        "model:",
        "  # _component_: torchtune.models.<family>.lora_<model> (your model's LoRA builder)",
        f"  lora_attn_modules: {_yaml(mods['lora_attn_modules'])}",
        f"  apply_lora_to_mlp: {_yaml(mods['apply_lora_to_mlp'])}",
        f"  apply_lora_to_output: {_yaml(mods['apply_lora_to_output'])}",
        f"  lora_rank: {rec.rank}",
        f"  lora_alpha: {_yaml_num(round(alpha, 6))}",
        "  lora_dropout: 0.0",
        lr_note,
    ]
    if lr is not None:
        lines += ["optimizer:", f"  lr: {_yaml_num(lr)}"]
    return "\n".join(lines) + "\n"


# name -> (title in snippets.md, code-fence language, function)
FRAMEWORKS: dict[str, tuple[str, str, Callable[[Recommendation], str]]] = {
    "peft": ("PEFT", "python", peft_config_text),
    "trl": ("TRL (SFTTrainer)", "python", trl_config_text),
    "axolotl": ("Axolotl", "yaml", axolotl_config_text),
    "llamafactory": ("LLaMA-Factory", "yaml", llamafactory_config_text),
    "unsloth": ("Unsloth", "python", unsloth_config_text),
    "torchtune": ("torchtune", "yaml", torchtune_config_text),
}


def export_config(rec: Recommendation, framework: str) -> str:
    """The recommendation as `framework`'s configuration (one of `FRAMEWORKS`); an unknown
    name raises LorankError listing the known ones."""
    if framework not in FRAMEWORKS:
        raise LorankError(f"--to {framework}: unknown framework; known: {', '.join(FRAMEWORKS)}")
    return FRAMEWORKS[framework][2](rec)


def snippets(rec: Recommendation) -> str:
    """snippets.md: every framework's configuration (`FRAMEWORKS`), each in its own fenced
    block under a `## <title>` heading."""
    parts = [f"# lorank recommendation: rank {rec.rank}", "",
             "Written by `lorank recommend`; one framework at a time: "
             "`lorank export DIR --to NAME`."]
    for name, (title, lang, make) in FRAMEWORKS.items():
        parts += ["", f"## {title} (`--to {name}`)", f"```{lang}", make(rec).rstrip("\n"), "```"]
    return "\n".join(parts) + "\n"
