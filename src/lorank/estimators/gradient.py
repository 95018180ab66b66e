"""Gradient spectrum: how many directions per layer the data asks for, read without training.

For a target linear layer y = W x the full-weight gradient of the summed loss over a set of
tokens is G = sum_t d_t x_t^T (d_t = dL/dy_t). The calibration examples are split into disjoint
halves A and B. Directions the data really asks for appear in both halves; noise does not. For
the top singular pairs (u_i, v_i) of G_A the cross-fitted strength s_i = u_i^T G_B v_i is centred
on zero for noise directions and positive for signal (and symmetrically B -> A).

Noise spread, from an independent source (DESIGN.md point 3): s_i is a sum over the examples of
B, s_i = sum_g c_gi with c_gi = sum_{t in group g} (u_i^T d_t)(x_t^T v_i). Under "no signal in
direction i" the c_gi are independent and centred, so flipping their signs at random leaves the
distribution of s_i unchanged. The signal rank counts directions whose self-normalised strength
T_i = sum_g c_gi / sqrt(sum_g c_gi^2) exceeds the (1 - alpha) quantile of max_i T_i over random
sign flips (a max-statistic: family-wise error alpha over the directions tested, per layer).
Symmetrised: the layer's rank is floor((count A -> B + count B -> A) / 2), so a direction found
only one way does not count; the two counts are the range reported around it.

Streaming, three passes (1.5x one forward+backward over the calibration set):
  1. half A: accumulate G_A per chunk (exact if the layer is small, else the randomized
     sketches G Omega and Psi G) -> top pairs of G_A at each data fraction;
  2. half B: accumulate G_B per chunk, and per group of examples the projections c_gi onto A's
     pairs -> top pairs of G_B;
  3. half A again: projections onto B's pairs.
Why this order and not "sketch everything, then one more full pass": the projections need the
other half's pairs first, and reading B only after A is summarised gets A -> B for free, so
only half the data is read twice. The projections are exact for sketched layers too (they use
d_t and x_t, not the sketch), so the test stays valid however rough the sketch is.
Pass 3 needs only A's (x_t, d_t) again, not a new forward and backward: when they fit in
`replay_mb` (small models and calibration sets: MiniLM-L6 at 256 examples ~0.35 GB, SmolLM2
at 64 ~2.1 GB), pass 1 keeps them (`_Tape`) and pass 3 replays them (the same tensors in the
same order, so the same numbers), which leaves one forward+backward over the calibration set
instead of 1.5. Large models run pass 3 as a pass, holding O(k (d_in + d_out)) per layer.
A classifier's new head is fitted on frozen features first (`fit_head`): from passes 1-2's own
forward, their graphs held until the fit (`_Streaming.hold_and_fit_head`), when they fit in
`replay_mb` too; else from a forward without gradients, as `fit_head_on_frozen_features` does.

Chunks: each half is cut into chunks at the data fractions (n/4, n/2, n by default). Sketches
and exact G are linear in the data, so the sums of the first chunks are the summaries at each
fraction; the signal rank at each fraction gives a growth curve, extrapolated to the training
set size with a power law.

Alongside the replication count, per layer: the Gavish-Donoho hard threshold (noise level from
the halves' difference G_A - G_B, pure noise in expectation), energy ranks at 90% / 95% and the
stable rank ||G||_F^2 / ||G||_2^2, and the replicated-energy ranks at 90% / 95%: among the
replicated directions, the fewest that hold that share of the cross-fitted signal energy
max(s_AB,i, 0) * max(s_BA,i, 0) (the product of the two halves' independent estimates, whose
noise has mean zero). The replication count answers "how many directions are real"; with
enough data nearly every direction is, however weak, so it grows with n toward max_rank. The
replicated energy answers "how many carry the signal". Which rule tracks the sweep's r* is the
benchmark's question.

Also per layer, from the same passes: the spectrum of each half (G_A and G_B's top singular
values); with `sketch_check`, for sketched layers, principal angles between the sketch's top
subspaces and an independent replica sketch's (`_Tap._sketch_check`), the sketch's measured
accuracy where exact SVD is out of reach; and the input spectrum (`lorank.estimators.activation`): how many input
directions hold 90% / 95% of the inputs' energy, second evidence for where rank goes across
layers, read by the same hooks on the examples' real tokens (passes 1 and 2, each example once).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lorank.data import collate
from lorank.estimators.activation import (
    ActivationLayer,
    Gram,
    input_layer,
    real_tokens,
    share_inputs,
)
from lorank.estimators.base import Evidence
from lorank.hooks import OutputGradientTaps
from lorank.report import ticker

# Exact layers at least 4x wider than max_rank + TOP_OVERSAMPLE find the directions they hand to
# the other half with a randomized range finder (TOP_NITER power iterations), not a full SVD.
TOP_OVERSAMPLE, TOP_NITER = 16, 2
INPUT_ENERGY = (0.9, 0.95)  # input-spectrum energy levels reported per layer
REPLAY_MB = 2048.0  # default memory kept to save work (`gradient_spectrum`'s replay_mb)
HEAD_STEPS, HEAD_LR = 200, 1e-2  # Adam on a classifier's new head, on frozen features
RULES = ("replication", "gavish_donoho", "energy90", "energy95", "stable",
         "replicated_energy90", "replicated_energy95")
REPLICATION_RULES = ("replication", "replicated_energy90", "replicated_energy95")  # sign flips


# ---------------------------------------------------------------------------------------------
# results


@dataclass
class LayerSpectrum:
    """What one target layer showed. Lists indexed by data fraction unless named otherwise."""

    name: str
    d_out: int
    d_in: int
    method: str  # "exact" or "sketch"
    n_examples: list[int]  # examples read (both halves) at each fraction
    ranks: dict[str, list[float]]  # rule -> rank at each fraction
    replication_ab: list[int]  # signal count with A's directions tested on B, per fraction
    replication_ba: list[int]
    t_ab: list[float]  # cross-fitted t statistics of A's top directions on B, full data
    t_ba: list[float]
    strength_ab: list[float]  # s_i = u_i^T G_B v_i, full data
    strength_ba: list[float]
    threshold_ab: float  # max-statistic threshold, in t units, full data
    threshold_ba: float
    singular_values: list[float]  # top singular values of G = G_A + G_B, full data
    singular_values_a: list[float]  # top singular values of G_A alone, full data
    singular_values_b: list[float]  # top singular values of G_B alone, full data
    total_energy: float  # ||G||_F^2, full data
    noise_sigma: float  # per-entry noise sd of G from the halves' difference
    gd_threshold: float
    energy_capped: bool  # energy rank hit max_rank (the spectrum is flatter than max_rank)
    sketch_check: dict[str, Any] | None  # sketched layers: angles to an independent replica
    inputs: ActivationLayer | None  # spectrum of the layer's inputs over the same tokens
    u: np.ndarray | None = field(default=None, repr=False)  # top left singular vectors of G
    v: np.ndarray | None = field(default=None, repr=False)  # top right singular vectors of G

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k not in ("u", "v")}
        d["ranks"] = {k: list(v) for k, v in self.ranks.items()}
        if self.inputs is not None:  # top eigenvalues only: hundreds of layers share the JSON
            d["inputs"] = {**self.inputs.to_dict(), "eigenvalues": self.inputs.eigenvalues[:64]}
        return d

    def input_rank(self, p: float) -> int | None:
        """Input directions holding a fraction p (0.9 or 0.95) of the inputs' energy."""
        return None if self.inputs is None else self.inputs.energy_ranks.get(str(p))

    def sketch_angle(self) -> float | None:
        """Largest principal angle (degrees) between the sketch and its replica, or None."""
        return None if self.sketch_check is None else self.sketch_check["max_deg"]


