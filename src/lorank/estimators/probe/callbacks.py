"""Trainer callbacks the probes add to a training run: stop partway through a longer schedule
(the learning-rate pilot), and checkpoint between eval points (a resumable probe).
"""

from __future__ import annotations

from transformers import TrainerCallback, TrainerControl, TrainerState


class _StopAt(TrainerCallback):
    """Stop training after `step` steps of a longer schedule (the pilot's first fraction)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


class SaveEvery(TrainerCallback):
    """Checkpoint every `every` steps, between the run's eval points: the SVD probe evaluates
    once, at its last step, and the Trainer saves only at eval points, so without this an
    interrupted probe would have nothing to resume from."""

    def __init__(self, every: int):
        self.every = max(1, int(every))

    def on_step_end(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        if state.global_step % self.every == 0:
            control.should_save = True
        return control
