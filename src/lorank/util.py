"""Helpers every stage may use: atomic writes, progress bars with ETA, option lists.

The bottom of the package: it imports nothing from lorank but `errors`, so data, training,
estimators, the sweep and the benchmark can write files and show progress without loading the
report (terminal tables, plots) that sits at the top.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

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
