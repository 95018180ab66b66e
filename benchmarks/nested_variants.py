"""Two variants of the nested probe on the planted-rank tests, to ask where its bias comes from.

The nested probe lands one power of two high on planted rank-k updates of lm_head (k = 2 -> 4,
k = 4 -> 8; tests/test_probe.py). If the shared components had the right subspaces and only
their scales were off, giving each truncation its own scales would fix it:
  gain: truncation b reads B[:, :b] diag(g_b) A[:b], g_b learned (one vector per truncation)
  core: truncation b reads B[:, :b] M_b A[:b], M_b a learned b x b matrix (any rank-b map
        between the first b components' subspaces)
Neither moves the decision (gain 4 / 8, core 4 / 8), so the subspaces are off.

Usage: .venv/bin/python benchmarks/nested_variants.py [gain|core|plain]  (about 10 s each)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_probe import PROBE_CONFIG, base_factory, planted_data  # noqa: E402

import lorank.estimators.probe as probe  # noqa: E402
import lorank.estimators.probe.nested as nested_module  # noqa: E402

Plain = probe.NestedLoRA


class FreeScales(Plain):
    """Nested LoRA whose truncation b maps its first b components through a learned matrix
    (full b x b core, or diagonal gains), initialised to the rule's scale times the identity."""

    diagonal = False

    def attach(self, model: nn.Module) -> FreeScales:
        if self._model is model:
            return self
        super().attach(model)
        for _, module in probe.lora_linear_layers(model, self.adapter):
            a = module.lora_A[self.adapter]
            full = a.weight.shape[0]
            core = torch.zeros(len(self.ranks), full, full)
            for j, b in enumerate(self.ranks):
                b = min(b, full)
                core[j, :b, :b] = self.factor(b, full) * torch.eye(b)
            a.register_parameter("nested_core", nn.Parameter(core))  # trained with the adapter
        return self

    def _hook(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        full = output.shape[-1]
        b = full if self.rank is None else min(self.rank, full)
        mask = torch.zeros(full, full, dtype=output.dtype)
        if self.diagonal:
            mask[range(b), range(b)] = 1
        else:
            mask[:b, :b] = 1
        return output @ (module.nested_core[self.ranks.index(b)] * mask).T


class Gains(FreeScales):
    diagonal = True


def main() -> None:
    variant = sys.argv[1] if len(sys.argv) > 1 else "core"
    # where nested_probe looks NestedLoRA up
    nested_module.NestedLoRA = {"plain": Plain, "gain": Gains, "core": FreeScales}[variant]
    for k in (2, 4):
        train, val = planted_data(k)
        res = probe.nested_probe(base_factory, train, val, pad_token_id=0, config=PROBE_CONFIG,
                                 max_rank=8, early_stop=False, n_boot=200, progress=False)
        curve = {r: round(c["loss"], 3) for r, c in res.curve.items()}
        print(f"{variant}: planted k={k} -> decision {res.decision}; curve {curve}")


if __name__ == "__main__":
    main()
