"""The gradient spectrum's hooks hand layer inputs over in the model's own dtype: on a bf16
model q, k and v read one input tensor, and the hooks must keep it one storage, so that the
input Gram is shared and the replay tape holds (and counts) it once."""

from __future__ import annotations

import pytest
import torch
from conftest import make_llama

from lorank.estimators.gradient import gradient_spectrum, streaming

QKV = [f"model.layers.0.self_attn.{m}_proj" for m in "qkv"]

pytestmark = pytest.mark.usefixtures("one_thread")


def examples(n: int = 24) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        ids = torch.randint(3, 128, (6 + i % 5,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": ids})
    return out


def test_bf16_qkv_share_one_input_storage_in_the_gram_and_the_replay_tape(monkeypatch):
    model = make_llama().to(torch.bfloat16)
    kept: list[tuple[str, torch.Tensor, torch.Tensor, int]] = []
    keep = streaming._Tape.keep

    def spy(self, name, x3, d3):
        before = self.bytes
        keep(self, name, x3, d3)
        kept.append((name, x3, d3, self.bytes - before))

    monkeypatch.setattr(streaming._Tape, "keep", spy)
    gs = gradient_spectrum(model, examples(), QKV, pad_token_id=0, max_rank=4, batch_size=8,
                           replay_mb=64, progress=False)
    assert gs.settings["pass_3"] == "replayed"

    first = {name: (x3, d3, added) for name, x3, d3, added in kept[:3]}
    assert set(first) == set(QKV)
    xs = [first[name][0] for name in QKV]
    assert all(x.dtype == torch.bfloat16 for x in xs)  # no float32 copy per hook
    assert len({x.untyped_storage().data_ptr() for x in xs}) == 1
    # the shared input counted once: the first layer adds x and d, the others only their d
    x_bytes = xs[0].untyped_storage().nbytes()
    added = sorted(first[name][2] - first[name][1].untyped_storage().nbytes() for name in QKV)
    assert added == [0, 0, x_bytes]

    layers = {layer.name: layer for layer in gs.layers}
    owner = next(n for n in QKV if layers[n].inputs.shares_input_with is None)
    assert all(layers[n].inputs.shares_input_with == owner for n in QKV if n != owner)


def test_bf16_results_equal_those_from_float32_copies_of_the_same_tensors(monkeypatch):
    """Converting to float32 inside the accumulation rather than in the hook changes no number:
    the same bf16 values become the same float32 values either way."""
    model = make_llama().to(torch.bfloat16)
    kwargs = dict(pad_token_id=0, max_rank=4, batch_size=8, replay_mb=64, progress=False)
    native = gradient_spectrum(model, examples(), QKV, **kwargs)
    feed = streaming._feed

    def feed_float(tap, half, parts, x3, d3, accumulate, project):
        feed(tap, half, parts, x3.float(), d3.float(), accumulate, project)

    monkeypatch.setattr(streaming, "_feed", feed_float)
    copied = gradient_spectrum(model, examples(), QKV, **kwargs)
    for a, b in zip(native.layers, copied.layers, strict=True):
        assert a.singular_values == b.singular_values
        assert a.strength_ab == b.strength_ab and a.strength_ba == b.strength_ba
        assert a.ranks == b.ranks
