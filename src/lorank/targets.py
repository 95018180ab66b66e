"""Targets: which linear layers get an adapter, their shapes, and what each rank costs.

Parameters per rank are `r * (d_in + d_out)` summed over targets (plus any trained head).
The training-memory model is stated in `memory_estimate` and in the README.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers.pytorch_utils import Conv1D

from lorank.errors import LorankError

CANDIDATE_RANKS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PRESETS = ("all-linear", "attention", "mlp")
HEAD_NAMES = ("classifier", "score")
_BLOCK = re.compile(r"\.(\d+)\.")  # a numbered child: inside the repeated transformer blocks


@dataclass
class TargetLayer:
    name: str
    d_in: int
    d_out: int
    group: str  # "attention" or "mlp"

    def params(self, rank: int) -> int:
        return rank * (self.d_in + self.d_out)


@dataclass
class TargetSet:
    """The resolved target modules plus the trained head (classification) and model totals."""

    spec: str
    layers: list[TargetLayer]
    peft_target_modules: list[str]
    modules_to_save: list[str] = field(default_factory=list)
    head_params: int = 0
    model_params: int = 0
    model_dtype_bytes: int = 4
    hidden_size: int = 0
    num_layers: int = 0
    vocab_size: int = 0
    num_heads: int = 0

    @property
    def max_rank(self) -> int:
        return min(min(t.d_in, t.d_out) for t in self.layers)

    def params(self, rank: int) -> int:
        """Trainable parameters at a global rank (adapter plus trained head)."""
        return sum(t.params(rank) for t in self.layers) + self.head_params

    def params_pattern(self, rank: int, pattern: dict[str, int]) -> int:
        """Trainable parameters when `pattern` (full module name -> rank) overrides some layers."""
        return sum(t.params(pattern.get(t.name, rank)) for t in self.layers) + self.head_params

    def check_rank(self, rank: int) -> None:
        for t in self.layers:
            if rank > min(t.d_in, t.d_out):
                raise LorankError(
                    f"rank {rank} exceeds min(d_in, d_out) = {min(t.d_in, t.d_out)} of target "
                    f"{t.name} ({t.d_in}x{t.d_out})"
                )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def linear_modules(model: torch.nn.Module) -> list[tuple[str, int, int]]:
    """All linear layers (nn.Linear and GPT-2 style Conv1D) as (name, d_in, d_out)."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            out.append((name, module.in_features, module.out_features))
        elif isinstance(module, Conv1D):
            d_in, d_out = module.weight.shape
            out.append((name, d_in, d_out))
    return out


def _group(name: str) -> str:
    return "attention" if re.search(r"attn|attention", name) else "mlp"


def _is_head(name: str) -> bool:
    last = name.rsplit(".", 1)[-1]
    return last in HEAD_NAMES or name.startswith(HEAD_NAMES) or last == "lm_head"


def resolve_targets(model: torch.nn.Module, spec: str = "all-linear") -> TargetSet:
    """Resolve a preset, comma-separated names (suffixes of module names) or `re:REGEX`."""
    linears = linear_modules(model)
    in_blocks = [(n, i, o) for n, i, o in linears if _BLOCK.search(f".{n}.") and not _is_head(n)]
    if spec == "all-linear":
        chosen = in_blocks
    elif spec in ("attention", "mlp"):
        chosen = [t for t in in_blocks if _group(t[0]) == spec]
    elif spec.startswith("re:"):
        try:
            pattern = re.compile(spec[3:])
        except re.error as err:
            raise LorankError(f"--targets {spec}: invalid regex ({err})") from None
        chosen = [t for t in linears if pattern.fullmatch(t[0])]
    else:
        names = [s.strip() for s in spec.split(",") if s.strip()]
        chosen = [t for t in linears if any(t[0] == s or t[0].endswith("." + s) for s in names)]
    if not chosen:
        listing = ", ".join(sorted({n.rsplit(".", 1)[-1] for n, _, _ in in_blocks}))
        raise LorankError(
            f"--targets {spec}: matches no linear module; this model's block linear layers are "
            f"named {listing} (presets: {', '.join(PRESETS)}; regex: re:PATTERN)"
        )
    layers = [TargetLayer(n, i, o, _group(n)) for n, i, o in chosen]
    targets = TargetSet(spec, layers, peft_names([n for n, _, _ in chosen], linears))
    _fill_model_facts(model, targets)
    return targets