@dataclass
class GradientSpectrum:
    """All layers' spectra plus the rules that turn them into ranks."""

    layers: list[LayerSpectrum]
    fractions: tuple[float, ...]
    n_examples: int  # calibration examples read (an odd one out is dropped)
    n_train: int  # size of the training set the rank is extrapolated to
    max_rank: int
    rule: str = "replication"
    global_quantile: float = 0.9
    alpha: float = 0.05
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    cost_seconds: float = 0.0
    groups: list[int] = field(default_factory=list)  # sign-flip groups per half, per fraction

    def layer_fit(self, layer: LayerSpectrum, rule: str | None = None) -> dict[str, Any]:
        """Growth fit of one layer's rank under `rule`, extrapolated to n_train."""
        rule = _check_rule(rule or self.rule)
        spread = None
        if rule == "replication":
            ab, ba = layer.replication_ab[-1], layer.replication_ba[-1]
            spread = (float(min(ab, ba)), float(max(ab, ba)))
        return rule_growth(layer.n_examples, layer.ranks[rule], rule, self.n_train,
                           self.max_rank, groups=self.groups, alpha=self.alpha, spread=spread)

    def rank_pattern(self, rule: str | None = None) -> dict[str, int]:
        """Per-layer rank for PEFT's LoraConfig(rank_pattern=...): full module names, which
        PEFT matches as a suffix of the (possibly wrapped) module name. Clipped to [1, max_rank]."""
        pattern = {}
        for layer in self.layers:
            r = self.layer_fit(layer, rule)["rank"]
            pattern[layer.name] = int(min(self.max_rank, max(1, math.ceil(r - 1e-9))))
        return pattern

    def global_rank(self, rule: str | None = None) -> tuple[int, tuple[int, int]]:
        """One rank for all layers: the `global_quantile` quantile of the per-layer extrapolated
        ranks, rounded up to a power of two. Why a high quantile and not the mean: a rank too
        small for the layers that need the most costs quality, one too large only parameters."""
        fits = [self.layer_fit(layer, rule) for layer in self.layers]
        point = _global([f["rank"] for f in fits], self.global_quantile, self.max_rank)
        lo = _global([f["interval"][0] for f in fits], self.global_quantile, self.max_rank)
        hi = _global([f["interval"][1] for f in fits], self.global_quantile, self.max_rank)
        return point, (min(lo, point), max(hi, point))

    def global_curve(self, rule: str | None = None) -> list[float]:
        """The global quantile of per-layer ranks at each data fraction (the growth at a glance)."""
        rule = _check_rule(rule or self.rule)
        per_frac = np.array([layer.ranks[rule] for layer in self.layers])  # (layers, fractions)
        return [
            float(np.quantile(col, self.global_quantile, method="higher")) for col in per_frac.T
        ]

    def layer_table(self, rule: str | None = None) -> list[dict[str, Any]]:
        """One row per layer: shape, method, rank under every rule, the growth fit."""
        rows = []
        tested = sign_flip_testable(self.groups, self.alpha, len(self.fractions))
        for layer in self.layers:
            fit = self.layer_fit(layer, rule)
            rows.append(
                {
                    "layer": layer.name,
                    "shape": f"{layer.d_out}x{layer.d_in}",
                    "method": layer.method,
                    "replication_by_fraction": [  # None: too few groups to test there
                        int(r) if ok else None
                        for r, ok in zip(layer.ranks["replication"], tested, strict=True)],
                    "replication": int(layer.ranks["replication"][-1]),
                    "gavish_donoho": int(layer.ranks["gavish_donoho"][-1]),
                    "energy90": int(layer.ranks["energy90"][-1]),
                    "energy95": int(layer.ranks["energy95"][-1]),
                    "replicated_energy90": int(layer.ranks["replicated_energy90"][-1]),
                    "stable": round(layer.ranks["stable"][-1], 2),
                    "extrapolated": round(fit["rank"], 2),
                    "interval": [round(fit["interval"][0], 2), round(fit["interval"][1], 2)],
                    "exponent": round(fit["exponent"], 3),
                    "top_t": round(max(layer.t_ab[:1] + layer.t_ba[:1], default=0.0), 2),
                    "inputs90": layer.input_rank(0.9),
                    "inputs95": layer.input_rank(0.95),
                    "sketch_angle": _round(layer.sketch_angle(), 1),
                }
            )
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "fractions": list(self.fractions),
            "n_examples": self.n_examples,
            "n_train": self.n_train,
            "max_rank": self.max_rank,
            "rule": self.rule,
            "global_quantile": self.global_quantile,
            "alpha": self.alpha,
            "settings": dict(self.settings),
            "notes": list(self.notes),
            "cost_seconds": self.cost_seconds,
            "groups": list(self.groups),
            "layers": [layer.to_dict() for layer in self.layers],
        }

    def to_evidence(self, rule: str | None = None) -> Evidence:
        rule = _check_rule(rule or self.rule)
        rank, interval = self.global_rank(rule)
        fits = {layer.name: self.layer_fit(layer, rule) for layer in self.layers}
        extrapolated = np.array([f["rank"] for f in fits.values()])
        per_rank = {}
        r = 1
        while r <= self.max_rank:
            covered = int((extrapolated <= r + 1e-9).sum())
            per_rank[r] = (
                f"{covered}/{len(self.layers)} layers' {rule} rank ≤ r"
            )
            r *= 2
        notes = list(self.notes)
        capped = [n for n, f in fits.items() if f["rank"] >= self.max_rank - 1e-9]
        if capped:
            notes.append(
                f"{len(capped)} layer(s) reach max_rank={self.max_rank} (e.g. {capped[0]}): "
                "the true rank may be higher, rerun with a larger max_rank"
            )
        if not extrapolated.any():
            notes.append(
                "no layer shows a replicated direction: rank 1 is the floor, not a finding"
            )
        details = self.to_dict()
        details.update(
            {
                "rule_used": rule,
                "layer_table": self.layer_table(rule),
                "fits": fits,
                "global_curve": self.global_curve(rule),
                "global_quantile_value": float(
                    np.quantile(extrapolated, self.global_quantile, method="higher")
                ),
            }
        )
        return Evidence(
            name="gradient_spectrum",
            kind="estimate",
            suggested_rank=rank,
            interval=interval,
            per_rank=per_rank,
            rank_pattern=self.rank_pattern(rule),
            assumptions=[
                "the gradient at the base weights points where fine-tuning goes (first-order view)",
                "calibration examples are exchangeable draws from the training distribution",
                f"signal rank grows with examples as a power law (exponent in [0, 1]); "
                f"extrapolated from n={self.n_examples} to n={self.n_train}",
                f"global rank = {self.global_quantile:.0%} quantile of per-layer ranks, "
                "rounded up to a power of two",
            ],
            notes=notes,
            details=details,
            cost_seconds=self.cost_seconds,
        )


def _check_rule(rule: str) -> str:
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}: choose one of {', '.join(RULES)}")
    return rule


def _round(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)


def _global(ranks: list[float], q: float, max_rank: int) -> int:
    value = math.ceil(float(np.quantile(np.asarray(ranks), q, method="higher")) - 1e-9)
    return min(max_rank, 1 << max(0, value - 1).bit_length())  # next power of two, >= 1


# ---------------------------------------------------------------------------------------------
# the estimator


