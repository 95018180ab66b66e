"""Helpers every stage may use: atomic writes, progress bars with ETA, option lists, and the
store of finished measurements that a rerun reuses (`Kept`).

The bottom of the package: it imports nothing from lorank but `errors`, so data, training,
estimators, the sweep and the benchmark can write files and show progress without loading the
report (terminal tables, plots) that sits at the top.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from lorank.errors import LorankError

# ------------------------------------------------------------------------------ atomic writes


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file in the same directory and rename: never a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_figure(fig, path: Path) -> None:
    """Save a matplotlib figure atomically as PNG."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.chmod(tmp, _default_mode())
    os.replace(tmp, path)


def _default_mode() -> int:
    """The mode a plain open() would give (mkstemp makes files private)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def output_dir_guard(out: str | os.PathLike | None) -> Iterator[None]:
    """Run a command that writes into `out`: when the block fails (an error, Ctrl-C, SIGTERM)
    and leaves `out` empty, `out` is removed if the block created it. An output folder that
    holds anything (finished work), or that existed beforehand, stays. `out` None: nothing to
    guard."""
    created = out is not None and not Path(out).exists()
    try:
        yield
    except BaseException:
        if created:
            with contextlib.suppress(OSError):  # not empty (or gone): leave it
                os.rmdir(out)
        raise


# ---------------------------------------------------------------------- kept measurements

KEPT_DIR = "cache"  # under an output folder: the finished measurements a rerun reuses


def content_hash(obj: Any, digits: int = 16) -> str:
    """Hex digest (sha256, first `digits`) of `obj` as canonical JSON: sorted keys, and str()
    of anything JSON has no type for. Equal content, equal hash, whatever the key order."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:digits]


def _canonical(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


class Kept:
    """Finished measurements kept as JSON files in `folder` (an output folder's `cache/`), so
    that a rerun of the same command reuses them instead of measuring again.

    A measurement is stored under its `kind` and a key: `common` (the model's identity and the
    software versions) plus the data and options that measurement depends on. Its file is
    `<kind>-<content_hash(key)>.json` and holds the key too; it is reused only when that key
    equals the one asked for, so any change of model, data or options measures again. Files
    are written atomically (never half a file, even on Ctrl-C). `folder` None: nothing is kept
    or reused. `reused` lists one line per reuse ("reused base loss from PATH") for the
    command to print.
    """

    def __init__(self, folder: str | os.PathLike | None, common: dict[str, Any] | None = None):
        self.folder = Path(folder) if folder is not None else None
        self.common = dict(common or {})
        self.reused: list[str] = []

    def _entry(self, kind: str, key: dict[str, Any]) -> tuple[Path, Any]:
        assert self.folder is not None
        full = _canonical({"kind": kind, **self.common, **key})
        return self.folder / f"{kind}-{content_hash(full)}.json", full

    def load(self, kind: str, key: dict[str, Any], what: str) -> Any | None:
        """The payload kept for `kind` and `key`, or None (nothing kept, another key, or an
        unreadable file); a reuse adds "reused `what` from PATH" to `reused`."""
        if self.folder is None:
            return None
        path, full = self._entry(kind, key)
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(stored, dict) or stored.get("key") != full or "payload" not in stored:
            return None
        self.reused.append(f"reused {what} from {path}")
        return stored["payload"]

    def store(self, kind: str, key: dict[str, Any], payload: Any) -> Path | None:
        """Keep `payload` (JSON-able; str() for other types) for `kind` and `key`; returns its
        file (None when nothing is kept)."""
        if self.folder is None:
            return None
        path, full = self._entry(kind, key)
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"key": full, "payload": payload}, default=str))
        return path


# ------------------------------------------------------------------------------------ progress


class _NoProgress:
    def add_task(self, *args, **kwargs) -> int:
        return 0

    def advance(self, *args, **kwargs) -> None:
        pass

    def update(self, *args, **kwargs) -> None:
        pass


def new_progress(console: Console | None = None) -> Progress:
    """lorank's one progress-bar layout: description, bar, n/total, elapsed, ETA."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=console or Console(stderr=True), transient=False,
    )


@contextlib.contextmanager
def progress_bar(enabled: bool = True, console: Console | None = None) -> Iterator[Progress]:
    """A rich progress bar with ETA, or a silent stand-in when disabled."""
    if not enabled:
        yield _NoProgress()  # type: ignore[misc]
        return
    with new_progress(console) as bar:
        yield bar


@contextlib.contextmanager
def ticker(description: str, total: int, enabled: bool = True) -> Iterator[Callable[[], None]]:
    """A progress bar over `total` units; yields the function that advances it by one."""
    with progress_bar(enabled) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)


# ------------------------------------------------------------------------------------- options


def parse_list(text: str, kind: type, name: str) -> list:
    """Parse a comma-separated option ('1,2,4'); one clear error if it is empty or malformed."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise LorankError(f"--{name}: empty list; expected comma-separated values like 1,2,4")
    try:
        values = [kind(t) for t in items]
    except ValueError:
        raise LorankError(f"--{name} {text}: expected comma-separated {kind.__name__} values"
                          ) from None
    if name == "ranks" and any(v < 1 for v in values):
        raise LorankError(f"--{name} {text}: ranks must be positive integers")
    if kind is float and any(not math.isfinite(v) or v <= 0 for v in values):
        raise LorankError(f"--{name} {text}: learning rates must be positive numbers")
    return values
