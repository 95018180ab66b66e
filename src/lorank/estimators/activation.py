"""Activation spectrum: where rank is best spent across layers at a fixed budget (as EVA does).

LoRA's A matrix reads the layer input x, so an adapter can only use directions the inputs
visit. For each target layer the eigen-spectrum of the input Gram matrix C = sum_t x_t x_t^T
over real (non-padding) tokens says how many directions carry the inputs: a layer whose inputs
live in few directions gets less of a fixed budget than one whose inputs spread. It says
nothing about how much rank in total (how widely inputs spread is not what the task asks for),
hence suggested_rank is None and the finding is a relative allocation.

Streaming: C is accumulated exactly for d_in <= exact_max_dim (d_in^2 floats per distinct
input; q/k/v reading the same tensor share one accumulator); above that a Nystrom sketch
Y = C Omega (d_in x k) is accumulated instead and C's top eigenvalues recovered from it
(Tropp, Yurtsever, Udell and Cevher 2017, "Fixed-rank approximation of a positive-semidefinite
matrix from streaming data"). The trace, sum_t ||x_t||^2, is always exact.

The gradient spectrum reuses this machinery (Gram, input_layer) inside its own passes, whose
hooks already see every target layer's input: there the input spectrum costs no extra pass.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from lorank.data import collate
from lorank.estimators.base import Evidence
from lorank.util import ticker

# eigenvalues of the Nystrom core below this fraction of its largest are rounding, not signal
NYSTROM_CORE_TOL = 1e-6


@dataclass
class ActivationLayer:
    """One target layer's input spectrum."""

    name: str
    d_in: int
    d_out: int
    method: str  # "exact" or "sketch"
    n_tokens: int
    trace: float  # sum_t ||x_t||^2 (exact)
    eigenvalues: list[float]  # top eigenvalues of C (all of them when exact, up to 512 kept)
    energy_ranks: dict[str, int]  # "0.9" -> smallest r explaining that fraction of the trace
    energy_capped: bool  # a sketch too narrow to reach the largest energy level
    participation_ratio: float  # (sum lambda)^2 / sum lambda^2: an effective dimension
    shares_input_with: str | None = None  # another target reading the very same tensor

    def explained_ratios(self) -> np.ndarray:
        return np.asarray(self.eigenvalues, dtype=np.float64) / max(self.trace, 1e-300)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class ActivationSpectrum:
    layers: list[ActivationLayer]
    energy: tuple[float, ...]
    n_examples: int
    settings: dict[str, Any] = field(default_factory=dict)
    cost_seconds: float = 0.0

    def allocate(self, budget_rank: int, max_rank: int | None = None) -> dict[str, int]:
        """EVA's redistribution: a budget of budget_rank * n_layers components goes to the
        components with the largest explained-variance ratio over all layers, each layer at
        least 1 and at most min(d_in, d_out, max_rank). Why ratios and not raw eigenvalues:
        layers differ in input scale (residual stream vs MLP hidden), which says nothing about
        how useful a direction is."""
        if budget_rank < 1:
            raise ValueError(f"budget_rank must be >= 1, got {budget_rank}")
        caps = {
            layer.name: min(layer.d_in, layer.d_out, max_rank or layer.d_in)
            for layer in self.layers
        }
        alloc = dict.fromkeys(caps, 1)
        total = budget_rank * len(self.layers)
        pool = [
            (float(ratio), layer.name)
            for layer in self.layers
            for ratio in layer.explained_ratios()[1:]  # the first component is the floor of 1
        ]
        pool.sort(key=lambda item: -item[0])
        spent = len(self.layers)
        for _, name in pool:
            if spent >= total:
                break
            if alloc[name] < caps[name]:
                alloc[name] += 1
                spent += 1
        return alloc

    def layer_table(self) -> list[dict[str, Any]]:
        return [
            {
                "layer": layer.name,
                "d_in": layer.d_in,
                "method": layer.method,
                "tokens": layer.n_tokens,
                **{f"energy{float(p) * 100:g}": r for p, r in layer.energy_ranks.items()},
                "participation_ratio": round(layer.participation_ratio, 2),
                "top_ratio": round(float(layer.explained_ratios()[0]), 4),
            }
            for layer in self.layers
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "energy": list(self.energy),
            "n_examples": self.n_examples,
            "settings": dict(self.settings),
            "cost_seconds": self.cost_seconds,
            "layers": [layer.to_dict() for layer in self.layers],
        }

    def to_evidence(self, budget_rank: int = 16, max_rank: int | None = None) -> Evidence:
        """Evidence with no total rank: the allocation of `budget_rank` per layer on average
        goes into rank_pattern; per-layer numbers into details."""
        pattern = self.allocate(budget_rank, max_rank)
        per_rank = {}
        r = 1
        while r <= max(budget_rank, 1) * 4:
            a = self.allocate(r, max_rank)
            per_rank[r] = (
                f"budget {r}/layer -> per-layer ranks {min(a.values())}..{max(a.values())}"
            )
            r *= 2
        notes = []
        if any(layer.energy_capped for layer in self.layers):
            notes.append(
                "some sketched layers did not reach the top energy level: ranks are floors"
            )
        return Evidence(
            name="activation_spectrum",
            kind="estimate",
            suggested_rank=None,
            interval=None,
            per_rank=per_rank,
            rank_pattern=pattern,
            assumptions=[
                "rank is worth most where layer inputs spread over many directions (EVA)",
                "says where to spend a budget across layers, not how large the budget is",
                "uncentred input Gram matrix over non-padding tokens",
            ],
            notes=notes,
            details={
                **self.to_dict(),
                "budget_rank": budget_rank,
                "layer_table": self.layer_table(),
            },
            cost_seconds=self.cost_seconds,
        )


