"""A `lorank sweep` worker for the multi-worker tests, paced so that faults land mid-run.

Imported once by a multiprocessing fork server (torch, transformers and lorank loaded there),
so each worker is a fresh process forked from it in a fraction of a second instead of one that
spends tens of seconds importing on busy cores. `run` is the worker process's body: the CLI's
`main()` with the given arguments, whose training runs log every step ("pid point step time")
to STEP_LOG and sleep STEP_SECONDS after it.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
if sys.path[:1] != [SRC]:  # the source tree next to these tests, not another install
    sys.path.insert(0, SRC)

import matplotlib  # noqa: E402  (loaded before forking: every worker plots at the end)

matplotlib.use("Agg")
import matplotlib.pyplot  # noqa: E402, F401
import peft  # noqa: E402, F401
import torch  # noqa: E402
from transformers import Trainer, TrainerCallback  # noqa: E402, F401

import lorank.api  # noqa: E402, F401
import lorank.sweep.trial_run as trial_run  # noqa: E402  (where the sweep calls train_lora)
from lorank.cli import main  # noqa: E402


class Paced(TrainerCallback):
    def __init__(self, point: str):
        self.point = point

    def on_step_end(self, args, state, control, **kwargs):
        with open(os.environ["STEP_LOG"], "a") as f:
            f.write(f"{os.getpid()} {self.point} {state.global_step} {time.time():.2f}\n")
        time.sleep(float(os.environ["STEP_SECONDS"]))


_train_lora = trial_run.train_lora


def _paced(*args, **kwargs):
    point = os.path.basename(os.fspath(kwargs["out_dir"]))
    kwargs["callbacks"] = [*kwargs.get("callbacks", ()), Paced(point)]
    return _train_lora(*args, **kwargs)


def run(argv: list[str], env: dict[str, str], stderr: str) -> None:
    """Body of one worker process: `lorank sweep ARGV` with ENV added, stderr to a file."""
    os.environ.update(env)
    with open(stderr, "w") as err, open(os.devnull, "w") as null:
        os.dup2(err.fileno(), 2)
        os.dup2(null.fileno(), 1)
    torch.set_num_threads(1)
    trial_run.train_lora = _paced
    sys.argv = ["lorank", *argv]
    main()
