"""Target resolution and parameter counts, checked against PEFT's own count."""

from __future__ import annotations

import copy

import pytest
from peft import LoraConfig, get_peft_model

from lorank.errors import LorankError
from lorank.targets import memory_estimate, resolve_targets


def test_all_linear_excludes_lm_head(tiny_llama):
    ts = resolve_targets(tiny_llama, "all-linear")
    names = {t.name for t in ts.layers}
    assert len(names) == 2 * 7 and not any("lm_head" in n for n in names)
    assert ts.peft_target_modules == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                      "up_proj", "v_proj"]


def test_presets_split_attention_and_mlp(tiny_llama):
    att = resolve_targets(tiny_llama, "attention")
    mlp = resolve_targets(tiny_llama, "mlp")
    assert {t.name.rsplit(".", 1)[-1] for t in att.layers} == {"q_proj", "k_proj", "v_proj",
                                                               "o_proj"}
    assert {t.name.rsplit(".", 1)[-1] for t in mlp.layers} == {"gate_proj", "up_proj", "down_proj"}


def test_regex_and_names(tiny_llama):
    ts = resolve_targets(tiny_llama, r"re:.*layers\.0\.self_attn\.(q|v)_proj")
    assert [t.name for t in ts.layers] == ["model.layers.0.self_attn.q_proj",
                                           "model.layers.0.self_attn.v_proj"]
    assert ts.peft_target_modules == [t.name for t in ts.layers]  # suffixes would match more
    assert len(resolve_targets(tiny_llama, "q_proj,v_proj").layers) == 4


def test_bert_dense_uses_full_names(tiny_bert):
    ts = resolve_targets(tiny_bert, "all-linear")
    assert not any("pooler" in t.name or "classifier" in t.name for t in ts.layers)
    assert ts.modules_to_save == ["classifier"]
    assert all("." in n for n in ts.peft_target_modules)  # "dense" alone would hit the pooler


def test_no_match_lists_modules(tiny_llama):
    with pytest.raises(LorankError, match="matches no linear module.*q_proj"):
        resolve_targets(tiny_llama, "query_key_value")


def test_rank_above_layer_dims(tiny_llama):
    ts = resolve_targets(tiny_llama, "all-linear")
    ts.check_rank(16)
    with pytest.raises(LorankError, match=r"rank 17 exceeds min\(d_in, d_out\) = 16"):
        ts.check_rank(17)  # k_proj / v_proj are 32 -> 16 with 2 KV heads


@pytest.mark.parametrize("spec", ["all-linear", "attention", "mlp", "q_proj,down_proj",
                                  r"re:.*layers\.1\..*"])
@pytest.mark.parametrize("rank", [1, 4, 16])
def test_params_match_peft_llama(tiny_llama, spec, rank):
    ts = resolve_targets(tiny_llama, spec)
    peft_model = get_peft_model(copy.deepcopy(tiny_llama),
                                LoraConfig(r=rank, target_modules=ts.peft_target_modules))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert ts.params(rank) == trainable


@pytest.mark.parametrize("rank", [2, 8])
def test_params_match_peft_bert_with_head(tiny_bert, rank):
    ts = resolve_targets(tiny_bert, "all-linear")
    config = LoraConfig(r=rank, target_modules=ts.peft_target_modules,
                        modules_to_save=ts.modules_to_save, task_type="SEQ_CLS")
    trainable, _ = get_peft_model(copy.deepcopy(tiny_bert), config).get_nb_trainable_parameters()
    assert ts.params(rank) == trainable


def test_pattern_params(tiny_llama):
    ts = resolve_targets(tiny_llama, "all-linear")
    name = ts.layers[0].name
    pattern = {name: 8}
    expected = ts.params(2) + (8 - 2) * (ts.layers[0].d_in + ts.layers[0].d_out)
    assert ts.params_pattern(2, pattern) == expected


def test_memory_grows_with_rank_and_batch(tiny_llama):
    ts = resolve_targets(tiny_llama, "all-linear")
    m1, m8 = memory_estimate(ts, 1), memory_estimate(ts, 8)
    assert m8.adapter_weights == 8 * m1.adapter_weights
    assert m8.optimizer_states == 2 * m8.adapter_weights
    assert m8.frozen_weights == m1.frozen_weights == 4 * ts.model_params
    assert memory_estimate(ts, 1, batch_size=16).activations > m1.activations
    ckpt = memory_estimate(ts, 1, gradient_checkpointing=True)
    assert ckpt.activations < m1.activations
