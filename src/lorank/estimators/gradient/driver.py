"""`gradient_spectrum`, the estimator's entry point: three streaming passes over the
calibration set, then every layer's ranks under every rule.

The passes (1.5x one forward+backward over the calibration set):
  1. half A: accumulate G_A per chunk (exact if the layer is small, else the randomized
     sketches G Omega and Psi G) -> top pairs of G_A at each data fraction;
  2. half B: accumulate G_B per chunk, and per group of examples the projections c_gi onto A's
     pairs -> top pairs of G_B;
  3. half A again: projections onto B's pairs.
Why this order and not "sketch everything, then one more full pass": the projections need the
other half's pairs first, and reading B only after A is summarised gets A -> B for free, so
only half the data is read twice. The projections are exact for sketched layers too (they use
d_t and x_t, not the sketch), so the test stays valid however rough the sketch is.
Pass 3 replays pass 1's tensors when they fit in `replay_mb` (small models and calibration
sets: MiniLM-L6 at 256 examples ~0.35 GB, SmolLM2 at 64 ~2.1 GB), which leaves one
forward+backward over the calibration set instead of 1.5; large models run pass 3 as a pass,
holding O(k (d_in + d_out)) per layer. A classifier's new head is fitted on frozen features
first (`fit_head`), from passes 1-2's own forward when their graphs fit in `replay_mb` too.
"""

from __future__ import annotations

import math
import time
from typing import Any

from torch import nn

from lorank.estimators.gradient.accumulate import _Tap
from lorank.estimators.gradient.plan import _plan, _resolve_targets
from lorank.estimators.gradient.results import GradientSpectrum
from lorank.estimators.gradient.rules import _check_rule, sign_flip_testable
from lorank.estimators.gradient.streaming import _Held, _Streaming
from lorank.util import ticker

REPLAY_MB = 2048.0  # default memory kept to save work (`gradient_spectrum`'s replay_mb)


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
    """Measure each target layer's gradient spectrum on `examples` (see the package docstring).

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
      most this many MiB (in the model's dtype, padded tokens, on the model's device, an input
      several layers read counted once) and run pass 3 on them instead of a third
      forward+backward (identical results); past it, or at 0, pass 3 runs as a pass. With `fit_head`, the same budget holds passes 1-2's forward graphs
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
