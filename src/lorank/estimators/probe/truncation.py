"""Truncating a PEFT LoRA adapter to its first b components, the mechanism both probes read
their curve through (`NestedLoRA`), and the LoRA layers it applies to.

On top of PEFT's LoRA modules (no fork of the layer code):
  - a forward hook on each `lora_A[adapter]` multiplies its output by
    `[c(b)] * b + [0] * (R - b)` with `c(b) = scale(b) / scale(R)` (= sqrt(R / b) under rsLoRA),
    so a truncated adapter is exactly a rank-b adapter with the same alpha under the scaling
    rule, in training and in evaluation (the SVD probe, whose factors already carry the scale,
    uses a plain mask);
  - when the nested probe trains at b, gradients of the components >= b are zero, but AdamW
    would still move them (momentum, weight decay), so the inactive slices of
    `lora_A`/`lora_B` *and of their optimizer state* are snapshot before `optimizer.step()` and
    restored after it: a step at b leaves components >= b bitwise untouched.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState

from lorank.train import lora_scale


def lora_linear_layers(model: nn.Module, adapter: str = "default") -> list[tuple[str, nn.Module]]:
    """PEFT LoRA layers whose `lora_A[adapter]` is a plain Linear (the layers we can nest)."""
    layers = []
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, nn.ModuleDict) or adapter not in lora_a:
            continue
        if not isinstance(lora_a[adapter], nn.Linear):
            raise NotImplementedError(f"nested LoRA supports Linear layers only, not {name}")
        if adapter in getattr(module, "lora_variant", {}):
            raise NotImplementedError(
                f"nested LoRA does not support LoRA variants (DoRA...) at {name}"
            )
        layers.append((name, module))
    if not layers:
        raise ValueError("model has no LoRA layers for adapter " + repr(adapter))
    return layers


class NestedLoRA(TrainerCallback):
    """Controls the active truncation rank of every LoRA layer (training and evaluation).

    As a Trainer callback it draws `b` each optimizer step (deterministically from
    (seed, step), so a resumed run draws the same ranks) and keeps the components >= b, and
    their AdamW state, bitwise untouched by that step. `rank = None` means the full adapter.
    `correct_scale=False` applies a plain truncation mask (used by the SVD variant, whose
    factors already carry the scale).
    """

    def __init__(
        self,
        ranks: Sequence[int],
        *,
        lora_alpha: float,
        use_rslora: bool = True,
        seed: int = 0,
        adapter: str = "default",
        freeze_inactive: bool = True,
        correct_scale: bool = True,
    ):
        self.ranks = sorted(int(r) for r in ranks)
        self.lora_alpha = lora_alpha
        self.use_rslora = use_rslora
        self.seed = seed
        self.adapter = adapter
        self.freeze_inactive = freeze_inactive
        self.correct_scale = correct_scale
        self.rank: int | None = None
        self._model: nn.Module | None = None
        self._handles: list[Any] = []
        self._pairs: list[tuple[nn.Parameter, nn.Parameter]] = []  # (A weight, B weight)
        self._masks: dict[tuple[int, int, torch.device, torch.dtype], torch.Tensor] = {}
        self._saved: list[tuple[torch.Tensor, tuple, torch.Tensor, dict[str, torch.Tensor]]] = []
        self._opt_state: dict | None = None

    # -- hooks ------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> NestedLoRA:
        """Install the truncation hooks on `model` (idempotent)."""
        if self._model is model:
            return self
        self.detach()
        for _, module in lora_linear_layers(model, self.adapter):
            lora_a = module.lora_A[self.adapter]
            self._handles.append(lora_a.register_forward_hook(self._hook))
            self._pairs.append((lora_a.weight, module.lora_B[self.adapter].weight))
        self._model = model
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._pairs, self._model = [], [], None

    def factor(self, b: int, full: int) -> float:
        """Multiplier turning the rank-`full` scale into the rank-`b` scale of the rule."""
        if not self.correct_scale:
            return 1.0
        return lora_scale(b, self.lora_alpha, self.use_rslora) / lora_scale(
            full, self.lora_alpha, self.use_rslora
        )

    def _mask(self, full: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        b = min(self.rank, full)
        key = (b, full, device, dtype)
        if key not in self._masks:
            m = torch.zeros(full, dtype=torch.float32)
            m[:b] = self.factor(b, full)
            self._masks[key] = m.to(device=device, dtype=dtype)
        return self._masks[key]

    def _hook(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        if self.rank is None or self.rank >= output.shape[-1]:
            return None  # full adapter: factor(R, R) == 1, nothing to mask
        return output * self._mask(output.shape[-1], output.device, output.dtype)

    @contextmanager
    def truncated(self, rank: int | None) -> Iterator[None]:
        """Evaluate the adapter truncated to `rank` (None: full)."""
        previous, self.rank = self.rank, rank
        try:
            yield
        finally:
            self.rank = previous

    # -- rank schedule ----------------------------------------------------------------------
    def sample_rank(self, step: int) -> int:
        """Uniform over the candidate ranks, a pure function of (seed, step)."""
        rng = np.random.default_rng([self.seed, step])
        return self.ranks[int(rng.integers(len(self.ranks)))]

    # -- Trainer events ---------------------------------------------------------------------
    def on_train_begin(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        self.attach(kwargs["model"])
        return control

    def on_step_begin(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        self.rank = self.sample_rank(state.global_step)
        return control

    def on_pre_optimizer_step(self, args, state, control: TrainerControl, **kwargs):
        self.snapshot(kwargs.get("optimizer"))
        return control

    def on_optimizer_step(self, args, state, control: TrainerControl, **kwargs):
        self.restore()
        return control

    def on_step_end(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        self.rank = None
        return control

    # -- the "untouched" guarantee ----------------------------------------------------------
    def snapshot(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Copy components >= rank of every A (rows) / B (columns) and of their optimizer
        state tensors (exp_avg, exp_avg_sq, ...; state that does not exist yet is restored as
        zeros, i.e. as if the step had never seen those components)."""
        self._saved = []
        b = self.rank
        if not self.freeze_inactive or b is None:
            return
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
        self._opt_state = inner.state if inner is not None else None
        for a_w, b_w in self._pairs:
            if b >= a_w.shape[0]:
                continue
            # A is [R, in]: components are rows; B is [out, R]: components are columns
            for p, sl in ((a_w, (slice(b, None),)), (b_w, (slice(None), slice(b, None)))):
                state = self._opt_state.get(p, {}) if self._opt_state is not None else {}
                st = {
                    k: v[sl].clone()
                    for k, v in state.items()
                    if torch.is_tensor(v) and v.shape == p.shape
                }
                self._saved.append((p, sl, p.detach()[sl].clone(), st))

    @torch.no_grad()
    def restore(self) -> None:
        for p, sl, value, st in self._saved:
            p[sl] = value
            if self._opt_state is None:
                continue
            for k, v in self._opt_state.get(p, {}).items():
                if torch.is_tensor(v) and v.shape == p.shape:
                    v[sl] = st[k] if k in st else 0
        self._saved = []