def activation_spectrum(
    model: nn.Module,
    examples: list[dict],
    target_names: list[str],
    *,
    pad_token_id: int,
    batch_size: int = 8,
    energy: tuple[float, ...] = (0.9, 0.95),
    exact_max_dim: int = 4096,
    sketch_rank: int = 256,
    seed: int = 0,
    progress: bool = True,
) -> ActivationSpectrum:
    """Eigen-spectrum of each target layer's input Gram matrix over the examples' real tokens."""
    start = time.perf_counter()
    if not target_names:
        raise ValueError("target_names is empty: give at least one nn.Linear module name")
    if not examples:
        raise ValueError("no examples")
    if any(not 0.0 < p <= 1.0 for p in energy):
        raise ValueError(f"energy levels must lie in (0, 1], got {energy}")
    modules = dict(model.named_modules())
    for name in target_names:
        if not isinstance(modules.get(name), nn.Linear):
            raise ValueError(
                f"unknown target {name!r}: no nn.Linear module of that name in the model"
            )
    device = next(model.parameters()).device
    grams = {
        name: Gram(modules[name].in_features, exact_max_dim, sketch_rank, seed + i, device)
        for i, name in enumerate(target_names)
    }
    owner: dict[str, str] = {}  # target -> target whose accumulator it shares
    first_batch: dict[str, torch.Tensor] = {}
    current: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            x = inputs[0]  # the very object (not a detached copy): its identity is the key
            if not owner:  # first batch: keep inputs alive so tensor identity is meaningful
                first_batch[name] = x
            elif owner[name] != name:
                return
            grams[name].add(real_tokens(x, current["mask"]))

        return hook

    was_training = model.training
    model.eval()
    handles = [modules[name].register_forward_hook(hook_for(name)) for name in target_names]
    batches = [examples[b : b + batch_size] for b in range(0, len(examples), batch_size)]
    try:
        with torch.no_grad(), ticker("activation spectrum", len(batches), progress) as advance:
            for i, chunk in enumerate(batches):
                batch = {k: v.to(device) for k, v in collate(chunk, pad_token_id).items()}
                current["mask"] = batch["attention_mask"]
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                if i == 0:
                    share_inputs(target_names, first_batch, owner, grams)
                    first_batch.clear()
                advance()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    layers = [
        input_layer(name, modules[name], grams[owner[name]], energy,
                    None if owner[name] == name else owner[name])
        for name in target_names
    ]
    return ActivationSpectrum(
        layers=layers,
        energy=tuple(energy),
        n_examples=len(examples),
        settings={
            "batch_size": batch_size,
            "exact_max_dim": exact_max_dim,
            "sketch_rank": sketch_rank,
            "seed": seed,
        },
        cost_seconds=time.perf_counter() - start,
    )


def input_layer(
    name: str,
    module: nn.Linear,
    gram: Gram,
    energy: tuple[float, ...],
    shares_input_with: str | None = None,
) -> ActivationLayer:
    """One layer's input spectrum from its accumulated Gram matrix: energy ranks (the fewest
    eigen-directions holding each fraction p of the trace), participation ratio, top eigenvalues.
    Shared by this module's own pass and the gradient spectrum's, which reads x in its hooks."""
    eig = gram.eigenvalues()
    trace = max(gram.trace, 1e-300)
    ranks, capped = {}, False
    for p in energy:
        hit = np.nonzero(np.cumsum(eig) / trace >= p - 1e-12)[0]
        ranks[str(p)] = int(hit[0] + 1) if len(hit) else len(eig)
        capped |= not len(hit)
    return ActivationLayer(
        name=name,
        d_in=module.in_features,
        d_out=module.out_features,
        method="exact" if gram.exact else "sketch",
        n_tokens=gram.n_tokens,
        trace=float(gram.trace),
        eigenvalues=[float(v) for v in eig[:512]],
        energy_ranks=ranks,
        energy_capped=capped,
        participation_ratio=float(gram.trace**2 / max(float((eig**2).sum()), 1e-300)),
        shares_input_with=shares_input_with,
    )


