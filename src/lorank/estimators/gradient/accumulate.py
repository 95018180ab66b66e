"""Per-layer streaming state: one `_Tap` per target layer holds its gradient summaries per
(half, chunk) and the per-group projections the sign-flip test reads, and at the end turns
them into the layer's `LayerSpectrum` under every rule; `_feed` routes a batch's hooked
tensors to it, chunk by chunk.

Exact layers keep G, wider ones its sketches (`sketch`). Besides the ranks, each layer gives
the spectrum of each half (G_A and G_B's top singular values); with `sketch_check`, for
sketched layers, the principal angles between the sketch's top subspaces and an independent
replica sketch's (`_Tap._sketch_check`), the sketch's measured accuracy where exact SVD is out
of reach; and the input spectrum (`lorank.estimators.activation`): how many input directions
hold 90% / 95% of the inputs' energy, second evidence for where rank goes across layers, read
by the same hooks on the examples' real tokens (passes 1 and 2, each example once).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from lorank.estimators.activation import Gram, input_layer
from lorank.estimators.gradient.plan import _Plan
from lorank.estimators.gradient.results import LayerSpectrum
from lorank.estimators.gradient.rules import (
    RULES,
    energy_rank,
    gavish_donoho_lambda,
    replicated_energy_rank,
    replication_test,
)
from lorank.estimators.gradient.sketch import (
    _add_sketch,
    _gram_eigh,
    _sketch_factors,
    _svd_of_factors,
    principal_angles_deg,
    sketch_svd,
)

# Exact layers at least 4x wider than max_rank + TOP_OVERSAMPLE find the directions they hand to
# the other half with a randomized range finder (TOP_NITER power iterations), not a full SVD.
TOP_OVERSAMPLE, TOP_NITER = 16, 2
INPUT_ENERGY = (0.9, 0.95)  # input-spectrum energy levels reported per layer


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


def _feed(tap: _Tap, half: int, parts: list[tuple], x3: torch.Tensor, d3: torch.Tensor,
          accumulate: bool, project: bool) -> None:
    """One batch's (x, d) of one layer, routed chunk by chunk: accumulated into the half's
    summaries (passes 1 and 2 read every example exactly once) and/or projected per group.
    x3, d3 come in the model's dtype; the products are taken in float32 (for a float32 model
    the very tensors handed over)."""
    x3, d3 = x3.float(), d3.float()
    for chunk, rows, groups in parts:
        x, d = (x3, d3) if rows is None else (x3[rows], d3[rows])
        if accumulate:
            tap.add(half, chunk, x.reshape(-1, tap.d_in), d.reshape(-1, tap.d_out))
        if project:
            tap.project(half, chunk, groups, x, d)
