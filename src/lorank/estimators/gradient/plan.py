"""Which layers are read, and how the calibration examples are split: halves, chunks (one per
data fraction), groups (the units of the sign flips) and batches.

The examples are shuffled with the seed into disjoint halves A and B, each cut into chunks at
the data fractions (n/4, n/2, n by default). Sketches and exact G are linear in the data, so
the sums of the first chunks are the summaries at each fraction; the signal rank at each
fraction gives a growth curve, extrapolated to the training set size with a power law.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from torch import nn


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
