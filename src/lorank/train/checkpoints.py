"""The files a training run writes into its output directory, and finding its newest
checkpoint.

A lorank checkpoint is a Trainer checkpoint (`checkpoint-<step>/`) that also holds lorank's run
state (`STATE_FILE`: curve, best point, evaluator history); only such checkpoints count for
resuming. Next to them the run writes its recipe (`CONFIG_FILE`) and, when it ends, its result
(`RESULT_FILE`). JSON files are written atomically.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from lorank.util import atomic_write_text

STATE_FILE = "lorank_state.json"
CONFIG_FILE = "lorank_train_config.json"
RESULT_FILE = "lorank_train_result.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def _write_json(path: str, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=1, default=float))


def _checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """lorank checkpoints in out_dir (those holding our state file), newest first."""
    if not os.path.isdir(out_dir):
        return []
    found = []
    for name in os.listdir(out_dir):
        m = _CHECKPOINT_RE.match(name)
        path = os.path.join(out_dir, name)
        if m and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(m.group(1)), path))
    return sorted(found, reverse=True)


def last_checkpoint(out_dir: str) -> str | None:
    """Newest complete lorank checkpoint in `out_dir` (a Trainer checkpoint plus our state)."""
    found = _checkpoints(out_dir)
    return found[0][1] if found else None
