"""Activation spectrum against planted input structure.

Two layers read token embeddings confined to planted subspaces of known dimension (4 and 12)
with equal energy per direction, plus a 0.5%-energy full-rank tail. Every example is a
permutation of the whole vocabulary, so token counts are exactly equal and the Gram matrix is
isotropic inside each subspace: the 90% and 95% energy ranks are the planted dimensions. The pad
token's embedding is large and outside both subspaces, so forgetting the attention mask would
add a dominant direction and change every rank.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lorank.estimators.activation import Gram, activation_spectrum
from lorank.estimators.base import Evidence
from lorank.estimators.gradient import gradient_spectrum

VOCAB, DIM, PAD = 48, 32, 0


pytestmark = pytest.mark.usefixtures("one_thread")


def planted_embedding(rank: int, seed: int) -> torch.Tensor:
    """Rows for tokens 1..VOCAB-1 in a `rank`-dim subspace, with A^T A = c I so that uniform
    token counts give an isotropic Gram matrix there; row 0 (pad) large and orthogonal to it."""
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=gen))
    sub, outside = basis[:, :rank], basis[:, rank:]
    coeff, _ = torch.linalg.qr(torch.randn(VOCAB - 1, rank, generator=gen))
    rows = coeff @ sub.T * (VOCAB - 1) ** 0.5
    tail = torch.randn(VOCAB - 1, DIM, generator=gen)
    rows = rows + tail * (0.005 * rows.pow(2).sum() / tail.pow(2).sum()) ** 0.5
    pad = 10.0 * outside[:, 0:1].T
    return torch.cat([pad, rows])


class TwoPaths(nn.Module):
    """Minimal model with the forward signature lorank uses: two linear layers, each reading
    its own planted embedding."""

    def __init__(self, rank_a: int, rank_b: int):
        super().__init__()
        self.emb_a = nn.Embedding.from_pretrained(planted_embedding(rank_a, 1))
        self.emb_b = nn.Embedding.from_pretrained(planted_embedding(rank_b, 2))
        self.lin_a = nn.Linear(DIM, DIM)
        self.lin_b = nn.Linear(DIM, 24)
        self.out = nn.Linear(DIM + 24, VOCAB)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        h = torch.cat([self.lin_a(self.emb_a(input_ids)), self.lin_b(self.emb_b(input_ids))], -1)
        return type("Out", (), {"logits": self.out(torch.relu(h))})()


def permutation_examples(n: int, seed: int) -> list[dict]:
    """Each example is one or two permutations of tokens 1..VOCAB-1: equal token counts and
    mixed lengths (so batches carry padding)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.cat([torch.randperm(VOCAB - 1, generator=gen) + 1 for _ in range(1 + i % 2)])
        out.append({"input_ids": ids.tolist(), "labels": ids.tolist()})
    return out


@pytest.mark.parametrize("exact_max_dim", [4096, 0])
def test_planted_input_subspaces_give_the_planted_energy_ranks(exact_max_dim: int):
    model = TwoPaths(rank_a=4, rank_b=12)
    spec = activation_spectrum(
        model,
        permutation_examples(20, 0),
        ["lin_a", "lin_b"],
        pad_token_id=PAD,
        batch_size=6,
        exact_max_dim=exact_max_dim,
        sketch_rank=24,
        progress=exact_max_dim == 0,
    )
    a, b = spec.layers
    assert a.method == ("exact" if exact_max_dim else "sketch")
    assert a.energy_ranks == {"0.9": 4, "0.95": 4}
    assert b.energy_ranks == {"0.9": 11, "0.95": 12}  # 11/12 of the energy = 0.917 >= 0.9
    assert a.n_tokens == b.n_tokens == 30 * (VOCAB - 1)  # padding excluded
    assert abs(a.participation_ratio - 4) < 0.2 and abs(b.participation_ratio - 12) < 0.5
    ratios = a.explained_ratios()
    assert np.allclose(ratios[:4], 0.995 / 4, atol=0.01)


@pytest.mark.parametrize("n_tokens", [5, 20, 60])
def test_input_sketch_with_fewer_tokens_than_columns_gives_the_exact_eigenvalues(n_tokens):
    """C of rank n_tokens < sketch columns: C Omega's Nystrom core is then singular, and the
    float32 products leave it indefinite (Cholesky failed on a 6-example dataset). The sketch
    spans all of C's range, so its eigenvalues are C's own, and zero beyond n_tokens."""
    gen = torch.Generator().manual_seed(n_tokens)
    d = 300
    x = torch.randn(n_tokens, d, generator=gen) * torch.logspace(0, -2, d)
    gram = Gram(d, exact_max_dim=0, sketch_rank=64, seed=0, device=torch.device("cpu"))
    for rows in x.split(7):
        gram.add(rows)
    exact = torch.linalg.eigvalsh(x.double().T @ x.double()).flip(0).numpy()
    eig = gram.eigenvalues()
    assert eig.shape == (64,)
    assert np.allclose(eig[:n_tokens], exact[:n_tokens], rtol=1e-3)
    assert np.all(eig[n_tokens:] < 1e-3 * exact[0])
    empty = Gram(d, exact_max_dim=0, sketch_rank=64, seed=0, device=torch.device("cpu"))
    assert not np.any(empty.eigenvalues())


