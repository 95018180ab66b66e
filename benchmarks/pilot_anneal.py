"""Does the SVD probe's learning-rate pilot order the lrs right if each pilot run anneals?

Usage: python benchmarks/pilot_anneal.py TASK LR1,LR2,... [cut,anneal]

For each lr, trains the task's adapter at its largest rank R for a quarter of the recipe's steps,
(cut) on the recipe's own schedule stopped at the quarter (lorank's pilot: the lr is at its peak
there) or (anneal) with the whole warm-up + decay compressed into the quarter, and scores it as
the pilot does: the adapter truncated by SVD to the middle candidate rank, on 64 validation
examples. Prints one line per (mode, lr) and writes benchmarks/results/TASK/pilot_anneal.json.
The task's data must exist (`lorank sweep --task TASK` builds it).
"""
from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from lorank.api import prepare_inputs, resolve_targets, versions
from lorank.estimators.probe import (
    SVDCurveEvaluator,
    _StopAt,
    _subsample,
    default_ranks,
    pilot_rank,
)
from lorank.train import TrainConfig, train_lora

RESULTS = Path(__file__).resolve().parent / "results"


def main(task: str, lrs: list[float], modes: list[str]) -> dict:
    task_dir = RESULTS / task
    info = json.loads((task_dir / "data" / "task.json").read_text())["task"]
    loaded, prepared = prepare_inputs(info["model"], task_dir / "data" / "train.jsonl",
                                      val_data=task_dir / "data" / "val.jsonl",
                                      max_length=info["max_length"], seed=0)
    targets = resolve_targets(loaded.model, info.get("targets", "all-linear"))
    max_rank = max(info["ranks"])
    read_at = pilot_rank(default_ranks(max_rank))
    quarter = -(-info["steps"] // 4)
    base = TrainConfig(rank=max_rank, target_modules=targets.peft_target_modules,
                       modules_to_save=targets.modules_to_save or None, learning_rate=lrs[0],
                       steps=info["steps"], batch_size=info["batch_size"], seed=0,
                       eval_every=quarter, warmup_ratio=0.1)
    sub = _subsample(prepared.val, 64, 2)  # the pilot's subsample (seed + 2)
    losses = {}
    for mode in modes:
        for lr in lrs:
            t0 = time.time()
            evaluator = SVDCurveEvaluator([read_at], sub, pad_token_id=loaded.pad_token_id,
                                          batch_size=info["batch_size"])
            if mode == "cut":
                cfg, callbacks = replace(base, learning_rate=lr), [_StopAt(quarter)]
            else:
                cfg, callbacks = replace(base, learning_rate=lr, steps=quarter), []
            res = train_lora(lambda: copy.deepcopy(loaded.model), prepared.train, sub, cfg,
                             pad_token_id=loaded.pad_token_id, callbacks=callbacks,
                             progress=False, evaluator=evaluator)
            losses[f"{mode} {lr:g}"] = res.final_val_loss
            print(f"{task} {mode} lr={lr:g}: loss at rank {read_at} = {res.final_val_loss:.4f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    out = {"task": task, "rank": max_rank, "read_at": read_at, "steps_each": quarter,
           "n_val": len(sub), "losses": losses, "versions": versions()}
    (task_dir / "pilot_anneal.json").write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main(sys.argv[1], [float(x) for x in sys.argv[2].split(",")],
         sys.argv[3].split(",") if len(sys.argv) > 3 else ["cut", "anneal"])
