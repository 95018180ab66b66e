"""Building a task's data into a folder (train.jsonl, val.jsonl, task.json), and the inputs
`lorank sweep --task` takes from it.

task.json records the recipe, the seed, the split sizes, the versions of the sources read
(Debian package versions, or the Python version) and the builder's meta, so a result can say
exactly what it was measured on. Files are written atomically.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

from lorank.bench.tasks.recipes import TASKS, TaskSpec
from lorank.bench.tasks.source_text import Rows, package_version
from lorank.errors import LorankError
from lorank.util import atomic_write_text


def _jsonl(rows: Rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _source_versions(spec: TaskSpec) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for src in spec.sources:
        if src == "python-stdlib":
            versions[src] = f"{platform.python_implementation()} {platform.python_version()}"
        else:
            versions[src] = package_version(src)
    return versions


def build_task(name: str, out_dir: Path, seed: int = 0, limit: int | None = None) -> dict:
    """Build task `name` into out_dir (train.jsonl, val.jsonl, task.json); return the paths.

    `limit` caps both split sizes (for tests); a limited build is the prefix-compatible small
    version of the same task only where the builder is nested (facts), otherwise a smaller draw.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    spec = TASKS[name]
    n_train, n_val = spec.n_train, spec.n_val
    if limit is not None:
        n_train, n_val = min(n_train, limit), min(n_val, limit)
    train, val, meta = spec.builder(n_train, n_val, seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "train": out_dir / "train.jsonl",
        "val": out_dir / "val.jsonl",
        "task": out_dir / "task.json",
    }
    atomic_write_text(paths["train"], _jsonl(train))
    atomic_write_text(paths["val"], _jsonl(val))
    info = {
        "task": spec.to_dict(),
        "seed": seed,
        "limit": limit,
        "n_train": len(train),
        "n_val": len(val),
        "sources": _source_versions(spec),
        "builder": meta,
    }
    atomic_write_text(paths["task"], json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    return paths


def task_inputs(name: str, out: str | Path, seed: int = 0) -> tuple[str, str, str, dict]:
    """Build a benchmark task's data into OUT/data; return model, train, val and its recipe."""
    if name not in TASKS:
        raise LorankError(f"--task {name}: unknown task; known: {', '.join(TASKS)}")
    spec = TASKS[name]
    try:
        paths = build_task(name, Path(out) / "data", seed=seed)
    except ValueError as err:
        raise LorankError(str(err)) from None
    recipe = {"ranks": ",".join(map(str, spec.ranks)), "lrs": ",".join(f"{x:g}" for x in spec.lrs),
              "seeds": ",".join(map(str, spec.seeds)), "steps": spec.steps,
              "batch_size": spec.batch_size, "max_length": spec.max_length,
              "lora_alpha": spec.lora_alpha, "skip_margin": spec.skip_margin}
    return spec.model, str(paths["train"]), str(paths["val"]), recipe
