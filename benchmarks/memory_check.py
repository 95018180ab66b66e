"""Does `memory_estimate` size LoRA training right? Measured peak against the estimate.

Usage (one process per shape, so the peak is that shape's):
  .venv/bin/python benchmarks/memory_check.py --model smollm2-135m --rank 8 --batch 4 --seq 128
  .venv/bin/python benchmarks/memory_check.py --all > benchmarks/results/memory_check.json

Trains SmolLM2-135M or all-MiniLM-L6-v2 (fp32, all linear layers; MiniLM as a 2-label
classifier, its new head trained) for 3 steps with lorank's shared training loop
on seeded random token sequences of exactly `--seq` tokens (every token supervised) and compares
what training added to memory with the estimate's non-weight part (adapter, gradients, AdamW
moments, activations). On CPU "memory" is the process's peak RSS (after load -> after
training); on CUDA it is `torch.cuda.max_memory_allocated`. The frozen weights are compared
with the RSS the load added. On CPU the training is also run under `TensorPeak`, which counts
what a GPU's caching allocator would: the peak of live tensor storages created by torch ops
(the frozen weights' storages excluded), without the CPU process's own overhead (allocator
retention, oneDNN weight packing, the Python heap). `--all` runs each shape of SHAPES in its own subprocess and
prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch

SHAPES = {"smollm2-135m": [(8, 4, 128), (64, 4, 128), (8, 8, 256), (8, 1, 512)],
          "minilm-l6": [(8, 16, 128), (64, 16, 128), (8, 8, 256), (8, 32, 64)]}
MIB = 2**20


def peak_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / MIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(model: str, rank: int, batch: int, seq: int) -> dict:
    from lorank.api import versions
    from lorank.models import load_model
    from lorank.targets import TensorPeak, memory_estimate, resolve_targets
    from lorank.train import TrainConfig, train_lora

    before_load = peak_mib()
    classify = model == "minilm-l6"
    loaded = load_model(model, device="auto", task="classification" if classify else None,
                        num_labels=2 if classify else None)
    with torch.no_grad():  # fault in the weights (safetensors maps them lazily)
        float(sum(p.float().sum() for p in loaded.model.parameters()))
    after_load = peak_mib()
    targets = resolve_targets(loaded.model, "all-linear")
    gen = torch.Generator().manual_seed(0)
    vocab = loaded.model.config.vocab_size
    examples = [{"input_ids": ids, "labels": i % 2 if classify else list(ids)}
                for i, ids in enumerate(torch.randint(3, vocab, (seq,), generator=gen).tolist()
                                        for _ in range(3 * batch))]
    config = TrainConfig(rank=rank, target_modules=targets.peft_target_modules,
                         modules_to_save=targets.modules_to_save or None, steps=3,
                         batch_size=batch, eval_every=1000, eval_batch_size=1,
                         learning_rate=1e-4)
    tracker = None
    if torch.cuda.is_available():
        result = train_lora(lambda: loaded.model, examples, examples[:1], config,
                            pad_token_id=loaded.pad_token_id, progress=False)
    else:
        weights = {p.untyped_storage().data_ptr() for p in loaded.model.parameters()}
        with TensorPeak(weights) as tracker:
            result = train_lora(lambda: loaded.model, examples, examples[:1], config,
                                pad_token_id=loaded.pad_token_id, progress=False)
    after_train = peak_mib()
    est = memory_estimate(targets, rank, batch_size=batch, seq_len=seq)
    added_est = (est.total - est.frozen_weights) / MIB
    added = after_train - after_load
    return {"model": model, "rank": rank, "batch": batch, "seq": seq, "status": result.status,
            "device": "cuda" if torch.cuda.is_available() else "cpu (peak RSS)",
            "load_added_mib": round(after_load - before_load, 1),
            "frozen_weights_est_mib": round(est.frozen_weights / MIB, 1),
            "training_added_mib": round(added, 1),
            "training_est_mib": round(added_est, 1),
            "estimate_parts_mib": {k: round(v / MIB, 1) for k, v in est.to_dict().items()
                                   if isinstance(v, (int, float))},
            "measured_over_estimate": round(added / added_est, 2),
            "tensor_peak_mib": round(tracker.peak / MIB, 1) if tracker else None,
            "tensor_peak_over_estimate": round(tracker.peak / MIB / added_est, 2)
            if tracker else None,
            "versions": versions()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m", choices=list(SHAPES))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--all", action="store_true")
    args = parser.parse_args()
    if not args.all:
        print(json.dumps(measure(args.model, args.rank, args.batch, args.seq)))
        return
    rows = []
    for model, rank, batch, seq in ((m, *shape) for m, shapes in SHAPES.items()
                                    for shape in shapes):
        done = subprocess.run([sys.executable, __file__, "--model", model, "--rank", str(rank),
                               "--batch", str(batch), "--seq", str(seq)],
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr)
    print(json.dumps({"shapes": rows}, indent=1))


if __name__ == "__main__":
    main()