def gradient_spectrum(
    model: nn.Module,
    examples: list[dict],
    target_names: list[str],
    *,
    pad_token_id: int,
    max_rank: int = 64,
    batch_size: int = 8,
    seed: int = 0,
    fractions: tuple[float, ...] = (0.25, 0.5, 1.0),
    n_train: int | None = None,
    exact_max_dim: int = 1024,
    oversample: int | None = None,
    rule: str = "replication",
    alpha: float = 0.05,
    n_flips: int = 1000,
    max_groups: int = 256,
    global_quantile: float = 0.9,
    input_sketch_rank: int = 128,
    sketch_check: bool = False,
    replay_mb: float = REPLAY_MB,
    fit_head: bool = False,
    progress: bool = True,
) -> GradientSpectrum:
    """Measure each target layer's gradient spectrum on `examples` (see the module docstring).

    exact_max_dim: layers with max(d_in, d_out) <= this keep G exactly; others are sketched
      (0 forces the sketch everywhere, which is how tests compare sketch and exact).
    oversample: sketch width k = max_rank + oversample (default max(max_rank, 24)), and the
      co-range sketch has 2k + 1 rows (Tropp et al. 2017), both capped by the layer's dims.
      Single-pass sketches cannot use power iterations, and gradient spectra have heavy noise
      tails, so oversampling is what buys accuracy for the weaker signal directions.
    max_groups: examples of a half are summed into at most this many groups before the sign
      flips, which keeps memory O(max_groups * max_rank) per layer on large calibration sets.
    input_sketch_rank: width of the Nystrom sketch of the input Gram matrix on sketched layers
      (exact layers keep the d_in x d_in matrix); input energy ranks above it are floors.
    sketch_check: also accumulate an independent replica of every sketch and report the
      principal angles between the two (`LayerSpectrum.sketch_check`). Off by default: it
      costs one more sketch per sketched layer per token, about as much as the main one.
    replay_mb: keep half A's layer inputs and output gradients from pass 1 while they take at
      most this many MiB (float32, padded tokens, on the model's device) and run pass 3 on
      them instead of a third forward+backward (identical results); past it, or at 0, pass 3
      runs as a pass. With `fit_head`, the same budget holds passes 1-2's forward graphs
      until the head is fitted (`_Streaming.hold_and_fit_head`); each use stays within it.
    fit_head: the model is a sequence classifier whose new head is fitted on frozen features
      of these examples (in place) before any gradient is read: gradients through a random
      head are mostly noise. The fit's report is `settings["head_fit"]`.
    """
    start = time.perf_counter()
    _check_rule(rule)
    if fit_head and not (examples and isinstance(examples[0]["labels"], int)):
        raise ValueError("fit_head needs classification examples (int labels)")
    taps_spec = _resolve_targets(model, target_names, max_rank)
    plan = _plan(examples, fractions, seed, batch_size, max_groups)
    n_train = len(examples) if n_train is None else int(n_train)
    if n_train < 1:
        raise ValueError(f"n_train must be >= 1, got {n_train}")
    oversample = max(max_rank, 24) if oversample is None else oversample
    device = next(model.parameters()).device

    taps = [
        _Tap(
            name,
            module,
            max_rank,
            oversample,
            max(module.in_features, module.out_features) <= exact_max_dim,
            len(fractions),
            plan.n_groups,
            seed + i,
            device,
            input_sketch_rank,
            sketch_check,
        )
        for i, (name, module) in enumerate(taps_spec)
    ]
    timings: dict[str, float] = {}
    head_fit: dict[str, Any] | None = None
    held: list[list[_Held | None]] | None = None
    steps = plan.n_batches() + (len(plan.batches[0]) + len(plan.batches[1])) * fit_head
    with (_Streaming(model, taps, replay_mb, plan.tokens(examples, half=0)) as stream,
          ticker("gradient spectrum", steps, progress) as bar):
        if fit_head:
            t0 = time.perf_counter()
            held, head_fit = stream.hold_and_fit_head(examples, plan, pad=pad_token_id,
                                                      limit_bytes=replay_mb * 2**20,
                                                      seed=seed, bar=bar)
            timings["head_fit"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        stream.run(examples, plan, half=0, accumulate=True, project=False, record=True,
                   pad=pad_token_id, bar=bar, held=held[0] if held else None)
        t1 = time.perf_counter()
        for tap in taps:
            tap.set_directions(read_half=1, pairs=tap.top_pairs(half=0))
        decompose = time.perf_counter() - t1
        stream.run(examples, plan, half=1, accumulate=True, project=True, pad=pad_token_id,
                   bar=bar, held=held[1] if held else None)
        t1 = time.perf_counter()
        for tap in taps:
            tap.set_directions(read_half=0, pairs=tap.top_pairs(half=1))
            tap.summarise_full()  # spectrum of G_A + G_B, noise level; frees the accumulators
        timings["decompositions"] = decompose + time.perf_counter() - t1  # part of passes 1-2
        timings["passes_1_2"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        replay, dropped = stream.tape.complete, stream.tape.dropped
        if replay:
            stream.replay(half=0, bar=bar)
        else:
            stream.run(
                examples, plan, half=0, accumulate=False, project=True, pad=pad_token_id, bar=bar
            )
        timings["pass_3"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    layers = [tap.finish(plan, alpha, n_flips, seed) for tap in taps]
    timings["analysis"] = time.perf_counter() - t0
    notes = []
    untestable = [f for f, ok in zip(fractions, sign_flip_testable(plan.group_ends, alpha,
                                                                   len(fractions)), strict=True)
                  if not ok]
    if len(untestable) == len(fractions):
        notes.append(
            f"each half holds only {plan.group_ends[-1]} examples, too few for the sign-flip "
            f"test at alpha {alpha:g} to find anything (it needs 2^-g < alpha, g >= "
            f"{math.floor(math.log2(1 / alpha)) + 1}): the replication rules read 0 by "
            "construction, not as a finding; use more calibration examples")
    elif untestable:
        notes.append(
            f"at data fraction(s) {', '.join(f'{f:g}' for f in untestable)} each half holds "
            f"too few example groups ({', '.join(map(str, plan.group_ends[:len(untestable)]))}) "
            f"for the sign-flip test at alpha {alpha:g} (it needs 2^-g < alpha): the "
            "replication rules' growth fits leave them out"
            + ("" if len(untestable) < len(fractions) - 1 else
               ", so their extrapolation rests on one point (growth unknown: interval up to "
               "linear)"))
    if any(layer.method == "sketch" for layer in layers):
        notes.append(
            "layers above exact_max_dim were read through randomized sketches"
            + ("; sketch_check gives the principal angles between each sketch and an "
               "independent replica" if sketch_check else "")
        )
    return GradientSpectrum(
        layers=layers,
        fractions=tuple(fractions),
        n_examples=2 * plan.n_half,
        n_train=n_train,
        max_rank=max_rank,
        rule=rule,
        global_quantile=global_quantile,
        alpha=alpha,
        groups=list(plan.group_ends),
        settings={
            "batch_size": batch_size,
            "seed": seed,
            "exact_max_dim": exact_max_dim,
            "oversample": oversample,
            "n_flips": n_flips,
            "max_groups": max_groups,
            "input_sketch_rank": input_sketch_rank,
            "groups_per_half": plan.n_groups,
            "replay_mb": replay_mb,
            "pass_3": "replayed" if replay else "forward+backward" + (
                " (half A's inputs and gradients exceed replay_mb)" if dropped else ""),
            "head_fit": head_fit,
            "timings": timings,
        },
        notes=notes,
        cost_seconds=time.perf_counter() - start,
    )


def _resolve_targets(
    model: nn.Module, target_names: list[str], max_rank: int
) -> list[tuple[str, nn.Linear]]:
    if not target_names:
        raise ValueError("target_names is empty: give at least one nn.Linear module name")
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    modules = dict(model.named_modules())
    out = []
    for name in target_names:
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"unknown target {name!r}: no nn.Linear module of that name in the model"
            )
        limit = min(module.in_features, module.out_features)
        if max_rank > limit:
            raise ValueError(
                f"max_rank={max_rank} exceeds min(d_in, d_out)={limit} of target {name!r}"
            )
        out.append((name, module))
    return out


# ---------------------------------------------------------------------------------------------
# data plan: halves, chunks (one per fraction), groups (units of the sign flips), batches


@dataclass
class _Plan:
    n_half: int
    chunk_ends: list[int]  # cumulative examples per half at each fraction
    group_ends: list[int]  # cumulative groups per half at each fraction
    n_groups: int  # groups per half
    # half -> batches of (example indices, their chunks, their group ids)
    batches: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]]

    def n_batches(self) -> int:
        return 2 * len(self.batches[0]) + len(self.batches[1])  # A, B, then A again

    def tokens(self, examples: list[dict], half: int) -> int:
        """Token positions a half's batches hold, padding included."""
        return sum(len(idx) * max(len(examples[i]["input_ids"]) for i in idx)
                   for idx, _, _ in self.batches[half])


