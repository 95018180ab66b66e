"""Per-layer baselines (EVA, AdaLoRA, Fisher diagonal) on tiny models: the math and the runs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import make_bert, make_llama

from lorank.bench.baselines import (
    BUDGET_RANK,
    TaskRun,
    allocate_budget,
    fisher_masses,
    run_layerwise,
)
from lorank.data import collate
from lorank.errors import LorankError
from lorank.estimators.gradient import summed_loss
from lorank.targets import resolve_targets

pytestmark = pytest.mark.usefixtures("one_thread")


def lm_examples(n: int, seed: int = 0) -> list[dict]:
    """Random token sequences of varied length; the second half of each is supervised."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(6, 14, (1,), generator=g))
        ids = torch.randint(3, 128, (length,), generator=g).tolist()
        labels = [-100] * (length // 2) + ids[length // 2 :]
        out.append({"input_ids": ids, "attention_mask": [1] * length, "labels": labels})
    return out


def cls_examples(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(5, 12, (1,), generator=g))
        ids = torch.randint(5, 128, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "attention_mask": [1] * length, "labels": i % 3})
    return out


def brute_force_masses(model, examples, names) -> dict[str, float]:
    """Sum over examples of ||dL_e/dW||_F^2 from real weight gradients, one example at a time."""
    modules = dict(model.named_modules())
    total = dict.fromkeys(names, 0.0)
    for ex in examples:
        model.zero_grad()
        summed_loss(model, collate([ex], 0)).backward()
        for n in names:
            total[n] += float(modules[n].weight.grad.pow(2).sum())
    return {n: v / len(examples) for n, v in total.items()}


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_fisher_masses_match_per_example_weight_gradients(kind):
    model = make_llama() if kind == "llama" else make_bert()
    examples = lm_examples(10) if kind == "llama" else cls_examples(10)
    names = [t.name for t in resolve_targets(model, "all-linear").layers]
    # batched (with padding) through the Gram identity, no weight gradient stored
    fast = fisher_masses(model, examples, names, pad_token_id=0, batch_size=4)
    assert all(p.grad is None for p in model.parameters())
    slow = brute_force_masses(model, examples, names)
    for n in names:
        assert fast[n] == pytest.approx(slow[n], rel=1e-3), n
    assert len({round(v, 6) for v in fast.values()}) > 1  # the layers really differ


def test_allocate_budget_follows_mass_and_spends_the_budget():
    sizes = {"a": 100, "b": 100, "c": 100, "d": 400}
    masses = {"a": 4.0, "b": 1.0, "c": 1.0, "d": 2.0}
    budget = 8 * sum(sizes.values())
    ranks = allocate_budget(masses, sizes, budget, max_rank=64)
    spent = sum(ranks[n] * sizes[n] for n in sizes)
    assert spent <= budget and spent >= 0.9 * budget
    assert ranks["a"] == pytest.approx(4 * ranks["b"], abs=1)
    assert ranks["b"] == ranks["c"]
    # d has twice b's mass but four times its size per rank: half b's rank
    assert ranks["d"] == pytest.approx(ranks["b"] / 2, abs=1)
    # min rank holds for a layer with no mass; the cap holds and what it frees goes elsewhere
    assert allocate_budget({"a": 1.0, "b": 1e-9}, {"a": 10, "b": 10}, 100) == {"a": 9, "b": 1}
    capped = allocate_budget({"a": 1.0, "b": 0.2}, {"a": 10, "b": 10}, 10 * 40, max_rank=16)
    assert capped == {"a": 16, "b": 16}
    uniform = allocate_budget({"a": 0.0, "b": 0.0}, {"a": 10, "b": 10}, 160)
    assert uniform == {"a": 8, "b": 8}
    with pytest.raises(ValueError):
        allocate_budget({}, {}, 10)


def tiny_task(classification: bool) -> TaskRun:
    base = make_bert() if classification else make_llama()
    make = cls_examples if classification else lm_examples
    targets = resolve_targets(base, "all-linear")
    recipe = {"target_modules": targets.peft_target_modules,
              "modules_to_save": targets.modules_to_save or None, "steps": 6, "batch_size": 4,
              "eval_every": 3, "lora_alpha": 8, "use_rslora": True, "warmup_ratio": 0.1}
    return TaskRun(lambda: copy.deepcopy(base), make(24), make(8, seed=1), 0, targets, recipe,
                   [0, 1], 3e-3, classification)


@pytest.mark.parametrize("name", ["fisher", "eva", "adalora"])
@pytest.mark.parametrize("classification", [False, True])
def test_each_baseline_chooses_ranks_and_trains(name, classification):
    task = tiny_task(classification)
    result = run_layerwise(name, task, calib=16, max_rank=16, progress=False)
    layers = [t.name for t in task.targets.layers]
    assert set(result.rank_pattern) == set(layers)
    ranks = np.array([result.rank_pattern[n] for n in layers])
    assert ranks.min() >= 0 and ranks.max() <= 16
    budget = BUDGET_RANK * sum(t.d_in + t.d_out for t in task.targets.layers)
    adapter = result.trainable_params - task.targets.head_params
    assert adapter == sum(result.rank_pattern[t.name] * (t.d_in + t.d_out)
                          for t in task.targets.layers)
    if name == "adalora":  # its final masks keep exactly target_r x layers singular values
        assert ranks.sum() == BUDGET_RANK * len(layers)
        assert result.decide_steps == 6
    else:
        assert adapter <= budget * 1.01
        assert result.decide_seconds > 0
    if name == "fisher" or (name == "eva" and not classification):
        # the method redistributed (EVA on the tiny random BERT's near-isotropic activations
        # legitimately keeps r everywhere)
        assert len(set(ranks.tolist())) > 1
    assert [r["seed"] for r in result.runs] == [0, 1]
    assert all(len(r["per_example"]) == len(task.val) for r in result.runs)
    assert np.isfinite(result.per_example()).all()


def test_gradient_pattern_keeps_the_spectrum_shape_within_the_budget():
    task = tiny_task(False)
    layers = [t.name for t in task.targets.layers]
    # a planted spectrum: the first half of the layers asks for 8x the rank of the rest
    task.gradient_pattern = {n: (32 if i < len(layers) // 2 else 4) for i, n in enumerate(layers)}
    task.gradient_seconds = 1.5
    result = run_layerwise("gradient", task, max_rank=16, progress=False)
    high = [result.rank_pattern[n] for n in layers[: len(layers) // 2]]
    low = [result.rank_pattern[n] for n in layers[len(layers) // 2 :]]
    assert min(high) > max(low)
    budget = BUDGET_RANK * sum(t.d_in + t.d_out for t in task.targets.layers)
    assert sum(result.rank_pattern[t.name] * (t.d_in + t.d_out)
               for t in task.targets.layers) <= budget
    assert result.decide_seconds == 1.5 and len(result.runs) == 2
    task.gradient_pattern = {}
    with pytest.raises(LorankError, match="gradient spectrum"):
        run_layerwise("gradient", task, progress=False)
