"""Capacity: an upper bound on the rank the data could ever fill.

The bits the base model still pays on the supervised tokens bound what there is to learn (they
include the text's irreducible entropy, so the bound is loose). An adapter of P parameters holds
at most about `bits_per_param * P` bits (Allen-Zhu & Li 2024 measure ~2 bits per parameter for
fully trained language models; a LoRA adapter stores no more). Ranks whose adapters could hold
all of it at that capacity: a ceiling, never the answer. In practice a loose one: short LoRA
runs store far less per parameter, and the benchmark's r* is above it on most tasks.
"""

from __future__ import annotations

import time

from lorank.data import DataProfile
from lorank.estimators.base import Evidence
from lorank.targets import TargetSet

BITS_PER_PARAM = 2.0


def capacity_evidence(profile: DataProfile, targets: TargetSet, ranks: list[int], *,
                      bits_per_param: float = BITS_PER_PARAM, seconds: float = 0.0) -> Evidence:
    """Ceiling rank: smallest candidate whose adapter could store every bit there is to learn."""
    start = time.perf_counter()
    bits = profile.total_bits
    adapter = {r: targets.params(r) - targets.head_params for r in ranks}
    per_rank = {}
    ceiling = None
    for r in ranks:
        fill = bits / (bits_per_param * adapter[r])
        per_rank[r] = "can hold all" if fill <= 1 else f"≤{100 / fill:.0f}% of data"
        if fill <= 1 and ceiling is None:
            ceiling = r
    notes = []
    if ceiling is None:
        notes.append(f"even rank {ranks[-1]} cannot hold all {bits:,.0f} bits: no ceiling below it")
    else:
        notes.append(
            f"{bits:,.0f} bits to learn fit in rank {ceiling} at {bits_per_param:g} bits/param, "
            "an adapter's full capacity; short LoRA runs store far less per parameter, so this "
            "bounds memorization, not the rank training needs (the benchmark's r* is above it on "
            "most tasks)"
        )
    source = ("label entropy x examples" if profile.task == "classification"
              else f"base-model loss {profile.base_loss_bits:.3f} bits/token on "
                   f"{profile.base_loss_sample} sampled examples x {profile.supervised_tokens:,} "
                   "supervised tokens")
    return Evidence(
        name="capacity", kind="ceiling", suggested_rank=ceiling,
        interval=(1, ceiling) if ceiling else None, per_rank=per_rank,
        assumptions=[
            f"bits to learn = {source} (includes irreducible entropy: an overestimate)",
            f"an adapter stores at most {bits_per_param:g} bits per parameter",
        ],
        notes=notes,
        details={"total_bits": bits, "bits_per_param": bits_per_param,
                 "adapter_params": {str(r): p for r, p in adapter.items()}},
        cost_seconds=seconds + time.perf_counter() - start,
    )