@pytest.mark.parametrize("exact_max_dim", [1024, 0])
def test_gradient_spectrum_reports_the_planted_input_ranks_from_its_own_passes(exact_max_dim):
    """The gradient estimator reads each layer's inputs in its hooks: every example once (not
    again in its third pass), real tokens only, and the same spectrum as activation_spectrum."""
    model = TwoPaths(rank_a=4, rank_b=12)
    examples = permutation_examples(20, 0)
    gs = gradient_spectrum(
        model,
        examples,
        ["lin_a", "lin_b"],
        pad_token_id=PAD,
        max_rank=4,
        batch_size=6,
        exact_max_dim=exact_max_dim,
        input_sketch_rank=24,
        progress=False,
    )
    a, b = gs.layers
    assert a.inputs.method == ("exact" if exact_max_dim else "sketch")
    assert a.inputs.energy_ranks == {"0.9": 4, "0.95": 4}
    assert b.inputs.energy_ranks == {"0.9": 11, "0.95": 12}
    assert a.inputs.n_tokens == b.inputs.n_tokens == 30 * (VOCAB - 1)  # once each, no padding
    rows = {row["layer"]: row for row in gs.layer_table()}
    assert (rows["lin_a"]["inputs90"], rows["lin_b"]["inputs90"]) == (4, 11)
    assert rows["lin_b"]["inputs95"] == 12
    layer_json = json.loads(json.dumps(gs.to_dict()))["layers"][1]
    assert layer_json["inputs"]["energy_ranks"] == {"0.9": 11, "0.95": 12}
    if exact_max_dim:
        reference = activation_spectrum(
            model, examples, ["lin_a", "lin_b"], pad_token_id=PAD, progress=False
        )
        for ours, theirs in zip(gs.layers, reference.layers, strict=True):
            assert np.allclose(ours.inputs.eigenvalues, theirs.eigenvalues, rtol=1e-4, atol=1e-3)


def test_allocation_follows_the_planted_dimensions():
    """EVA redistribution of 8 ranks per layer over two layers: the 16 components with the
    largest explained-variance ratios are a's 4 (~0.25 each) and b's 12 (~0.083 each)."""
    model = TwoPaths(rank_a=4, rank_b=12)
    spec = activation_spectrum(
        model, permutation_examples(20, 0), ["lin_a", "lin_b"], pad_token_id=PAD, progress=False
    )
    assert spec.allocate(8) == {"lin_a": 4, "lin_b": 12}
    assert spec.allocate(1) == {"lin_a": 1, "lin_b": 1}
    assert spec.allocate(64) == {"lin_a": 32, "lin_b": 24}  # capped by min(d_in, d_out)
    ev = spec.to_evidence(budget_rank=8)
    assert isinstance(ev, Evidence) and ev.kind == "estimate" and ev.suggested_rank is None
    assert ev.rank_pattern == {"lin_a": 4, "lin_b": 12}
    assert ev.details["layer_table"][1]["energy90"] == 11
    json.dumps(ev.to_dict())


def test_llama_targets_sharing_an_input_share_one_accumulator():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config).eval()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "layers" in n]
    gen = torch.Generator().manual_seed(0)
    examples = [
        {"input_ids": ids, "labels": ids}
        for ids in (torch.randint(1, 64, (int(n),), generator=gen).tolist() for n in range(5, 25))
    ]
    spec = activation_spectrum(model, examples, names, pad_token_id=0, progress=False)
    layers = {layer.name: layer for layer in spec.layers}
    q, k, v = (layers[f"model.layers.0.self_attn.{p}_proj"] for p in "qkv")
    assert q.shares_input_with is None
    assert k.shares_input_with == v.shares_input_with == q.name
    assert k.eigenvalues == q.eigenvalues
    assert layers["model.layers.0.mlp.down_proj"].d_in == 64
    assert all(layer.n_tokens == sum(range(5, 25)) for layer in spec.layers)


def test_bad_input_raises():
    model = TwoPaths(4, 12)
    examples = permutation_examples(4, 0)
    with pytest.raises(ValueError, match="target_names is empty"):
        activation_spectrum(model, examples, [], pad_token_id=PAD)
    with pytest.raises(ValueError, match="unknown target 'emb_a'"):
        activation_spectrum(model, examples, ["emb_a"], pad_token_id=PAD)
    with pytest.raises(ValueError, match="energy levels"):
        activation_spectrum(model, examples, ["lin_a"], pad_token_id=PAD, energy=(1.5,))
