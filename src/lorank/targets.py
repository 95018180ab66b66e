"""Targets: which linear layers get an adapter, their shapes, and what each rank costs.

Parameters per rank are `r * (d_in + d_out)` summed over targets (plus any trained head).
The training-memory model is stated in `memory_estimate` and in the README.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
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
    intermediate_size: int = 0  # MLP width (0: unknown, taken as 4 x hidden)
    gated_mlp: bool = False  # SwiGLU-style gate and up projections (Llama, Mistral, SmolLM2)
    # b*a*s^2 tensors kept per attention: 0 (SDPA/flash without dropout), 1 (eager: the
    # softmax), 3 (attention dropout: softmax, mask, dropped; the mask as wide as the values)
    attention_scores: int = 3
    dropout: bool = True  # hidden dropout keeps a mask per dropout layer

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


def layer_kinds(names: list[str]) -> dict[str, str]:
    """Each layer's kind: its path inside the repeated block (after the last block index),
    shortened to the fewest trailing names that still tell kinds apart. Llama's q_proj stays
    "q_proj"; BERT's three "dense" layers become "attention.output.dense", "intermediate.dense"
    and "output.dense" rather than one group."""
    paths = {n: _BLOCK.split(f".{n}")[-1].strip(".") for n in names}
    full = set(paths.values())
    depth = dict.fromkeys(full, 1)
    while True:
        short = {f: ".".join(f.split(".")[-depth[f]:]) for f in full}
        clash = {f for f in full for g in full if f != g and short[f] == short[g]}
        if not clash:
            return {n: short[p] for n, p in paths.items()}
        for f in clash:
            depth[f] += 1


def _is_head(name: str) -> bool:
    last = name.rsplit(".", 1)[-1]
    return last in HEAD_NAMES or name.startswith(HEAD_NAMES) or last == "lm_head"


def resolve_targets(model: torch.nn.Module, spec: str = "all-linear") -> TargetSet:
    """Resolve a preset, comma-separated names (suffixes of module names) or `re:REGEX`.

    Every listed name, and a regex, must match at least one linear module: a misspelt name
    is an error naming it, never silently left out of the targets."""
    linears = linear_modules(model)
    in_blocks = [(n, i, o) for n, i, o in linears if _BLOCK.search(f".{n}.") and not _is_head(n)]
    unmatched: list[str] = []
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
        def hit(name: str, s: str) -> bool:
            return name == s or name.endswith("." + s)

        chosen = [t for t in linears if any(hit(t[0], s) for s in names)]
        unmatched = [s for s in names if not any(hit(n, s) for n, _, _ in chosen)]
    if unmatched or not chosen:
        listing = ", ".join(sorted({n.rsplit(".", 1)[-1] for n, _, _ in in_blocks}))
        what = (f"{', '.join(unmatched)} {'matches' if len(unmatched) == 1 else 'match'}"
                if unmatched else "matches")
        raise LorankError(
            f"--targets {spec}: {what} no linear module; this model's block linear layers are "
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
    targets.intermediate_size = int(getattr(config, "intermediate_size", 0) or 0)
    targets.gated_mlp = any(n.rsplit(".", 1)[-1] in ("gate_proj", "gate_up_proj", "w3")
                            for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    attn_dropout = float(getattr(config, "attention_dropout", 0.0)
                         or getattr(config, "attention_probs_dropout_prob", 0.0) or 0.0)
    kernel = getattr(config, "_attn_implementation", None) or "eager"
    targets.attention_scores = 3 if attn_dropout > 0 else 1 if kernel == "eager" else 0
    targets.dropout = float(getattr(config, "hidden_dropout_prob", 0.0)
                            or getattr(config, "resid_pdrop", 0.0) or 0.0) > 0
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
    - activations kept for backward, per block and token, counted as Korthikanti et al. (2022)
      do (bytes at 2-byte precision per hidden unit, scaled by the activation dtype) but from
      the model's own architecture: attention 10 (+1 dropout mask), its scores `2 a s / h` per
      `b a s^2` tensor kept (`TargetSet.attention_scores`: none for SDPA and flash kernels
      without dropout, which recompute them; the softmax for eager attention; with attention
      dropout also the mask and the dropped scores, measured as float masks on PyTorch's math
      path where Korthikanti count bytes: their `5 a s / h`), norms 4, MLP `2 + 8 i / h` when gated (gate, up, the
      activation and their product, each `i` wide) else `2 + 4 i / h` (+1 mask); plus each
      target's LoRA intermediate `b*s*r`, and for a language-model head the logits, their
      log-softmax and the two gradients alive at the start of backward (`4*b*s*V*4` bytes).
      With gradient checkpointing only each block's input is kept, plus one block's full
      activations.
    Checked against the tensor-level peak (what `torch.cuda.max_memory_allocated` counts) in
    benchmarks/memory_check.py; a process's RSS adds the allocator's and runtime's overhead.
    """
    p = targets.params(rank)
    act_bytes = act_bytes or targets.model_dtype_bytes
    s, b, h = seq_len, batch_size, max(targets.hidden_size, 1)
    a, n_layers = max(targets.num_heads, 1), max(targets.num_layers, 1)
    i = targets.intermediate_size or 4 * h
    mask = 1 if targets.dropout else 0
    attention = 10 + mask + 2 * a * s / h * targets.attention_scores
    mlp = 2 + 8 * i / h if targets.gated_mlp else 2 + 4 * i / h + mask
    per_layer = s * b * h * (attention + 4 + mlp) * act_bytes / 2
    if gradient_checkpointing:
        blocks = n_layers * s * b * h * act_bytes + per_layer
    else:
        blocks = n_layers * per_layer
    lora = sum(b * s * rank * act_bytes for _ in targets.layers)
    logits = 4 * b * s * targets.vocab_size * 4 if targets.vocab_size and not targets.head_params else 0
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


class TensorPeak(TorchDispatchMode):
    """Peak bytes of live tensor storages made by torch ops while active: a CPU stand-in for
    `torch.cuda.max_memory_allocated`, to check `memory_estimate` without a GPU. A storage is
    live while any tensor the ops returned on it (views included) is; storages in `exclude`
    (the weights') are not counted. Used by benchmarks/memory_check.py and the tests."""

    def __init__(self, exclude: set[int] | None = None):
        super().__init__()
        self.exclude = exclude or set()
        self.live: dict[int, list[int]] = {}  # storage pointer -> [bytes, tensors on it]
        self.current = self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.current -= self.live.pop(key)[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if not key or key in self.exclude:
                continue
            if key in self.live:
                self.live[key][1] += 1
            else:
                self.live[key] = [storage.nbytes(), 1]
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
            weakref.finalize(t, self._release, key)
        return out