def peft_names(chosen: list[str], linears: list[tuple[str, int, int]]) -> list[str]:
    """Shortest PEFT `target_modules` list: last names when they select exactly `chosen`."""
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in chosen})
    matched = {n for n, _, _ in linears if n.rsplit(".", 1)[-1] in suffixes}
    return suffixes if matched == set(chosen) else sorted(chosen)


def _fill_model_facts(model: torch.nn.Module, targets: TargetSet) -> None:
    config = getattr(model, "config", None)
    targets.model_params = sum(p.numel() for p in model.parameters())
    first = next(model.parameters())
    targets.model_dtype_bytes = first.element_size()
    targets.hidden_size = int(getattr(config, "hidden_size", 0) or 0)
    targets.num_layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    targets.vocab_size = int(getattr(config, "vocab_size", 0) or 0)
    targets.num_heads = int(getattr(config, "num_attention_heads", 0) or 0)
    for name, module in model.named_children():
        if name in HEAD_NAMES:
            targets.modules_to_save.append(name)
            targets.head_params += sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------
# cost model


@dataclass
class MemoryEstimate:
    """Training memory in bytes, by part. See `memory_estimate` for the model behind it."""

    frozen_weights: int
    adapter_weights: int
    gradients: int
    optimizer_states: int
    activations: int

    @property
    def total(self) -> int:
        return (self.frozen_weights + self.adapter_weights + self.gradients
                + self.optimizer_states + self.activations)

    def to_dict(self) -> dict[str, int]:
        return asdict(self) | {"total": self.total}


def memory_estimate(targets: TargetSet, rank: int, *, batch_size: int = 8, seq_len: int = 512,
                    act_bytes: int | None = None, gradient_checkpointing: bool = False
                    ) -> MemoryEstimate:
    """Training-memory estimate for LoRA at `rank`.

    - frozen weights: every model parameter in the model's dtype;
    - adapter weights, their gradients and AdamW's two moments: fp32 (PEFT keeps adapters in
      fp32), 4 + 4 + 8 bytes per trainable parameter;
    - activations (per Korthikanti et al. 2022, per layer `s*b*h*(34 + 5*a*s/h)` bytes at 2-byte
      precision, scaled by the activation dtype), plus each target's LoRA intermediate `b*s*r`
      and the logits with their gradient (`2*b*s*V*4` bytes). With gradient checkpointing only
      each block's input is kept, plus one block's full activations.
    An estimate for sizing, not a measurement; the allocator and kernels add overhead.
    """
    p = targets.params(rank)
    act_bytes = act_bytes or targets.model_dtype_bytes
    s, b, h = seq_len, batch_size, max(targets.hidden_size, 1)
    a, n_layers = max(targets.num_heads, 1), max(targets.num_layers, 1)
    per_layer = s * b * h * (34 + 5 * a * s / h) * act_bytes / 2
    if gradient_checkpointing:
        blocks = n_layers * s * b * h * act_bytes + per_layer
    else:
        blocks = n_layers * per_layer
    lora = sum(b * s * rank * act_bytes for _ in targets.layers)
    logits = 2 * b * s * targets.vocab_size * 4 if targets.vocab_size and not targets.head_params else 0
    return MemoryEstimate(
        frozen_weights=targets.model_params * targets.model_dtype_bytes,
        adapter_weights=4 * p,
        gradients=4 * p,
        optimizer_states=8 * p,
        activations=int(blocks + lora + logits),
    )


def adapter_bytes(targets: TargetSet, rank: int) -> int:
    """Size of the saved adapter (fp32 safetensors, headers ignored)."""
    return 4 * targets.params(rank)
