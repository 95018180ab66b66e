"""Read a linear layer's inputs and output gradients during backward, with every weight frozen.

The weight gradient of a linear layer y = W x over a batch is sum_t d_t x_t^T (d_t = dL/dy_t).
Everything lorank measures from gradients (the gradient spectrum's sketches and cross-fitted
projections, the Fisher-diagonal baseline's masses) is built from x and d directly, so no
full-weight `.grad` is ever stored: that is what lets the measurement run on models whose
weight gradients would not fit in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

# on_grad(name, x, d): x (batch, tokens, d_in) and d (batch, tokens, d_out), detached; float32
# copies, or with `as_float32=False` in the model's dtype, x a view of the layer's input itself
OnGrad = Callable[[str, torch.Tensor, torch.Tensor], None]


class OutputGradientTaps:
    """Hooks on named linear modules that hand (x, d) of each backward to `on_grad`.

    Inside the `with` block every parameter is frozen and the model is in eval mode (no
    dropout); both are restored on exit. Gradients reach the hooks because each tapped
    module's output is made to require grad. Hooks fire only inside `reading(batch_size)`,
    which tells them how many examples (rows) the flattened tokens belong to.

    `as_float32=False` hands x and d over in the model's dtype, x a view of the very tensor the
    layer read: layers that read one input (q, k and v) then hand over one storage, which
    their consumer can recognise and keep once; converting to float32 is then the consumer's
    (where it multiplies or accumulates). With True (the default) every hook hands over its
    own float32 copies on a lower-precision model.
    """

    def __init__(self, model: nn.Module, modules: dict[str, nn.Module], on_grad: OnGrad,
                 as_float32: bool = True):
        self.model, self.modules, self.on_grad = model, modules, on_grad
        self.as_float32 = as_float32
        self.batch_size: int | None = None

    def __enter__(self) -> OutputGradientTaps:
        self.was_training = self.model.training
        self.flags = [(p, p.requires_grad) for p in self.model.parameters()]
        self.model.eval()
        for p, _ in self.flags:
            p.requires_grad_(False)
        self.handles = [m.register_forward_hook(self._hook(name))
                        for name, m in self.modules.items()]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        for p, flag in self.flags:
            p.requires_grad_(flag)
        self.model.train(self.was_training)

    @contextmanager
    def reading(self, batch_size: int) -> Iterator[None]:
        """Forward and backward one batch of `batch_size` examples inside this block."""
        self.batch_size = batch_size
        try:
            with torch.enable_grad():
                yield
        finally:
            self.batch_size = None

    def _hook(self, name: str):
        def forward_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            b = self.batch_size
            if b is None:
                return output
            x = inputs[0].detach()
            if not output.requires_grad:  # nothing upstream needs gradients: start the graph here
                output = output.detach().requires_grad_().clone()  # clone: in-place ops stay legal

            def grad_hook(d: torch.Tensor) -> None:
                x3, d3 = x.reshape(b, -1, x.shape[-1]), d.detach().reshape(b, -1, d.shape[-1])
                if self.as_float32:
                    x3, d3 = x3.float(), d3.float()
                self.on_grad(name, x3, d3)

            output.register_hook(grad_hook)
            return output

        return forward_hook
