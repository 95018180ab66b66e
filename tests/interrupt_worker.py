"""A `lorank` command in a process of its own, for the interrupt tests, paced so that a signal
lands at a known point.

Imported once by a multiprocessing fork server (torch, transformers and lorank loaded there),
so each command is a fresh process forked from it in a fraction of a second instead of one that
spends many seconds importing on busy cores. `run` is the process's body: the CLI's `main()`
with the given arguments, stdout and stderr to files. From the environment:

  STEP_LOG=PATH        every training step is logged there as "pid run step" (run: the last
                       part of the run's out_dir);
  PAUSE_GRADIENT=1     the process pauses before the gradient spectrum is measured;
  PAUSE_RUN=K          ... or after step PAUSE_STEP (default 1) of the K-th training run it
                       starts (1-based);
  PAUSE_MARK=PATH      written when the pause begins; the pause lasts until a signal ends it.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
if sys.path[:1] != [SRC]:  # the source tree next to these tests, not another install
    sys.path.insert(0, SRC)

import matplotlib  # noqa: E402  (loaded before forking: the commands plot at the end)

matplotlib.use("Agg")
import matplotlib.pyplot  # noqa: E402, F401
import peft  # noqa: E402, F401
import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import lorank.api  # noqa: E402, F401
import lorank.estimators.gradient as gradient  # noqa: E402
import lorank.estimators.probe.nested as nested  # noqa: E402
import lorank.estimators.probe.pilot as pilot  # noqa: E402
import lorank.sweep as sweep  # noqa: E402
import lorank.sweep.trial_run as trial_run  # noqa: E402
import lorank.train as train  # noqa: E402
from lorank.cli import main  # noqa: E402

PAUSE_SECONDS = 600.0  # longer than any test waits: only the signal ends it


def pause() -> None:
    Path(os.environ["PAUSE_MARK"]).write_text(str(os.getpid()))
    time.sleep(PAUSE_SECONDS)


class Paced(TrainerCallback):
    """Logs each step of one run; pauses after step `pause_at` (None: never)."""

    def __init__(self, name: str, pause_at: int | None):
        self.name, self.pause_at = name, pause_at

    def on_step_end(self, args, state, control, **kwargs):
        if "STEP_LOG" in os.environ:
            with open(os.environ["STEP_LOG"], "a") as f:
                f.write(f"{os.getpid()} {self.name} {state.global_step}\n")
        if state.global_step == self.pause_at:
            pause()


_train_lora = train.train_lora
_gradient_spectrum = gradient.gradient_spectrum
_runs = [0]


def _paced_train_lora(*args, **kwargs):
    _runs[0] += 1
    out_dir = kwargs.get("out_dir")
    name = os.path.basename(os.fspath(out_dir)) if out_dir is not None else "-"
    pause_at = int(os.environ.get("PAUSE_STEP", "1")) \
        if os.environ.get("PAUSE_RUN") == str(_runs[0]) else None
    kwargs["callbacks"] = [*kwargs.get("callbacks", ()), Paced(name, pause_at)]
    return _train_lora(*args, **kwargs)


def _paced_gradient_spectrum(*args, **kwargs):
    if os.environ.get("PAUSE_GRADIENT"):
        pause()
    return _gradient_spectrum(*args, **kwargs)


def run(argv: list[str], env: dict[str, str], stdout: str, stderr: str) -> None:
    """Body of one command's process: `lorank ARGV` with ENV added, output to files."""
    os.environ.update(env)
    with open(stdout, "w") as out, open(stderr, "w") as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
    torch.set_num_threads(1)
    for module in (train, pilot, nested, sweep, trial_run):  # where train_lora is looked up
        module.train_lora = _paced_train_lora
    gradient.gradient_spectrum = _paced_gradient_spectrum
    sys.argv = ["lorank", *argv]
    main()