def _plan(
    examples: list[dict], fractions: tuple[float, ...], seed: int, batch_size: int, max_groups: int
) -> _Plan:
    """Deterministic split: shuffle with `seed`, halves A and B, each cut at the fractions.

    Batches are formed over a whole half in length order, not chunk by chunk: a batch may hold
    examples of several chunks (the hooks route each example to its chunk), so batches pad as
    little as a plain length-sorted pass (SmolLM2, 64 demo examples: 47% more padded tokens
    than 1.5 such passes when each chunk was batched on its own)."""
    fr = [float(f) for f in fractions]
    if (
        not fr
        or fr[-1] != 1.0
        or any(b <= a for a, b in zip(fr, fr[1:], strict=False))
        or fr[0] <= 0
    ):
        raise ValueError(
            f"fractions must increase in (0, 1] and end at 1.0, got {tuple(fractions)}"
        )
    if batch_size < 1 or max_groups < 2:
        raise ValueError("batch_size must be >= 1 and max_groups >= 2")
    n = len(examples)
    n_half = n // 2
    chunk_ends = [math.floor(f * n_half + 1e-9) for f in fr]
    if chunk_ends[0] < 2:
        need = 2 * math.ceil(2 / fr[0])
        raise ValueError(
            f"too few examples: need >= 2 per half at the smallest fraction {fr[0]} "
            f"(got {n} examples, need >= {need})"
        )
    if any(b <= a for a, b in zip(chunk_ends, chunk_ends[1:], strict=False)):
        raise ValueError(
            f"fractions {tuple(fractions)} are closer than one example apart on {n_half} "
            f"examples per half (they cut it at {chunk_ends}): space them further or add examples"
        )
    perm = np.random.default_rng(seed).permutation(n)
    lengths = np.array([len(e["input_ids"]) for e in examples])
    group_size = math.ceil(n_half / max_groups)
    batches: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = [[], []]
    group_ends = []
    for h in range(2):
        half = perm[h * n_half : (h + 1) * n_half]
        next_group = 0
        idx_parts, chunk_parts, group_parts = [], [], []
        for c, (lo, hi) in enumerate(zip([0] + chunk_ends[:-1], chunk_ends, strict=True)):
            idx = half[lo:hi]
            idx = idx[np.argsort(lengths[idx], kind="stable")]  # groups of similar lengths
            groups = next_group + np.arange(len(idx)) // group_size
            next_group = int(groups[-1]) + 1
            if h == 0:
                group_ends.append(next_group)
            idx_parts.append(idx)
            chunk_parts.append(np.full(len(idx), c))
            group_parts.append(groups)
        idx, chunks, groups = (np.concatenate(p) for p in (idx_parts, chunk_parts, group_parts))
        # by length (less padding per batch), then by chunk among equal lengths (fewer batches
        # that mix chunks: each chunk of a batch is one more call per hooked layer)
        order = np.lexsort((chunks, lengths[idx]))
        idx, chunks, groups = idx[order], chunks[order], groups[order]
        for b in range(0, len(idx), batch_size):
            sl = slice(b, b + batch_size)
            # within a batch, rows by chunk: each chunk's rows are one slice of the batch's
            # tensors, read without a copy (a batch's padding depends only on who is in it)
            by_chunk = np.argsort(chunks[sl], kind="stable")
            batches[h].append((idx[sl][by_chunk], chunks[sl][by_chunk], groups[sl][by_chunk]))
    n_groups = group_ends[-1]
    return _Plan(n_half, chunk_ends, group_ends, n_groups, batches)


# ---------------------------------------------------------------------------------------------
# per-layer streaming state


