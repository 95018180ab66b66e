"""The probe's learning rate: one short run per candidate lr at one rank, the lowest
validation loss wins (a probe reads every rank at one lr).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from lorank.estimators.probe.callbacks import _StopAt
from lorank.estimators.probe.curve import _subsample
from lorank.estimators.probe.svd import SVDCurveEvaluator
from lorank.train import TrainConfig, train_lora
from lorank.util import atomic_write_text


def pilot_rank(ranks: Sequence[int]) -> int:
    """The candidate rank nearest the geometric middle of the range (8 for 1..64)."""
    ranks = sorted(ranks)
    middle = math.sqrt(ranks[0] * ranks[-1])
    return min(ranks, key=lambda r: (abs(math.log(r / middle)), r))


def pick_learning_rate(
    model_factory: Callable[[], PreTrainedModel],
    train_examples: Sequence[dict],
    val_examples: Sequence[dict],
    *,
    pad_token_id: int,
    config: TrainConfig,
    lrs: Sequence[float],
    rank: int,
    fraction: float = 0.25,
    n_val: int = 64,
    seed: int = 0,
    progress: bool = True,
    checkpoint_root: Path | None = None,
    read_at: int | None = None,
    record: Path | None = None,
) -> dict[str, Any]:
    """Pick the probe's learning rate: the first `fraction` of the recipe's schedule at `rank`
    for each lr, scored on `n_val` validation examples; the lowest loss wins. With `read_at`,
    each run is scored truncated by SVD to that rank: what the SVD probe will read there.

    Why: with rsLoRA the best lr moves with rank on every benchmark task (BENCHMARKS.md, "best
    learning rate per rank"), and a probe reads every rank at one lr. With `checkpoint_root`,
    each lr's run leaves its checkpoint in `checkpoint_root/lr<lr>` and the result names the
    winner's (`checkpoint_dir`): `train_lora(..., out_dir=that, resume=True)` with the same
    config finishes it, so the pilot's winning quarter is not trained twice. With `record` (a
    JSON file, for the same inputs and settings only), each lr's loss is kept there as soon as
    its run ends, and an lr already there is not trained again: an interrupted pilot continues
    with the lrs it had not finished.
    """
    lrs = sorted(set(float(x) for x in lrs))
    stop = max(1, math.ceil(fraction * config.steps))
    sub = _subsample(val_examples, n_val, seed + 2)
    losses: dict[float, float] = {}
    dirs: dict[float, Path | None] = {}
    t0 = time.time()
    finished: dict[str, float] = {}
    if record is not None and Path(record).exists():
        finished = json.loads(Path(record).read_text(encoding="utf-8"))
    for lr in lrs:
        cfg = replace(config, rank=rank, learning_rate=lr, eval_every=stop, seed=seed)
        dirs[lr] = Path(checkpoint_root) / f"lr{lr:g}" if checkpoint_root is not None else None
        if f"{lr:g}" in finished:
            losses[lr] = float(finished[f"{lr:g}"])
            continue
        # with read_at, the run's one evaluation is the truncated adapter's loss itself
        evaluator = None if read_at is None else SVDCurveEvaluator(
            [read_at], sub, pad_token_id=pad_token_id,
            batch_size=cfg.eval_batch_size or cfg.batch_size, seed=seed)
        res = train_lora(model_factory, train_examples, sub, cfg, pad_token_id=pad_token_id,
                         callbacks=[_StopAt(stop)], progress=progress, out_dir=dirs[lr],
                         evaluator=evaluator)
        loss = res.final_val_loss
        losses[lr] = loss if res.ok and math.isfinite(loss) else math.inf
        if record is not None:
            finished[f"{lr:g}"] = losses[lr]
            atomic_write_text(Path(record), json.dumps(finished))
    best = min(lrs, key=lambda lr: (losses[lr], lr))
    pilot = {"learning_rate": best, "losses": {f"{lr:g}": v for lr, v in losses.items()},
             "rank": rank, "read_at": read_at or rank, "steps_each": stop,
             "fraction": fraction, "n_val": len(sub), "seconds": round(time.time() - t0, 2)}
    if dirs[best] is not None and math.isfinite(losses[best]):
        pilot["checkpoint_dir"] = str(dirs[best])
    return pilot
