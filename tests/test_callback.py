"""RankCallback: the update's singular values from the factors, effective rank on planted
updates, the once-only saturation warning, and its numbers reaching a real Trainer's logs."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import make_llama
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

import lorank
from lorank.callback import (
    RankCallback,
    adapter_ranks,
    effective_rank,
    lora_factors,
    update_singular_values,
)


def test_singular_values_from_factors_match_the_full_update():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 40, generator=g), torch.randn(30, 6, generator=g)
    full = torch.linalg.svdvals(b @ a)
    assert torch.allclose(update_singular_values(a, b), full[:6], rtol=1e-4)
    assert full[6:].abs().max() < 1e-3


@pytest.mark.parametrize("k", [1, 3, 8])
def test_effective_rank_of_a_planted_update_is_its_rank(k):
    s = torch.tensor([2.0] * k + [0.0] * (8 - k))
    assert effective_rank(s) == pytest.approx(k)
    assert effective_rank(torch.zeros(4)) == 0.0


def _peft_model(rank: int = 4):
    return get_peft_model(make_llama(), LoraConfig(r=rank, target_modules=["q_proj", "v_proj"]))


class _State:
    def __init__(self, step: int, max_steps: int = 4):
        self.global_step, self.max_steps = step, max_steps
        self.log_history = [{"loss": 1.0, "step": step}]


def test_saturation_warns_once_and_a_fresh_adapter_does_not():
    model = _peft_model()
    callback = RankCallback(every=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        callback.on_step_end(None, _State(1), None, model=model)  # B = 0: rank unused
    assert callback.latest["lorank/effective_rank_max"] == 0.0
    g = torch.Generator().manual_seed(0)
    for _, a, b in lora_factors(model):  # orthogonal factors: every direction equally used
        a.data = torch.linalg.qr(torch.randn(a.shape[1], a.shape[0], generator=g))[0].T.clone()
        b.data = torch.linalg.qr(torch.randn(b.shape[0], b.shape[1], generator=g))[0].clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        callback.on_step_end(None, _State(1, max_steps=10), None, model=model)  # too early
    with pytest.warns(UserWarning, match="nearly all of their rank"):
        callback.on_step_end(None, _State(2), None, model=model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        callback.on_step_end(None, _State(3), None, model=model)  # once only
    assert all(lay.effective == pytest.approx(4, rel=1e-3) for lay in adapter_ranks(model))
    state, logs = _State(3), {"loss": 1.0}
    callback.on_log(None, state, None, logs=logs)
    assert logs["lorank/rank_use"] == pytest.approx(1.0, rel=1e-3)
    assert state.log_history[-1]["lorank/saturated_layers"] == len(adapter_ranks(model))


class _Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        ids = torch.arange(i, i + 12) % 90 + 10
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def test_numbers_reach_a_real_trainers_log_history(tmp_path, one_thread):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, logging_steps=2,
                             per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=_peft_model(), args=args, train_dataset=_Tokens())
    callback = lorank.RankCallback.attach(trainer, every=2)
    assert trainer.callback_handler.callbacks[0] is callback
    trainer.train()
    logged = [h for h in trainer.state.log_history if "lorank/effective_rank_mean" in h]
    assert logged and all(0 < h["lorank/effective_rank_mean"] <= 4 for h in logged)
