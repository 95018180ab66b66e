"""The Hugging Face Hub as every Hugging Face tool reaches it: download what is not cached,
read the cache when offline, and say in one line why a repository cannot be had.

Offline means `offline=True` (the CLI's `--offline`) or `HF_HUB_OFFLINE` set; the token is
huggingface_hub's own (`HF_TOKEN`, or `hf auth login`). Models come as safetensors only; their
own Python code is fetched only with `trust_remote_code`. Imports nothing from lorank but
`errors`, so data and models share it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

from lorank.errors import LorankError

# what a model needs besides its weights: config, tokenizer, chat template, generation config
MODEL_FILES = ("*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja")
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
_TRUE = {"1", "ON", "YES", "TRUE"}


def offline_reason(offline: bool = False) -> str | None:
    """Why the network is off ('--offline' or 'HF_HUB_OFFLINE'), or None when it may be used."""
    if offline:
        return "--offline"
    import huggingface_hub.constants as constants

    if constants.HF_HUB_OFFLINE or str(os.environ.get("HF_HUB_OFFLINE", "")).upper() in _TRUE:
        return "HF_HUB_OFFLINE"
    return None


def how_to_go_online(reason: str) -> str:
    return "run without --offline" if reason == "--offline" else "unset HF_HUB_OFFLINE"


@contextlib.contextmanager
def hub_offline():
    """Offline mode for huggingface_hub (and so transformers) and `datasets` inside the block.

    Both read HF_HUB_OFFLINE once, at import, so setting the environment variable later does
    nothing; this sets their module flags and restores them afterwards."""
    import huggingface_hub.constants as hub

    saved = {"hub": hub.HF_HUB_OFFLINE}
    hub.HF_HUB_OFFLINE = True
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        saved["datasets"] = datasets_config.HF_HUB_OFFLINE
        datasets_config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = saved["hub"]
        if datasets_config is not None:
            datasets_config.HF_HUB_OFFLINE = saved["datasets"]


def looks_like_repo_id(source: str) -> bool:
    """'org/name': the form of a hub repository id (not a path that happens to be missing)."""
    return (source.count("/") == 1 and not source.startswith((".", "/", "~"))
            and all(part.strip() for part in source.split("/")))


def model_snapshot(repo_id: str, *, offline: bool = False,
                   trust_remote_code: bool = False) -> str:
    """The local folder of a hub model: config, tokenizer and safetensors weights, downloaded
    into the Hugging Face cache when missing and the network is allowed. A sharded checkpoint
    is fetched in two steps (its index names the shards), so no other weight files come along."""
    reason = offline_reason(offline)
    patterns = [*MODEL_FILES, WEIGHTS] + (["*.py"] if trust_remote_code else [])
    folder = Path(_snapshot(repo_id, patterns, reason))
    index = folder / WEIGHTS_INDEX
    shards: list[str] = []
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                                .values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise LorankError(f"model '{repo_id}': unreadable {WEIGHTS_INDEX} in {folder}"
                              ) from None
        if shards:
            folder = Path(_snapshot(repo_id, shards, reason))
    has_weights = (folder / WEIGHTS).is_file() or bool(shards) and all(
        (folder / s).is_file() for s in shards)
    if (folder / "config.json").is_file() and has_weights:
        return str(folder)
    if reason is not None:  # a partial snapshot in the cache counts as not cached
        raise LorankError(not_cached("model", repo_id, reason))
    if not (folder / "config.json").is_file():
        raise LorankError(f"model '{repo_id}': no config.json on the Hugging Face Hub; "
                          "expected a transformers model repository")
    raise LorankError(f"model '{repo_id}': no safetensors weights on the Hugging Face Hub "
                      f"({WEIGHTS} or {WEIGHTS_INDEX}); lorank loads safetensors only")


def _snapshot(repo_id: str, patterns: list[str], reason: str | None) -> str:
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns,
                                                 local_files_only=reason is not None)
    except Exception as err:  # one line, whatever huggingface_hub raised
        if reason is not None and isinstance(err, LocalEntryNotFoundError):
            raise LorankError(not_cached("model", repo_id, reason)) from None
        raise LorankError(f"model '{repo_id}': {hub_error(err, repo_id)}") from None


def not_cached(kind: str, repo_id: str, reason: str) -> str:
    """The one line for a repository that is not in the local cache while offline."""
    fetch = f"hf download {repo_id}" if kind == "model" else None
    how = (f"fetch it with `{fetch}` or {how_to_go_online(reason)}" if fetch
           else f"{how_to_go_online(reason)} once to download it")
    return (f"{kind} '{repo_id}' is not in the local Hugging Face cache and {reason} forbids "
            f"downloading it: {how}")


def hub_error(err: BaseException, repo_id: str, kind: str = "model") -> str:
    """A huggingface_hub (or `datasets`) error as one line: gated, not found or private, no
    access, no network; anything else as its type and first line."""
    from huggingface_hub import errors

    page = f"https://huggingface.co/{'datasets/' if kind == 'dataset' else ''}{repo_id}"
    login = "set HF_TOKEN or run `hf auth login`"
    if isinstance(err, errors.GatedRepoError):
        return (f"gated on the Hugging Face Hub: accept its terms at {page}, then {login} "
                "with an account that has access")
    if isinstance(err, errors.RepositoryNotFoundError):
        return (f"no local file or folder of that name, and the Hugging Face Hub has no such "
                f"repository (if it is private, {login})")
    if isinstance(err, errors.RevisionNotFoundError):
        return "the Hugging Face Hub has no such revision"
    if isinstance(err, errors.HfHubHTTPError):
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403):
            return f"the Hugging Face Hub refused access (HTTP {status}): {login}"
        return f"the Hugging Face Hub answered HTTP {status}: {first_line(err)}"
    if isinstance(err, errors.LocalEntryNotFoundError):
        return ("the Hugging Face Hub cannot be reached and it is not in the local cache "
                "(check the network, proxy or HF_ENDPOINT)")
    return f"{type(err).__name__}: {first_line(err)}"


def first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__
