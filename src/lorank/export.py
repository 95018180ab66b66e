"""Export: the files `recommend` writes into its output directory, and reading them back.

`write_outputs` writes, each atomically: recommendation.json (the decision, its reasons and a
small summary of each estimator's evidence: a few KB), evidence/<name>.json (an estimator's
whole evidence, where it holds bulky per-layer or per-example parts), a PEFT
`adapter_config.json`, `snippets.md` (every framework's configuration, `lorank.frameworks`)
and `report.html` (`lorank.html_report`). `read_recommendation` reads recommendation.json back
for `lorank export`.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

from peft import LoraConfig

from lorank.decide import Recommendation
from lorank.errors import LorankError
from lorank.frameworks import (  # re-exported: `from lorank.export import export_config` works
    AUTO_CLASS,
    FRAMEWORKS,
    base_model,
    export_config,
    measured_learning_rate,
    rslora_free_alpha,
    snippets,
    torchtune_modules,
)
from lorank.html_report import render_report
from lorank.util import atomic_write_text

__all__ = ["FRAMEWORKS", "base_model", "ensure_writable", "export_config", "load_recommendation",
           "lora_config", "measured_learning_rate", "read_recommendation", "rslora_free_alpha",
           "slim_recommendation", "snippets", "torchtune_modules", "write_outputs",
           "written_files"]


def lora_config(rec: Recommendation, base_model: str | None = None) -> LoraConfig:
    """The PEFT LoraConfig that carries the recommendation (and the scaling rule it used)."""
    return LoraConfig(
        r=rec.rank, lora_alpha=rec.lora_alpha, use_rslora=rec.use_rslora,
        target_modules=list(rec.target_modules), modules_to_save=list(rec.modules_to_save) or None,
        rank_pattern=dict(rec.rank_pattern), alpha_pattern=dict(rec.alpha_pattern),
        lora_dropout=0.0, bias="none", task_type=rec.task_type,
        base_model_name_or_path=base_model,
    )


def ensure_writable(out: Path) -> Path:
    """Create the output directory and prove it is writable before any work is done."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LorankError(f"--out {out}: is a file; expected a directory (new or existing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".lorank-write-test-{os.getpid()}"  # workers may start together
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise LorankError(f"--out {out}: output directory is not writable ({err.strerror})") from None
    return out


# ---------------------------------------------------------------------------------------------
# recommendation.json stays small; bulky evidence goes to evidence/<name>.json

INLINE_BYTES = 512  # a details value (or per-layer rank_pattern) larger than this moves out
# details that `lorank export` (`measured_learning_rate`) and the terminal summary read from
# recommendation.json stay in it whatever their size
KEPT_DETAILS = ("best_lr", "learning_rate", "lr_pilot", "config", "recipe", "confidence",
                "files", "steps", "budget")
EVIDENCE_DIR = "evidence"


def _size(value: Any) -> int:
    return len(json.dumps(value, default=str))


def _evidence_file(name: str, taken: set[str]) -> str:
    """evidence/<name>.json, the name made safe for a file name and unique."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "evidence"
    path, i = f"{EVIDENCE_DIR}/{stem}.json", 2
    while path in taken:
        path, i = f"{EVIDENCE_DIR}/{stem}-{i}.json", i + 1
    taken.add(path)
    return path


def slim_recommendation(rec: Recommendation) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(recommendation.json's object, {relative path: an estimator's whole evidence}).

    In each evidence entry, every `details` value larger than INLINE_BYTES of JSON (except
    KEPT_DETAILS) and a per-layer `rank_pattern` that large are left out of
    recommendation.json; the entry then names the file holding the whole evidence
    (`evidence_file`) and what was left out (`moved`). Everything else, the decision above
    all (`rank`, `rank_pattern`, ... of the Recommendation), is kept as `to_dict` gives it.
    """
    data = json.loads(json.dumps(rec.to_dict(), default=str))
    files: dict[str, dict[str, Any]] = {}
    taken: set[str] = set()
    for i, entry in enumerate(data.get("evidence") or []):
        details = entry.get("details") or {}
        moved = [f"details.{k}" for k, v in details.items()
                 if k not in KEPT_DETAILS and _size(v) > INLINE_BYTES]
        if _size(entry.get("rank_pattern") or {}) > INLINE_BYTES:
            moved.append("rank_pattern")
        if not moved:
            continue
        path = _evidence_file(str(entry.get("name", f"evidence-{i}")), taken)
        files[path] = entry
        slim = {k: v for k, v in entry.items() if k not in ("details", "rank_pattern")}
        if "rank_pattern" not in moved:
            slim["rank_pattern"] = entry.get("rank_pattern", {})
        slim["details"] = {k: v for k, v in details.items() if f"details.{k}" not in moved}
        data["evidence"][i] = slim | {"evidence_file": path, "moved": moved}
    return data, files


def written_files(rec: Recommendation) -> list[tuple[str, str]]:
    """(path relative to the output directory, what it holds) for every file of a `recommend`
    output: those `write_outputs` writes and those the estimators wrote there themselves
    (listed in their evidence's `details["files"]`)."""
    listed = [("recommendation.json", "the decision, its reasons, each estimator's summary"),
              ("report.html", "the report: decision, curves, cost per rank, evidence"),
              ("adapter_config.json", "PEFT: LoraConfig.from_pretrained(this directory)"),
              ("snippets.md", "the config for PEFT, TRL, Axolotl, LLaMA-Factory, Unsloth, "
                              "torchtune")]
    listed += [(path, f"{entry.get('name')}: the whole evidence")
               for path, entry in slim_recommendation(rec)[1].items()]
    for e in rec.evidence:
        own = (e.get("details") or {}).get("files") or {}
        listed += [(str(name), str(what)) for name, what in own.items()]
    return listed


def write_outputs(rec: Recommendation, out: Path, base_model: str | None = None) -> dict[str, Path]:
    """Write the evidence files, adapter_config.json, snippets.md, report.html and last
    recommendation.json (so that every file it names exists), each atomically. Returns
    {"recommendation", "adapter_config", "snippets", "report", and each evidence file's
    relative path: its Path}."""
    out = ensure_writable(out)
    data, evidence_files = slim_recommendation(rec)
    paths: dict[str, Path] = {}
    for rel, entry in evidence_files.items():
        (out / EVIDENCE_DIR).mkdir(exist_ok=True)
        paths[rel] = out / rel
        atomic_write_text(paths[rel], json.dumps(entry, indent=1))
    config = lora_config(rec, base_model).to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    paths["adapter_config"] = out / "adapter_config.json"
    atomic_write_text(paths["adapter_config"], json.dumps(config, indent=2, sort_keys=True))
    paths["snippets"] = out / "snippets.md"
    atomic_write_text(paths["snippets"], snippets(rec))
    paths["report"] = out / "report.html"
    held = {str(entry.get("name")): rel for rel, entry in evidence_files.items()}
    atomic_write_text(paths["report"], render_report(rec, written_files(rec), held))
    paths["recommendation"] = out / "recommendation.json"
    atomic_write_text(paths["recommendation"], json.dumps(data, indent=2))
    return paths


# ---------------------------------------------------------------------------------------------
# reading a recommendation back


REQUIRED = ("rank", "lora_alpha", "use_rslora", "target_modules")


def _defaults() -> dict[str, Any]:
    """Fresh values for the Recommendation fields a hand-written file may leave out."""
    return {"modules_to_save": [], "rank_pattern": {}, "alpha_pattern": {},
            "trainable_params": 0, "adapter_bytes": 0, "memory": {}, "confidence": "unknown",
            "evidence": [], "rationale": [], "warnings": [], "candidates": [], "inputs": {},
            "task_type": "CAUSAL_LM", "decided_by": ""}


def load_recommendation(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, as written by `write_outputs` (no checks)."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_recommendation(directory: Path) -> Recommendation:
    """The Recommendation in `directory/recommendation.json`.

    Needs `rank` (int >= 1), `lora_alpha` (number), `use_rslora` (bool) and `target_modules`
    (list of str); every other field of `Recommendation` missing from the file takes an empty
    default. A missing directory or file, unreadable or malformed JSON, or a missing or
    ill-typed field raises LorankError naming the path.
    """
    directory = Path(directory)
    if not directory.exists():
        raise LorankError(f"{directory}: no such directory (write one with `lorank recommend "
                          f"--out {directory}`)")
    if not directory.is_dir():
        raise LorankError(f"{directory}: not a directory; expected a `lorank recommend --out` "
                          "directory holding recommendation.json")
    path = directory / "recommendation.json"
    if not path.is_file():
        raise LorankError(f"{path}: not found (write it with `lorank recommend --out "
                          f"{directory}`)")
    try:
        data = load_recommendation(path)
    except OSError as err:
        raise LorankError(f"{path}: cannot be read ({err.strerror})") from None
    except UnicodeDecodeError:
        raise LorankError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise LorankError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
    if not isinstance(data, dict):
        raise LorankError(f"{path}: expected a JSON object, found {type(data).__name__}")
    missing = [k for k in REQUIRED if data.get(k) is None]
    if missing:
        raise LorankError(f"{path}: not a lorank recommendation (missing {', '.join(missing)})")
    known = {f.name for f in fields(Recommendation)}
    given = _defaults() | {k: v for k, v in data.items() if k in known and v is not None}
    bad = next((k for k, (ok, _) in _field_checks(given).items() if not ok), None)
    if bad is not None:
        raise LorankError(f"{path}: field {bad} is {json.dumps(given[bad])[:60]}; expected "
                          f"{_field_checks(given)[bad][1]}")
    return Recommendation(**given)


def _is_int(v: Any, low: int = 1) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(t, str) and t for t in v)


def _field_checks(d: dict[str, Any]) -> dict[str, tuple[bool, str]]:
    """Field -> (whether its value is usable, what was expected)."""
    return {
        "rank": (_is_int(d["rank"]), "an integer >= 1"),
        "lora_alpha": (_is_number(d["lora_alpha"]), "a positive number"),
        "use_rslora": (isinstance(d["use_rslora"], bool), "true or false"),
        "target_modules": (_str_list(d["target_modules"]) and bool(d["target_modules"]),
                           "a non-empty list of module names"),
        "modules_to_save": (_str_list(d["modules_to_save"]), "a list of module names"),
        "rank_pattern": (isinstance(d["rank_pattern"], dict)
                         and all(_is_int(v) for v in d["rank_pattern"].values()),
                         "an object: module name -> integer rank >= 1"),
        "alpha_pattern": (isinstance(d["alpha_pattern"], dict)
                          and all(_is_number(v) for v in d["alpha_pattern"].values()),
                          "an object: module name -> positive number"),
        "evidence": (isinstance(d["evidence"], list)
                     and all(isinstance(e, dict) for e in d["evidence"]), "a list of objects"),
        "inputs": (isinstance(d["inputs"], dict), "an object"),
        "confidence": (isinstance(d["confidence"], str), "a string"),
        "task_type": (d["task_type"] in AUTO_CLASS, " or ".join(AUTO_CLASS)),
        "decided_by": (isinstance(d["decided_by"], str), "a string"),
    }
