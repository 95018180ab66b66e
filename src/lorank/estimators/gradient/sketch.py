"""Randomized sketches of a gradient too large to hold: Y = G Omega and W = Psi G accumulated
in one pass without forming G, the single-pass SVD read from them, and principal angles, with
which a sketch is compared to an independent replica.

A sketch is linear in G, so sums and differences of sketches taken with the same Omega and Psi
are sketches of the sums and differences: the halves and chunks of the data share them.
"""

from __future__ import annotations

import numpy as np
import torch


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


def principal_angles_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Principal angles (degrees, smallest first) between the column spans of a and b."""
    qa, _ = np.linalg.qr(np.asarray(a, dtype=np.float64))
    qb, _ = np.linalg.qr(np.asarray(b, dtype=np.float64))
    cos = np.clip(np.linalg.svd(qa.T @ qb, compute_uv=False), -1.0, 1.0)
    return np.degrees(np.arccos(cos))
