"""Trained adapters: how much of its rank a saved PEFT LoRA adapter uses, and an exact
re-factorization of it to a smaller one.

`inspect_adapter` reads `adapter_config.json` and `adapter_model.safetensors` (no model load)
and gives, per layer, the singular values of the scaled update `s B A`, its effective rank and
the energy its top k directions hold. `shrink_adapter` writes a smaller adapter that loads with
`PeftModel.from_pretrained`: per layer the SVD `s B A = U S V^T`, truncated to k, refactored as
`B' = U_k sqrt(S_k) / s'`, `A' = sqrt(S_k) V_k^T` with `s'` the scale of rank k under the same
rule (`alpha / sqrt(k)` with rsLoRA, else `alpha / k`), so `s' B' A'` is the best rank-k
approximation of the original update; at the original rank it reproduces the update to float
precision. With `tol`, each layer keeps the fewest directions whose dropped energy is at most
`tol^2` of its total (relative Frobenius error <= tol), written as a `rank_pattern`.
`truncated_factors` is that math for one layer; `lorank.adapter_loss` applies it in memory
to measure the validation loss of each truncation.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lorank.callback import effective_rank, update_singular_values, update_svd
from lorank.errors import LorankError
from lorank.util import atomic_write_text

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


@dataclass
class AdapterLayer:
    name: str  # module path inside the base model, as rank_pattern keys name it
    rank: int
    scale: float
    singular_values: list[float]  # of scale * B @ A
    effective_rank: float
    energy: dict[int, float]  # top-k directions' share of sum s^2, for k = 1, 2, 4, ... rank

    def rank_for(self, tol: float) -> int:
        """Fewest directions whose dropped energy is at most tol^2 of the total."""
        s2 = torch.tensor(self.singular_values) ** 2
        total = float(s2.sum())
        if total <= 0:
            return 1
        kept = torch.cumsum(s2, 0) / total
        return int(min(int((kept < 1 - tol**2 - 1e-12).sum()) + 1, self.rank))


def read_adapter(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The adapter's config and weights, with one-line errors for what is not a LoRA adapter."""
    path = Path(path)
    if not path.is_dir():
        raise LorankError(f"{path}: no such adapter directory")
    if not (path / CONFIG).exists():
        raise LorankError(f"{path}: no {CONFIG} (not a PEFT adapter directory)")
    try:
        config = json.loads((path / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LorankError(f"{path / CONFIG}: unreadable JSON ({err})") from None
    if config.get("peft_type") != "LORA":
        raise LorankError(f"{path}: peft_type {config.get('peft_type')!r}, expected 'LORA'")
    if not (path / WEIGHTS).exists():
        raise LorankError(f"{path}: no {WEIGHTS} (lorank reads safetensors adapters only)")
    return config, load_file(str(path / WEIGHTS))


def _pattern_value(pattern: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's rule: a pattern key applies to a module whose path ends with it."""
    for key, value in pattern.items():
        if name == key or name.endswith("." + key):
            return value
    return default


def _scale(config: dict[str, Any], name: str, rank: int) -> float:
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"]))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def lora_pairs(weights: dict[str, torch.Tensor]
               ) -> dict[str, tuple[str, torch.Tensor, torch.Tensor]]:
    """module path -> (key stem, A, B) for every LoRA pair of the default adapter."""
    out = {}
    for key, a in weights.items():
        if key.endswith(".lora_A.weight"):
            stem = key[: -len(".lora_A.weight")]
            b = weights.get(stem + ".lora_B.weight")
            if b is not None:
                name = stem[len(PREFIX):] if stem.startswith(PREFIX) else stem
                out[name] = (stem, a, b)
    if not out:
        raise LorankError("no lora_A/lora_B weight pairs in the adapter")
    return out


def inspect_adapter(path: str | Path) -> list[AdapterLayer]:
    """Per layer: singular values of the scaled update, effective rank, top-k energy."""
    config, weights = read_adapter(path)
    layers = []
    for name, (_, a, b) in sorted(lora_pairs(weights).items()):
        rank = int(a.shape[0])
        scale = _scale(config, name, rank)
        s = update_singular_values(a, b) * scale
        s2 = s**2
        total = float(s2.sum()) or 1.0
        ks = [k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256) if k < rank] + [rank]
        layers.append(AdapterLayer(name, rank, scale, s.tolist(), effective_rank(s),
                                   {k: float(s2[:k].sum()) / total for k in ks}))
    return layers


def rank_share(layers: list[AdapterLayer], tol: float = 0.1) -> float:
    """Mean over layers of the share of its rank that keeps its update within `tol`."""
    return sum(lay.rank_for(tol) / lay.rank for lay in layers) / len(layers)


SATURATED_SHARE = 0.9  # at least this share of the rank needed: the energy is spread evenly


def verdict(layers: list[AdapterLayer], tol: float = 0.1) -> str:
    """One sentence: is the adapter saturated, about right, or mostly unused?"""
    share = rank_share(layers, tol)
    if share >= SATURATED_SHARE:
        return (f"saturated: keeping the update within {tol:.0%} needs {share:.0%} of the rank "
                "on average; a higher rank may fit better")
    if share <= 0.25:
        return (f"mostly unused: {share:.0%} of the rank keeps the update within {tol:.0%}; "
                "`lorank shrink --tol` writes the smaller adapter")
    return f"{share:.0%} of the rank keeps the update within {tol:.0%} on average"


@torch.no_grad()
def truncated_factors(a: torch.Tensor, b: torch.Tensor, scale: float, k: int,
                      new_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B', A') with k components such that `new_scale B' A'` is the best rank-k approximation
    of `scale B A` (B' = U_k sqrt(S_k) / new_scale, A' = sqrt(S_k) V_k^T, computed in float64,
    returned in the factors' dtypes)."""
    u, sv, v = update_svd(a, b, torch.float64)
    u, sv, v = u[:, :k], sv[:k] * scale, v[:, :k]
    root = sv.sqrt()
    return (((u * root) / new_scale).to(b.dtype).contiguous(),
            (root[:, None] * v.T).to(a.dtype).contiguous())


def check_shrink(path: str | Path, out: str | Path, *, rank: int | None = None,
                 tol: float | None = None) -> int:
    """The checks `shrink_adapter` makes before it writes anything; returns the adapter's rank."""
    if (rank is None) == (tol is None):
        raise LorankError("shrink needs exactly one of --rank or --tol")
    if rank is not None and rank < 1:
        raise LorankError(f"--rank {rank}: must be at least 1")
    if tol is not None and not 0 < tol < 1:
        raise LorankError(f"--tol {tol}: must be between 0 and 1 (relative Frobenius error)")
    _, weights = read_adapter(path)
    top = max(int(a.shape[0]) for _, a, _ in lora_pairs(weights).values())
    if rank is not None and rank > top:
        raise LorankError(f"--rank {rank}: above the adapter's own rank {top}")
    if Path(out).resolve() == Path(path).resolve():
        raise LorankError(f"--out {out}: is the adapter itself; write the smaller one elsewhere")
    if Path(out).exists() and not Path(out).is_dir():
        raise LorankError(f"--out {out}: is a file; expected a directory (new or existing)")
    return top


def shrink_adapter(path: str | Path, out: str | Path, *, rank: int | None = None,
                   tol: float | None = None) -> dict[str, Any]:
    """Write a smaller adapter to `out` (see the module docstring); return its summary.

    Bad arguments, an adapter that is not LoRA or `out` the adapter itself: one LorankError
    before anything is written; an unwritable `out`: one LorankError too."""
    check_shrink(path, out, rank=rank, tol=tol)
    config, weights = read_adapter(path)
    layers = {lay.name: lay for lay in inspect_adapter(path)}
    factors = lora_pairs(weights)
    new_ranks = {name: min(rank, lay.rank) if rank is not None else lay.rank_for(tol)
                 for name, lay in layers.items()}
    global_rank = rank if rank is not None else max(new_ranks.values())
    new_weights = dict(weights)
    errors = {}
    for name, (stem, a, b) in factors.items():
        k = new_ranks[name]
        new_b, new_a = truncated_factors(a, b, layers[name].scale, k, _scale(config, name, k))
        new_weights[stem + ".lora_B.weight"], new_weights[stem + ".lora_A.weight"] = new_b, new_a
        full = torch.tensor(layers[name].singular_values, dtype=torch.float64)
        errors[name] = float((full[k:] ** 2).sum().sqrt() / max(float(full.norm()), 1e-30))
    pattern = {name: k for name, k in new_ranks.items() if k != global_rank}
    new_config = dict(config, r=global_rank, rank_pattern=pattern)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{WEIGHTS}.tmp"
        save_file(new_weights, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out / WEIGHTS)  # atomic: a reader never sees half a file
        atomic_write_text(out / CONFIG, json.dumps(new_config, indent=2) + "\n")
    except OSError as err:
        raise LorankError(f"--out {out}: cannot write ({err.strerror or err})") from None
    before = sum(lay.rank * (factors[n][1].shape[1] + factors[n][2].shape[0])
                 for n, lay in layers.items())
    after = sum(new_ranks[n] * (factors[n][1].shape[1] + factors[n][2].shape[0])
                for n in layers)
    return {"rank": global_rank, "rank_pattern": pattern, "params_before": before,
            "params_after": after, "max_relative_error": max(errors.values()),
            "layers": {n: {"rank": new_ranks[n], "relative_error": errors[n]} for n in layers}}


def layers_table(layers: list[AdapterLayer]) -> list[dict[str, Any]]:
    return [asdict(lay) | {"energy": {str(k): v for k, v in lay.energy.items()}}
            for lay in layers]
