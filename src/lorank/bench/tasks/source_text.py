"""What every benchmark dataset builder shares: the rows it returns, the check that the Debian
package it reads is installed, that package's version, and helpers for the text it reads.

A builder is called as `builder(n_train, n_val, seed)` and returns (train rows, validation
rows, meta), the same for the same seed on the same machine. A row is one JSON object: prompt
and completion, text and label, or chat messages. A package whose data is missing raises
ValueError naming the command that installs it (`INSTALL_HINT`).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path

INSTALL_HINT = "bash scripts/install-task-data.sh"

Rows = list[dict[str, str]]
Builder = Callable[[int, int, int], tuple[Rows, Rows, dict]]


def _require(path: Path, package: str) -> None:
    if not path.exists():
        raise ValueError(
            f"missing {path}: the Debian package '{package}' is not installed; "
            f"install it with: {INSTALL_HINT}"
        )


def package_version(package: str) -> str | None:
    """Installed version of a Debian package, or None when dpkg does not know it."""
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", package],
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def _words(s: str) -> int:
    return len(s.split())


def _clean(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip()
