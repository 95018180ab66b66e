"""Target resolution and parameter counts, checked against PEFT's own count."""

from __future__ import annotations

import copy

import pytest
from peft import LoraConfig, get_peft_model

from lorank.errors import LorankError
from lorank.targets import layer_kinds, memory_estimate, resolve_targets


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


def test_layer_kinds_tell_berts_dense_layers_apart(tiny_bert, tiny_llama):
    """The gradient report plots one figure per kind: BERT's three "dense" layers per block
    (attention output, intermediate, output) are different kinds, Llama's keep their names."""
    bert = [t.name for t in resolve_targets(tiny_bert, "all-linear").layers]
    kinds = layer_kinds(bert)
    assert set(kinds.values()) == {"query", "key", "value", "attention.output.dense",
                                   "intermediate.dense", "output.dense"}
    assert kinds["bert.encoder.layer.1.output.dense"] == "output.dense"
    llama = [t.name for t in resolve_targets(tiny_llama, "all-linear").layers]
    assert set(layer_kinds(llama + ["lm_head"]).values()) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}


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


def test_memory_counts_the_architecture(tiny_llama, tiny_bert):
    """Llama (SDPA, no dropout) keeps no attention scores, so a fixed token count costs the
    same at any length; BERT (attention dropout) keeps three b*a*s^2 tensors, so it grows."""
    llama, bert = resolve_targets(tiny_llama, "all-linear"), resolve_targets(tiny_bert,
                                                                             "all-linear")
    assert (llama.gated_mlp, llama.attention_scores, llama.dropout) == (True, 0, False)
    assert (bert.gated_mlp, bert.attention_scores, bert.dropout) == (False, 3, True)
    same = [memory_estimate(llama, 4, batch_size=b, seq_len=s).activations
            for b, s in ((4, 64), (2, 128), (1, 256))]
    assert len(set(same)) == 1
    grows = [memory_estimate(bert, 4, batch_size=b, seq_len=s).activations
             for b, s in ((4, 64), (2, 128), (1, 256))]
    assert grows[0] < grows[1] < grows[2]


@pytest.mark.parametrize("which", ["llama", "bert"])
def test_estimate_tracks_the_tensor_peak(tiny_llama, tiny_bert, which):
    """Activations + adapter gradients against the peak of live tensors in one LoRA forward and
    backward (`TensorPeak`, what CUDA's max_memory_allocated counts): measured 1.04x (Llama) and
    0.92-0.94x (BERT) on these shapes."""
    import torch

    from lorank.targets import TensorPeak

    model = tiny_llama if which == "llama" else tiny_bert
    ts = resolve_targets(model, "all-linear")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=ts.peft_target_modules,
                                                  modules_to_save=ts.modules_to_save or None))
    peft_model.train()
    weights = {p.untyped_storage().data_ptr() for p in peft_model.parameters()}
    for b, s in ((4, 64), (2, 128)):
        ids = torch.randint(3, 100, (b, s), generator=torch.Generator().manual_seed(0))
        labels = torch.zeros(b, dtype=torch.long) if which == "bert" else ids
        with TensorPeak(weights) as tracked:
            peft_model(input_ids=ids, labels=labels).loss.backward()
        est = memory_estimate(ts, 4, batch_size=b, seq_len=s)
        ratio = (est.activations + est.gradients) / tracked.peak
        assert 0.85 < ratio < 1.2, (b, s, ratio)