def real_tokens(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rows of x at non-padding positions (all rows when x is not per-token)."""
    if x.dim() == 3 and x.shape[:2] == mask.shape:
        return x[mask.bool()]
    return x.reshape(-1, x.shape[-1])


def _input_key(x: torch.Tensor) -> tuple:
    """Identifies the tensor a layer reads by its memory (storage, offset, shape, strides), so
    that detached views of one tensor (as output-gradient hooks hand over) match too. Valid
    only while the tensors compared are alive: keep them referenced until compared."""
    return (x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape), x.stride())


def share_inputs(
    names: list[str],
    first: dict[str, torch.Tensor],
    owner: dict[str, str],
    grams: dict[str, Gram],
) -> None:
    """Targets that read the very same tensor (q, k, v) share the first one's accumulator;
    the others' first-batch contributions are dropped (they duplicate the owner's)."""
    seen: dict[tuple, str] = {}
    for name in names:
        x = first.get(name)
        key = _input_key(x) if x is not None else None
        if key is not None and key in seen:
            owner[name] = seen[key]
            grams[name] = grams[seen[key]]
        else:
            owner[name] = name
            if key is not None:
                seen[key] = name


class Gram:
    """Streaming C = sum_t x_t x_t^T: exact, or a Nystrom sketch C Omega for wide inputs."""

    def __init__(
        self, d: int, exact_max_dim: int, sketch_rank: int, seed: int, device: torch.device
    ):
        self.d, self.exact = d, d <= exact_max_dim
        self.trace, self.n_tokens = 0.0, 0
        self._eig: np.ndarray | None = None
        self._batch: torch.Tensor | None = None  # an exact Gram's per-batch product
        if self.exact:
            self.c = torch.zeros(d, d, dtype=torch.float64, device=device)
        else:
            self.k = min(sketch_rank, d)
            gen = torch.Generator().manual_seed(seed)
            self.omega = torch.randn(d, self.k, generator=gen, dtype=torch.float64).to(device)
            self.omega, _ = torch.linalg.qr(self.omega)
            self.omega32 = self.omega.float()  # for `add`, cast once rather than every batch
            self.y = torch.zeros(d, self.k, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        """One batch's rows: products in float32 (float64 matmuls are ~2x slower and this runs
        inside the gradient spectrum's passes too), summed across batches in float64."""
        x = x.float()
        self._eig = None
        self.n_tokens += x.shape[0]
        if self.exact:
            if self._batch is None:
                self._batch = torch.empty(self.d, self.d, dtype=x.dtype, device=x.device)
            c = torch.mm(x.T, x, out=self._batch)  # one buffer for every batch
            self.c += c  # summed in float64
            self.trace += float(c.diagonal().sum(dtype=torch.float64))  # sum of squares, off C
        else:
            self.trace += float((x**2).sum(dtype=torch.float64))
            self.y += (x.T @ (x @ self.omega32)).double()

    def eigenvalues(self) -> np.ndarray:
        """Eigenvalues of C, largest first (the sketch gives the top k). Computed once: layers
        that read one input (q, k and v) share one Gram and ask for them each."""
        if self._eig is None:
            self._eig = self._eigenvalues()
        return self._eig

    def _eigenvalues(self) -> np.ndarray:
        if self.exact:
            return torch.linalg.eigvalsh(self.c).flip(0).clamp_min(0).cpu().numpy()
        # stabilised Nystrom (Tropp et al. 2017, Algorithm 3)
        norm = float(torch.linalg.norm(self.y))
        if norm == 0.0:  # no tokens, or inputs that are all zero
            return np.zeros(self.k)
        nu = math.sqrt(self.d) * torch.finfo(torch.float64).eps * norm
        y = self.y + nu * self.omega
        b = self.omega.T @ y
        chol, info = torch.linalg.cholesky_ex((b + b.T) / 2)
        if int(info) != 0:
            return self._pinv_eigenvalues()
        e = torch.linalg.solve_triangular(chol, y.T, upper=False).T  # y @ chol^-T
        s = torch.linalg.svdvals(e)
        return (s**2 - nu).clamp_min(0).cpu().numpy()

    def _pinv_eigenvalues(self) -> np.ndarray:
        """Nystrom through the core's pseudo-inverse, for when C has lower rank than the sketch
        (fewer tokens than columns): the core Omega^T C Omega is then singular, and the float32
        products of `add` leave it indefinite at about float32's epsilon, beyond what the
        float64 shift covers. Dropping the core's rounding-level directions recovers C's
        eigenvalues to about 1e-7 there (C Omega spans all of C's range)."""
        b = self.omega.T @ self.y
        lam, v = torch.linalg.eigh((b + b.T) / 2)
        keep = lam > NYSTROM_CORE_TOL * lam[-1]
        s = torch.linalg.svdvals(self.y @ (v[:, keep] / lam[keep].sqrt())) ** 2
        out = np.zeros(self.k)
        out[: len(s)] = s.cpu().numpy()
        return out
