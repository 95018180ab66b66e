"""What the gradient spectrum returns: each target layer's measurements (`LayerSpectrum`) and
the `GradientSpectrum` that turns them into ranks.

A layer's rank under a rule is extrapolated from the data fractions to the training set's size
(`rule_growth`); the global rank is a high quantile of the per-layer ranks, rounded up to a
power of two (`_global`); `to_evidence` reports both with the per-layer table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lorank.estimators.activation import ActivationLayer
from lorank.estimators.base import Evidence
from lorank.estimators.gradient.rules import _check_rule, rule_growth, sign_flip_testable


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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerSpectrum:
        """The layer `to_dict` wrote (after a JSON round trip too), without its singular
        vectors (`u`, `v` None) and with the input spectrum's top eigenvalues only."""
        d = dict(d)
        if d.get("inputs") is not None:
            d["inputs"] = ActivationLayer(**d["inputs"])
        return cls(**d)

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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GradientSpectrum:
        """The spectrum `to_dict` wrote, after a JSON round trip too: its ranks, tables and
        Evidence are those of the spectrum that was measured (see `LayerSpectrum.from_dict`)."""
        d = dict(d)
        d["fractions"] = tuple(d["fractions"])
        d["layers"] = [LayerSpectrum.from_dict(layer) for layer in d["layers"]]
        return cls(**d)

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


def _round(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)


def _global(ranks: list[float], q: float, max_rank: int) -> int:
    value = math.ceil(float(np.quantile(np.asarray(ranks), q, method="higher")) - 1e-9)
    return min(max_rank, 1 << max(0, value - 1).bit_length())  # next power of two, >= 1