class _Tap:
    """One target layer: gradient summaries per (half, chunk) and per-group projections.

    Exact layers keep G (d_out x d_in) per (half, chunk). Sketched layers keep Y = G Omega
    (d_out x (k + h)) and W = Psi G (l x d_in), with the same Omega, Psi for every chunk and half
    so that sums and differences of sketches are sketches of sums and differences. The last h
    columns of Omega are held out of the SVD and serve only to estimate ||G||_F^2.
    """

    def __init__(
        self,
        name: str,
        module: nn.Linear,
        max_rank: int,
        oversample: int,
        exact: bool,
        n_frac: int,
        n_groups: int,
        seed: int,
        device: torch.device,
        input_sketch_rank: int = 128,
        sketch_check: bool = False,
    ):
        self.name, self.module = name, module
        self.d_out, self.d_in = module.out_features, module.in_features
        self.r, self.n_frac, self.exact, self.seed = max_rank, n_frac, exact, seed
        if not exact:
            self.k = min(max_rank + oversample, self.d_in, self.d_out)
            self.l = min(2 * self.k + 1, self.d_out)
            self.h = max(4, self.k // 4)
            gen = torch.Generator().manual_seed(seed)
            self.omega = torch.randn(self.d_in, self.k + self.h, generator=gen).to(device)
            self.psi = torch.randn(self.l, self.d_out, generator=gen).to(device)
        self.replica_acc: tuple[torch.Tensor, torch.Tensor] | None = None
        self.check = sketch_check and not exact
        if self.check:
            # an independent replica of the sketch (width k), over all the data: the angles
            # between its top subspaces and the main sketch's are what the output reports
            self.omega2 = torch.randn(self.d_in, self.k, generator=gen).to(device)
            self.psi2 = torch.randn(self.l, self.d_out, generator=gen).to(device)
        self.replica: tuple[np.ndarray, np.ndarray] | None = None  # its top (U, V)
        # input Gram matrix over real tokens: exact when G is, else a Nystrom sketch
        self.gram = Gram(self.d_in, self.d_in if exact else 0, input_sketch_rank, seed, device)
        self.shares_input_with: str | None = None
        self.half_sv: dict[int, list[float]] = {}  # half -> its top singular values, full data
        self.acc: dict[tuple[int, int], Any] = {}  # (half, chunk) -> G or (Y, W)
        self.cumulated: set[int] = set()  # halves whose acc holds running sums (`_cumulate`)
        self.dirs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # read half -> (U, V)
        self.proj = {h: torch.zeros(n_groups, n_frac * max_rank, device=device) for h in (0, 1)}
        self.full: list[dict[str, Any]] = []

    # streaming ----------------------------------------------------------------------------
    def add(self, half: int, chunk: int, x: torch.Tensor, d: torch.Tensor) -> None:
        """x: (N, d_in), d: (N, d_out), float32."""
        key = (half, chunk)
        if self.exact:
            if key in self.acc:
                self.acc[key].addmm_(d.T, x)  # in place: no G-sized temporary per batch
            else:
                self.acc[key] = d.T @ x
            return
        self.acc[key] = _add_sketch(self.acc.get(key), x, d, self.omega, self.psi)
        if self.check:
            self.replica_acc = _add_sketch(self.replica_acc, x, d, self.omega2, self.psi2)

    def project(self, half: int, chunk: int, groups: torch.Tensor, x: torch.Tensor,
                d: torch.Tensor) -> None:
        """x: (B, T, d_in), d: (B, T, d_out): add sum_t (u_i^T d_t)(x_t^T v_i) per example.

        Only onto the directions of fractions that include this chunk: fraction j reads the
        groups of chunks 0..j (`finish`), so chunk c's examples are never read on the
        directions of fractions below c (about 40% fewer projections at 3 fractions)."""
        u, v = self.dirs[half]
        cols = slice(chunk * self.r, None)
        c = ((d @ u[:, cols]) * (x @ v[:, cols])).sum(1)  # (B, (n_frac - chunk) * r)
        self.proj[half][:, cols].index_add_(0, groups, c)

    # summaries ----------------------------------------------------------------------------
    def _cumulate(self, half: int) -> None:
        """Turn a finished half's per-chunk accumulators into running sums in place, so that
        acc[(half, c)] is the summary of chunks 0..c (the data up to fraction c): each fraction
        is then read without re-adding its chunks, and no memory is added. Once per half."""
        if half in self.cumulated:
            return
        self.cumulated.add(half)
        for c in range(1, self.n_frac):  # `_plan` gives every chunk examples
            a, prev = self.acc[(half, c)], self.acc[(half, c - 1)]
            self.acc[(half, c)] = (a.add_(prev) if self.exact
                                   else (a[0].add_(prev[0]), a[1].add_(prev[1])))

    def _summary(self, half: int | None, chunks: int, sign: float = 1.0) -> Any:
        """G (exact) or (Y, W) (sketch) of the first `chunks` chunks; half None = A + sign * B.
        Reads the running sums of `_cumulate`."""
        a = self.acc[(0 if half is None else half, chunks - 1)]
        if half is not None:
            return a
        b = self.acc[(1, chunks - 1)]
        if self.exact:
            return a + sign * b
        return a[0] + sign * b[0], a[1] + sign * b[1]

    def _svd(self, summary: Any, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.exact:
            u, s, vh = torch.linalg.svd(summary, full_matrices=False)
            return u[:, :rank], s, vh[:rank].T  # all singular values, top vectors
        return sketch_svd(summary[0][:, : self.k], summary[1], self.psi, rank)

    def _spectrum(self, summary: Any, vectors: bool) -> tuple[Any, torch.Tensor, Any, float]:
        """(top U, all singular values, top V, ||G||_F^2) of a summary; the sketch's factors
        are computed once for both, and without `vectors` only singular values (svdvals costs
        about a third of a full SVD; a sketch's come from its k x k Gram matrix)."""
        if self.exact:
            total = self._energy(summary)
            if not vectors:
                return None, torch.linalg.svdvals(summary), None, total
            u, s, v = self._svd(summary, self.r)
            return u, s, v, total
        q, x = _sketch_factors(summary[0][:, : self.k], summary[1], self.psi)
        total = self._energy(summary, x)
        if not vectors:
            return None, _gram_eigh(x)[0].to(summary[0].dtype), None, total
        u, s, v = _svd_of_factors(q, x, self.r, summary[0].dtype)
        return u, s, v, total

    def _top_directions(
        self, summary: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top max_rank singular vectors of one half, the directions read on the other half,
        and the singular values that come with them.

        An exact layer far wider than max_rank uses a randomized range finder with power
        iterations (Halko et al. 2011) instead of a full SVD: the cross-fitted test is valid
        for any directions chosen on the other half, and their accuracy only affects its power.
        """
        m = min(self.d_out, self.d_in)
        if self.exact and 4 * (self.r + TOP_OVERSAMPLE) <= m:
            with torch.random.fork_rng(devices=[]):  # seeded, and the caller's RNG untouched
                torch.manual_seed(self.seed)
                u, s, v = torch.svd_lowrank(summary, q=self.r + TOP_OVERSAMPLE, niter=TOP_NITER)
            return u[:, : self.r], s, v[:, : self.r]
        return self._svd(summary, self.r)

    def _energy(self, summary: Any, x: torch.Tensor | None = None) -> float:
        """||G||_F^2: exact, or from the sketches with the reconstruction G^ = Q X as a control
        variate (as in Hutch++): ||X||^2 + (||G Omega_h||^2 - ||G^ Omega_h||^2) / h, unbiased
        because the held-out Omega_h is independent of G^. Plain ||G Omega||^2 / k would have a
        relative spread of sqrt(2 / k) when one direction dominates, as gradients often do."""
        if self.exact:
            return float((summary.double() ** 2).sum())
        y, w = summary
        if x is None:
            _, x = _sketch_factors(y[:, : self.k], w, self.psi)
        held = self.omega[:, self.k :].double()
        residual = float((y[:, self.k :].double() ** 2).sum()) - float(((x @ held) ** 2).sum())
        return max(0.0, float((x**2).sum()) + residual / self.h)

    def top_pairs(self, half: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Top max_rank singular pairs of G_half at each fraction; keeps the half's singular
        values on the full data (the "spectrum of each half" in the output)."""
        self._cumulate(half)
        pairs = []
        for j in range(self.n_frac):
            u, s, v = self._top_directions(self._summary(half, j + 1))
            pairs.append((u, v))
        self.half_sv[half] = [float(x) for x in s[: self.r]]
        return pairs

    def set_directions(
        self, read_half: int, pairs: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        self.dirs[read_half] = (
            torch.cat([u for u, _ in pairs], 1),
            torch.cat([v for _, v in pairs], 1),
        )

    def summarise_full(self) -> None:
        """Spectrum of G = G_A + G_B and the noise level from G_A - G_B at each fraction."""
        m, n = sorted((self.d_out, self.d_in))
        lam = gavish_donoho_lambda(m / n)
        for j in range(self.n_frac):
            g = self._summary(None, j + 1)
            last = j == self.n_frac - 1  # only the final spectrum keeps its vectors
            u, s, v, total = self._spectrum(g, vectors=last)
            noise_energy = self._energy(self._summary(None, j + 1, sign=-1.0))
            sigma = math.sqrt(noise_energy / (m * n))
            entry = {
                "s": s.double().cpu().numpy(),
                "total": total,
                "sigma": sigma,
                "gd_threshold": lam * math.sqrt(n) * sigma,
            }
            if last:
                entry["u"], entry["v"] = u.cpu().numpy(), v.cpu().numpy()
            self.full.append(entry)
        self.acc.clear()
        if not self.exact and self.replica_acc is not None:
            y2, w2 = self.replica_acc
            u2, _, v2 = sketch_svd(y2, w2, self.psi2, self.r)
            self.replica = (u2.cpu().numpy(), v2.cpu().numpy())
            self.replica_acc = None

    def finish(self, plan: _Plan, alpha: float, n_flips: int, seed: int) -> LayerSpectrum:
        """Turn the stored projections and spectra into ranks under every rule."""
        gen = torch.Generator().manual_seed(seed)  # per call: a layer's flips do not depend
        # on which other layers were measured with it
        ranks: dict[str, list[float]] = {rule: [] for rule in RULES}
        rep_ab, rep_ba = [], []
        for j in range(self.n_frac):
            cols = slice(j * self.r, (j + 1) * self.r)
            g_end = plan.group_ends[j]
            ab = replication_test(self.proj[1][:g_end, cols], alpha, n_flips, gen)
            ba = replication_test(self.proj[0][:g_end, cols], alpha, n_flips, gen)
            rep_ab.append(ab["count"])
            rep_ba.append(ba["count"])
            ranks["replication"].append(float((ab["count"] + ba["count"]) // 2))
            full = self.full[j]
            s, total = full["s"], max(full["total"], 1e-300)
            ranks["gavish_donoho"].append(float(min(self.r, int((s > full["gd_threshold"]).sum()))))
            for p, key in ((0.9, "energy90"), (0.95, "energy95")):
                ranks[key].append(float(energy_rank(s, total, p, self.r)))
            ranks["stable"].append(float(total / max(float(s[0]) ** 2, 1e-300)))
            for p, key in ((0.9, "replicated_energy90"), (0.95, "replicated_energy95")):
                ranks[key].append(float(replicated_energy_rank(
                    ab["s"], ba["s"], int(ranks["replication"][-1]), p)))
        last = self.full[-1]
        return LayerSpectrum(
            name=self.name,
            d_out=self.d_out,
            d_in=self.d_in,
            method="exact" if self.exact else "sketch",
            n_examples=[2 * e for e in plan.chunk_ends],
            ranks=ranks,
            replication_ab=rep_ab,
            replication_ba=rep_ba,
            t_ab=ab["t"],
            t_ba=ba["t"],
            strength_ab=ab["s"],
            strength_ba=ba["s"],
            threshold_ab=ab["threshold_t"],
            threshold_ba=ba["threshold_t"],
            singular_values=[float(x) for x in last["s"][: self.r]],
            total_energy=float(last["total"]),
            noise_sigma=float(last["sigma"]),
            gd_threshold=float(last["gd_threshold"]),
            energy_capped=energy_rank(last["s"], last["total"], 0.95, self.r + 1) > self.r,
            singular_values_a=self.half_sv.get(0, []),
            singular_values_b=self.half_sv.get(1, []),
            sketch_check=self._sketch_check(last, int(ranks["replication"][-1])),
            inputs=input_layer(self.name, self.module, self.gram, INPUT_ENERGY,
                               self.shares_input_with),
            u=last["u"],
            v=last["v"],
        )


    def _sketch_check(self, last: dict[str, Any], signal_rank: int) -> dict[str, Any] | None:
        """Principal angles between the main sketch's top-m singular subspaces (left and right)
        and those of an independent replica sketch of the same G, m = max(1, signal rank).

        Why a replica and not exact SVD: a sketched layer is one too large to hold G, so the
        exact subspaces are not available. Two independent sketches err in independent random
        directions, so their angle is about sqrt(2) times each one's angle to the truth: a
        measured, not assumed, accuracy of the subspaces the rank rests on. A large angle can
        also mean the subspace itself is ill-defined (no gap after the m-th singular value),
        which exact SVD would not resolve either. Cost: one more sketch of width k over the
        data, O(k (d_in + d_out)) memory. None for exact layers.
        """
        if self.replica is None:
            return None
        m = max(1, min(signal_rank, self.r))
        ang_u = principal_angles_deg(last["u"][:, :m], self.replica[0][:, :m])
        ang_v = principal_angles_deg(last["v"][:, :m], self.replica[1][:, :m])
        return {
            "dim": m,
            "angles_u_deg": [round(float(a), 3) for a in ang_u],
            "angles_v_deg": [round(float(a), 3) for a in ang_v],
            "max_deg": float(max(ang_u.max(), ang_v.max())),
        }


def principal_angles_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Principal angles (degrees, smallest first) between the column spans of a and b."""
    qa, _ = np.linalg.qr(np.asarray(a, dtype=np.float64))
    qb, _ = np.linalg.qr(np.asarray(b, dtype=np.float64))
    cos = np.clip(np.linalg.svd(qa.T @ qb, compute_uv=False), -1.0, 1.0)
    return np.degrees(np.arccos(cos))


def _add_sketch(
    acc: tuple[torch.Tensor, torch.Tensor] | None,
    x: torch.Tensor,
    d: torch.Tensor,
    omega: torch.Tensor,
    psi: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Y, W) += (G Omega, Psi G) for G = d^T x, without forming G (in place once begun)."""
    if acc is None:
        return d.T @ (x @ omega), (d @ psi.T).T @ x
    acc[0].addmm_(d.T, x @ omega)
    acc[1].addmm_((d @ psi.T).T, x)
    return acc


def sketch_svd(
    y: torch.Tensor, w: torch.Tensor, psi: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Single-pass randomized SVD from Y = G Omega and W = Psi G (Tropp, Yurtsever, Udell and
    Cevher 2017, "Practical sketching algorithms for low-rank matrix approximation"; Halko,
    Martinsson and Tropp 2011): G ~ Q X with Q = orth(Y), X = (Psi Q)^+ W. Returns the top
    `rank` left vectors (d_out x rank), all k singular values, the top right vectors (d_in x rank).
    """
    q, x = _sketch_factors(y, w, psi)
    return _svd_of_factors(q, x, rank, y.dtype)


def _svd_of_factors(
    q: torch.Tensor, x: torch.Tensor, rank: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of G ~ Q X through the small X (k x d_in, float64; Q float32): top `rank`
    vectors, all k singular values.

    Through the k x k Gram matrix X X^T (eigh, 4-6x faster than an SVD of X on these shapes).
    Squaring costs precision only far down the spectrum: a singular value s is off by about
    1e-16 (s_max / s)^2 relative, under 1e-8 for s above 1e-4 s_max, where every rule reads.
    If a top direction's s is below 1e-7 s_max (a rank-deficient sketch), the SVD of X is
    used instead, whose vectors stay orthonormal there."""
    s, ux = _gram_eigh(x)
    top = min(rank, len(s))
    if top and float(s[top - 1]) > 1e-7 * float(s[0]):
        vx = (x.T @ ux[:, :top]) / s[:top]
    else:
        ux, s, vh = torch.linalg.svd(x, full_matrices=False)
        vx = vh[:rank].T
    return (q @ ux[:, :rank].to(q.dtype)).to(dtype), s.to(dtype), vx.to(dtype)


def _gram_eigh(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values (descending) and left singular vectors of a wide x from eigh(x x^T)."""
    e, u = torch.linalg.eigh(x @ x.T)
    return e.flip(0).clamp_min(0).sqrt(), u.flip(1)


def _sketch_factors(
    y: torch.Tensor, w: torch.Tensor, psi: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Q = orth(Y) and X = (Psi Q)^+ W: G ~ Q X. The least squares goes through the QR of
    the tall, well-conditioned Psi Q (Gaussian Psi): same X as lstsq to rounding, at about
    half its time. In the sketches' own float32 (Householder QR is backward stable, so the
    factors are as accurate as the float32 sums they come from; 1.4-2x faster than float64),
    X returned in float64 for the Gram matrix and energies read from it."""
    y, w, psi = y.float(), w.float(), psi.float()
    q, _ = torch.linalg.qr(y)
    qm, rm = torch.linalg.qr(psi @ q)
    x = torch.linalg.solve_triangular(rm, qm.T @ w, upper=True)
    return q, x.double()


# ---------------------------------------------------------------------------------------------
# rules


def replication_test(
    c: torch.Tensor, alpha: float, n_flips: int, gen: torch.Generator
) -> dict[str, Any]:
    """Count directions replicated in the held-out half. c: (groups, directions), the per-group
    contributions to s_i = u_i^T G_heldout v_i. Statistic T_i = sum_g c_gi / sqrt(sum_g c_gi^2);
    threshold = (1 - alpha) quantile of max_i T_i over random sign flips of the groups."""
    c = c.double().cpu()
    n = c.shape[0]
    norm = (c**2).sum(0).sqrt().clamp_min(1e-300)
    t_obs = c.sum(0) / norm
    signs = torch.randint(0, 2, (n_flips, n), generator=gen).double() * 2 - 1
    t_null = ((signs @ c) / norm).max(1).values
    threshold = float(torch.quantile(t_null, 1 - alpha))
    count = int((t_obs > threshold).sum())

    def to_t(x: torch.Tensor) -> torch.Tensor:  # self-normalised sum -> one-sample t, df n - 1
        return x * math.sqrt(n - 1) / (n - x**2).clamp_min(1e-12).sqrt()

    return {
        "count": count,
        "t": [round(float(x), 4) for x in to_t(t_obs)],
        "s": [float(x) for x in c.sum(0)],
        "threshold_t": float(to_t(torch.tensor(threshold, dtype=torch.float64))),
    }


def gavish_donoho_lambda(beta: float) -> float:
    """Optimal hard threshold coefficient for known noise (Gavish and Donoho 2014): singular
    values above lambda(beta) * sqrt(n) * sigma are kept, beta = m / n <= 1."""
    return math.sqrt(2 * (beta + 1) + 8 * beta / (beta + 1 + math.sqrt(beta**2 + 14 * beta + 1)))


def energy_rank(s: np.ndarray, total: float, p: float, cap: int) -> int:
    """Smallest r whose top-r singular values hold a fraction p of ||G||_F^2 (capped)."""
    cum = np.cumsum(np.asarray(s, dtype=np.float64) ** 2) / max(total, 1e-300)
    hit = np.nonzero(cum >= p - 1e-12)[0]
    return int(min(cap, hit[0] + 1 if len(hit) else cap))


def replicated_energy_rank(s_ab: list[float], s_ba: list[float], replicated: int,
                           p: float) -> int:
    """Fewest of the first `replicated` directions holding a fraction p of their cross-fitted
    signal energy max(s_ab, 0) * max(s_ba, 0); 0 when nothing replicated."""
    k = int(replicated)
    e = np.clip(np.asarray(s_ab[:k], float), 0, None) * np.clip(np.asarray(s_ba[:k], float), 0, None)
    if k == 0 or e.sum() <= 0:
        return 0
    return int(np.searchsorted(np.cumsum(e) / e.sum(), p - 1e-12) + 1)


def sign_flip_testable(groups: list[int] | None, alpha: float, n_fractions: int) -> list[bool]:
    """Fractions at which the sign-flip test can find anything. With g groups per half the
    identity flip alone comes up with probability 2^-g, and its max statistic is the observed
    maximum, so no direction clears the (1 - alpha) quantile unless 2^-g < alpha (g >= 5 at
    alpha 0.05): a count of 0 there is by construction, not a measurement. Unknown groups
    (results stored before they were) count as testable."""
    if not groups:
        return [True] * n_fractions
    return [2.0 ** -g < alpha for g in groups]


def rule_growth(n: list[int], r: list[float], rule: str, n_target: int, max_rank: int, *,
                groups: list[int] | None = None, alpha: float = 0.05,
                spread: tuple[float, float] | None = None) -> dict[str, Any]:
    """`fit_growth` of one layer's ranks under `rule`; the rules that count replicated
    directions leave out the fractions whose test could not reject (`sign_flip_testable`),
    which would otherwise read as rank 0 and steepen the growth (a 16-example calibration set:
    [0, 0, 28] extrapolated as linear growth, to max_rank)."""
    keep = list(range(len(n)))
    if rule in REPLICATION_RULES:
        keep = [j for j, ok in enumerate(sign_flip_testable(groups, alpha, len(n))) if ok] or keep
    return fit_growth([n[j] for j in keep], [r[j] for j in keep], n_target, max_rank, spread)


def fit_growth(
    n: list[int],
    r: list[float],
    n_target: int,
    max_rank: int,
    r_range: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """Power law in examples, 1 + r(n) = a n^b, least squares in log-log, anchored at the
    largest n (the best-measured point) and extrapolated to n_target.

    Why 1 + r: a layer can show rank 0 on little data. Why b clipped to [0, 1]: more data does
    not hide a real direction, and a rank cannot grow faster than the data. The interval spans
    the exponents of every pair of fractions (clipped the same way) and `r_range`, the spread
    of the rank measured at the largest n (for the replication rule: A -> B versus B -> A).
    """
    x, y = np.log(np.asarray(n, dtype=np.float64)), np.log1p(np.asarray(r, dtype=np.float64))
    if len(x) >= 2:
        b = float(np.polyfit(x, y, 1)[0])
        slopes = [
            (y[j] - y[i]) / (x[j] - x[i]) for i in range(len(x)) for j in range(i + 1, len(x))
        ]
    else:  # one point: no growth claimed, and none ruled out
        b, slopes = 0.0, [0.0, 1.0]
    b = float(np.clip(b, 0.0, 1.0))
    slopes = [float(np.clip(s, 0.0, 1.0)) for s in slopes]
    r_lo, r_hi = r_range if r_range is not None else (r[-1], r[-1])

    def predict(at_n: float, exponent: float) -> float:
        value = (1.0 + at_n) * (n_target / n[-1]) ** exponent - 1.0
        return float(np.clip(value, 0.0, max_rank))

    point = predict(r[-1], b)
    ends = [predict(at, e) for at in (r_lo, r_hi) for e in (min(slopes), max(slopes))]
    return {
        "model": "1 + r = a * n^b",
        "exponent": b,
        "exponent_range": [min(slopes), max(slopes)],
        "n": [int(v) for v in n],
        "observed": [float(v) for v in r],
        "n_target": int(n_target),
        "rank": point,
        "interval": [min(ends + [point]), max(ends + [point])],
    }


# ---------------------------------------------------------------------------------------------
# streaming machinery: hooks, loss, progress


class _Streaming:
    """Runs passes over the plan with output-gradient hooks on the target layers
    (`lorank.hooks`: all parameters frozen, no full-weight .grad ever stored)."""

    def __init__(self, model: nn.Module, taps: list[_Tap], replay_mb: float = 0.0,
                 tape_tokens: int = 0):
        self.model = model
        self.by_name = {tap.name: tap for tap in taps}
        self.hooks = OutputGradientTaps(model, {t.name: t.module for t in taps}, self._on_grad)
        self.ctx: dict[str, Any] = {}
        self.tape = _Tape(replay_mb * 2**20, tape_tokens)  # half A's (x, d), for pass 3
        self.owner: dict[str, str] = {}  # target -> target whose input Gram it shares
        self.first: dict[str, torch.Tensor] = {}  # first batch's inputs, alive until compared
        self.head: nn.Module | None = None  # a classifier's head, once `hold_and_fit_head` ran

    def __enter__(self) -> _Streaming:
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.hooks.__exit__(*exc)

    def _on_grad(self, name: str, x3: torch.Tensor, d3: torch.Tensor) -> None:
        tap, ctx = self.by_name[name], self.ctx
        _feed(tap, ctx["half"], ctx["parts"], x3, d3, ctx["accumulate"], ctx["project"])
        if ctx["accumulate"]:
            self._read_inputs(tap, x3, ctx["mask"])
        if ctx["record"]:
            self.tape.keep(name, x3, d3)

    def replay(self, half: int, bar: Any) -> None:
        """Pass 3 without a forward+backward: project the batches recorded in pass 1, in
        their order (the sums come out as the live pass's), then free them."""
        for parts, tensors in self.tape.batches:
            for name, (x3, d3) in tensors.items():
                _feed(self.by_name[name], half, parts, x3, d3, accumulate=False, project=True)
            bar()
        self.tape.clear()

    def _read_inputs(self, tap: _Tap, x3: torch.Tensor, mask: torch.Tensor) -> None:
        """Add the layer's real-token inputs to its Gram matrix, once per distinct input tensor
        (q, k and v read the same one): sharing is decided on the first batch, as in
        `activation_spectrum`."""
        if not self.owner:
            self.first[tap.name] = x3
        elif self.owner[tap.name] != tap.name:
            return
        tap.gram.add(real_tokens(x3, mask))

    def _share_inputs(self) -> None:
        grams = {name: tap.gram for name, tap in self.by_name.items()}
        share_inputs(list(self.by_name), self.first, self.owner, grams)
        for name, tap in self.by_name.items():
            tap.gram = grams[name]
            tap.shares_input_with = None if self.owner[name] == name else self.owner[name]
        self.first.clear()

    def hold_and_fit_head(
        self, examples: list[dict], plan: _Plan, *, pad: int, limit_bytes: float, seed: int,
        bar: Any,
    ) -> tuple[list[list[_Held | None]] | None, dict[str, Any]]:
        """Fit a classifier's new head on frozen features of the whole calibration set
        before any gradient is read, from the forward passes 1 and 2 need anyway: each batch's
        graph is kept (`_Held`), and passes 1 and 2 then run only the backward, through the
        fitted head. One forward over the set instead of two (MiniLM-L6, 256 examples: the
        head fit's own forward was half a frozen forward+backward).

        Kept only while every batch's graph, scaled to the whole set, fits in `limit_bytes`
        (the autograd's saved tensors and the layer inputs the hooks hold, counted per
        storage), and only for a head that gives one vector per example (for a per-token head,
        `score`, the model picks the pooled token itself). Otherwise the graphs are dropped
        after the first batch (no more than one pass keeps anyway) and the rest of the
        features come from forwards without gradients, as `fit_head_on_frozen_features`'s:
        returns None for the held graphs then. The fitted head is the same either way."""
        name, head = find_classification_head(self.model)
        self.head = head  # what the held batches' backward reads through
        device = next(self.model.parameters()).device
        # the weights' storages count as seen: saved for backward, they take no new memory
        counted = {t.untyped_storage().data_ptr()
                   for t in (*self.model.parameters(), *self.model.buffers())}
        size = {"bytes": 0, "tokens": 0}
        total = plan.tokens(examples, 0) + plan.tokens(examples, 1)

        def count(t: torch.Tensor) -> torch.Tensor:
            size["bytes"] += _new_storage_bytes(t, counted)
            return t

        def count_input(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            count(inputs[0])  # what OutputGradientTaps' hook holds for the backward

        held: list[list[_Held | None]] | None = [[], []]
        cached: list[dict[str, torch.Tensor]] = []
        seen: dict[str, Any] = {}
        handles = [head.register_forward_hook(_head_input_hook(seen))]
        handles += [tap.module.register_forward_hook(count_input)
                    for tap in self.by_name.values()]
        try:
            for half in (0, 1):
                for idx, _, _ in plan.batches[half]:
                    batch = {k: v.to(device)
                             for k, v in collate([examples[i] for i in idx], pad).items()}
                    inputs = {"input_ids": batch["input_ids"],
                              "attention_mask": batch["attention_mask"]}
                    if held is None:
                        with torch.no_grad():
                            self.model(**inputs)
                    else:
                        with (self.hooks.reading(len(idx)),
                              torch.autograd.graph.saved_tensors_hooks(count, lambda t: t)):
                            self.model(**inputs)
                        size["tokens"] += batch["input_ids"].numel()
                    feats = seen["x"]
                    cached.append(_head_features(seen, batch))
                    if held is not None:
                        if (seen["per_token"]
                                or size["bytes"] * total / size["tokens"] > limit_bytes):
                            held = None  # the graphs go with it
                            for h in handles[1:]:
                                h.remove()
                            del handles[1:]
                        else:
                            held[half].append(_Held(feats, batch["labels"],
                                                    batch["attention_mask"],
                                                    batch["input_ids"].numel()))
                    bar()
        finally:
            for h in handles:
                h.remove()
        report = train_head(self.model, head, cached, seed=seed)
        return held, {"head": name, **report,
                      "features": "held forward of passes 1-2" if held is not None
                      else "forward without gradients"}

    def run(
        self,
        examples: list[dict],
        plan: _Plan,
        *,
        half: int,
        accumulate: bool,
        project: bool,
        pad: int,
        bar: Any,
        record: bool = False,
        held: list[_Held | None] | None = None,
    ) -> None:
        """One pass over a half's batches: forward and backward, or with `held` (the half's
        batches whose forward ran in `hold_and_fit_head`) only the backward, through the
        fitted head; each held graph is freed once read."""
        device = next(self.model.parameters()).device
        for b, (idx, chunks, groups) in enumerate(plan.batches[half]):
            parts = []
            for chunk in np.unique(chunks):  # rows None: the whole batch is one chunk
                rows = np.nonzero(chunks == chunk)[0]  # one run: `_plan` orders rows by chunk
                assert rows[-1] - rows[0] + 1 == len(rows), "a chunk's rows must be one run"
                whole = len(rows) == len(chunks)
                parts.append((int(chunk), None if whole else slice(int(rows[0]), int(rows[-1]) + 1),
                              torch.as_tensor(groups[rows], device=device)))
            if held is None:
                batch = {k: v.to(device)
                         for k, v in collate([examples[i] for i in idx], pad).items()}
                mask, tokens = batch["attention_mask"], batch["input_ids"].numel()
            else:
                item, held[b] = held[b], None
                assert item is not None
                mask, tokens = item.mask, item.tokens
            self.ctx = {
                "half": half,
                "accumulate": accumulate,
                "project": project,
                "record": record,
                "parts": parts,
                "mask": mask,
            }
            if record:
                self.tape.start_batch(parts, tokens)
            with self.hooks.reading(len(idx)):
                if held is None:
                    loss = summed_loss(self.model, batch)
                else:
                    loss = _summed(self.head(item.feats), item.labels)
                if not loss.requires_grad:
                    raise ValueError("the loss does not depend on any target layer")
                loss.backward()
            self.ctx = {}
            if accumulate and not self.owner:
                self._share_inputs()
            bar()


@dataclass
class _Held:
    """A batch whose forward ran before the head was fitted, its graph kept for the backward:
    the head's input (carrying that graph), the labels, the attention mask, token positions."""

    feats: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    tokens: int


class _Tape:
    """Half A's layer inputs and output gradients, batch by batch, for the replay of pass 3:
    the hooks' own tensors, kept alive. Memory is counted per storage, so an input that q, k
    and v all read counts once. Dropped for good as soon as the batches kept so far, scaled
    to the half's `total_tokens`, would pass `limit_bytes` (after the first batch on a model
    too large for it, so at most one batch is held in vain), or the bytes themselves do."""

    def __init__(self, limit_bytes: float, total_tokens: int):
        self.limit, self.total, self.bytes, self.tokens = limit_bytes, total_tokens, 0, 0
        self.on, self.dropped = limit_bytes > 0, False
        self.batches: list[tuple[list[tuple], dict[str, tuple[torch.Tensor, torch.Tensor]]]] = []
        self.storages: set[int] = set()

    @property
    def complete(self) -> bool:
        return self.on and bool(self.batches)

    def start_batch(self, parts: list[tuple], tokens: int) -> None:
        if self.on and self.tokens and self.bytes * self.total / self.tokens > self.limit:
            self._drop()
        if self.on:
            self.batches.append((parts, {}))
            self.tokens += tokens

    def keep(self, name: str, x3: torch.Tensor, d3: torch.Tensor) -> None:
        if not self.on:
            return
        self.bytes += _new_storage_bytes(x3, self.storages) + _new_storage_bytes(d3, self.storages)
        if self.bytes > self.limit:
            self._drop()
            return
        self.batches[-1][1][name] = (x3, d3)

    def _drop(self) -> None:
        self.clear()
        self.on, self.dropped = False, True

    def clear(self) -> None:
        self.batches, self.storages, self.bytes, self.tokens = [], set(), 0, 0


def _new_storage_bytes(t: torch.Tensor, seen: set[int]) -> int:
    """The bytes of `t`'s storage if it is not in `seen` (which it then joins), else 0: memory
    kept alive is counted once per storage, however many tensors view it. Only for tensors
    that stay alive while counted, so that no address is reused and matched stale."""
    storage = t.untyped_storage()
    if storage.data_ptr() in seen:
        return 0
    seen.add(storage.data_ptr())
    return storage.nbytes()


def _feed(tap: _Tap, half: int, parts: list[tuple], x3: torch.Tensor, d3: torch.Tensor,
          accumulate: bool, project: bool) -> None:
    """One batch's (x, d) of one layer, routed chunk by chunk: accumulated into the half's
    summaries (passes 1 and 2 read every example exactly once) and/or projected per group."""
    for chunk, rows, groups in parts:
        x, d = (x3, d3) if rows is None else (x3[rows], d3[rows])
        if accumulate:
            tap.add(half, chunk, x.reshape(-1, tap.d_in), d.reshape(-1, tap.d_out))
        if project:
            tap.project(half, chunk, groups, x, d)


def summed_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """SUM of per-token losses over supervised tokens (causal LM) or over examples
    (classification), so that G = sum_t d_t x_t^T is the gradient of the summed loss and
    per-example contributions add up."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return _summed(logits, batch["labels"])


def _summed(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`summed_loss` from the logits."""
    if labels.dim() == 2:  # causal LM: position t predicts token t + 1
        logits, labels = logits[:, :-1], labels[:, 1:]
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            labels.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
    if logits.shape[-1] == 1:  # regression head
        return 0.5 * ((logits.squeeze(-1).float() - labels.float()) ** 2).sum()
    return F.cross_entropy(logits.float(), labels, reduction="sum")


# ---------------------------------------------------------------------------------------------
# classification heads


def find_classification_head(model: nn.Module) -> tuple[str, nn.Module]:
    """The newly initialized head of a sequence-classification model, by its conventional
    name: `classifier` (BERT, RoBERTa, DeBERTa), `score` (Llama, Qwen, Mistral, GPT-2) or
    `classification_head` (BART, T5). By name only: a loose guess could train the body."""
    for name in ("classifier", "score", "classification_head"):
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            return name, module
    raise ValueError(
        "no classification head found (looked for 'classifier', 'score', 'classification_head')"
    )


def fit_head_on_frozen_features(
    model: nn.Module,
    examples: list[dict],
    *,
    pad_token_id: int,
    steps: int = HEAD_STEPS,
    lr: float = HEAD_LR,
    batch_size: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """Train only the classification head on frozen body features (DESIGN.md point 1).

    Why: a randomly initialized head makes body gradients mostly noise; the rank the body needs
    is the one it sees once the head is sensible, as it is a few steps into fine-tuning.
    The body runs once: the head's inputs are cached (for per-token heads like `score`, at the
    last attended token, which is where Llama-style models pool with right padding), then the
    head alone is trained with Adam, full batch when the cached features are vectors.
    The body's pass takes the examples in length order, as the gradient passes do: batches of
    similar lengths carry little padding (MiniLM, 256 examples: 4,080 padded tokens against
    6,976 in the given order, 1.3 s against 2.0 s), and each batch caches its own labels, so
    features and labels stay paired. Modifies the head in place; returns the loss before and
    after. (`gradient_spectrum(fit_head=True)` fits the same way from its own passes.)
    """
    if not examples or not isinstance(examples[0]["labels"], int):
        raise ValueError("fit_head_on_frozen_features needs classification examples (int labels)")
    examples = sorted(examples, key=lambda e: len(e["input_ids"]))  # stable: deterministic
    name, head = find_classification_head(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    cached: list[dict[str, torch.Tensor]] = []
    seen: dict[str, Any] = {}
    handle = head.register_forward_hook(_head_input_hook(seen))
    try:
        with torch.no_grad():
            for b in range(0, len(examples), batch_size):
                batch = {
                    k: v.to(device)
                    for k, v in collate(examples[b : b + batch_size], pad_token_id).items()
                }
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                cached.append(_head_features(seen, batch))
    finally:
        handle.remove()
        model.train(was_training)
    return {"head": name, **train_head(model, head, cached, steps=steps, lr=lr, seed=seed)}


def _head_input_hook(seen: dict[str, Any]):
    """A forward hook that keeps the head's input (as it is: with its graph, if any) and
    whether the head gives one vector per example."""

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        seen["x"], seen["per_token"] = inputs[0], output.dim() == 3

    return hook


def _head_features(seen: dict[str, Any], batch: dict[str, torch.Tensor]
                   ) -> dict[str, torch.Tensor]:
    """The batch's features for fitting the head, detached, paired with its labels: a
    per-token head's input at the last attended token, where the model pools."""
    feats = seen.pop("x").detach()
    if seen["per_token"]:
        last = batch["attention_mask"].sum(1) - 1
        feats = feats[torch.arange(feats.shape[0], device=feats.device), last]
    return {"x": feats.float(), "y": batch["labels"]}


def train_head(model: nn.Module, head: nn.Module, cached: list[dict[str, torch.Tensor]], *,
               steps: int = HEAD_STEPS, lr: float = HEAD_LR, seed: int = 0) -> dict[str, Any]:
    """Adam on the head alone over cached (features, labels): full batch when the features
    are vectors, else a seeded random cached batch per step. Every other parameter is frozen
    for the fit and left as it was (requires_grad flags restored, no .grad kept)."""
    vectors = all(c["x"].dim() == 2 for c in cached)
    if vectors:
        cached = [
            {"x": torch.cat([c["x"] for c in cached]), "y": torch.cat([c["y"] for c in cached])}
        ]
    n_examples = sum(len(c["y"]) for c in cached)
    head_dtype = next(head.parameters()).dtype

    def loss_of(c: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(head(c["x"].to(head_dtype)).float(), c["y"])

    def mean_loss() -> float:
        with torch.no_grad():
            return float(sum(loss_of(c) * len(c["y"]) for c in cached) / n_examples)

    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    for p in head.parameters():
        p.requires_grad_(True)
    was_training = head.training
    head.eval()  # a head with its own dropout (RoBERTa's) fits as the analysis reads it
    before = mean_loss()
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    try:
        with torch.enable_grad():
            for _ in range(steps):
                c = (
                    cached[0]
                    if vectors
                    else cached[int(torch.randint(len(cached), (1,), generator=order))]
                )
                opt.zero_grad(set_to_none=True)
                loss_of(c).backward()
                opt.step()
        after = mean_loss()
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
            p.grad = None
        head.train(was_training)
    return {
        "loss_before": before,
        "loss_after": after,
        "steps": steps,
        "n_examples": n_examples,
        "full_batch": vectors,
    }
