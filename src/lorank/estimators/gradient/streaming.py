"""The passes over the data: output-gradient hooks on the target layers (`_Streaming`), the
tape that keeps half A's layer inputs and output gradients for pass 3 (`_Tape`), and the
forward graphs held while a classifier's head is fitted (`_Held`).

All parameters stay frozen and no full-weight .grad is ever stored (`lorank.hooks`). Pass 3
needs only half A's (x_t, d_t) again, not a new forward and backward: when they fit in
`replay_mb`, pass 1 keeps them and pass 3 replays them, the same tensors in the same order, so
the same numbers. A classifier's head is fitted from passes 1-2's own forward, their graphs
held until the fit, when they fit in `replay_mb` too; else from a forward without gradients,
as `lorank.heads.fit_head_on_frozen_features` does. Memory kept alive is counted per storage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from lorank.data import collate
from lorank.estimators.activation import real_tokens, share_inputs
from lorank.estimators.gradient.accumulate import _feed, _Tap
from lorank.estimators.gradient.plan import _Plan
from lorank.heads import _head_features, _head_input_hook, find_classification_head, train_head
from lorank.hooks import OutputGradientTaps
from lorank.losses import _summed, summed_loss


class _Streaming:
    """Runs passes over the plan with output-gradient hooks on the target layers
    (`lorank.hooks`: all parameters frozen, no full-weight .grad ever stored)."""

    def __init__(self, model: nn.Module, taps: list[_Tap], replay_mb: float = 0.0,
                 tape_tokens: int = 0):
        self.model = model
        self.by_name = {tap.name: tap for tap in taps}
        # in the model's dtype: q, k and v hand over one input storage (shared Gram, one copy
        # on the tape); `_feed` takes the products in float32
        self.hooks = OutputGradientTaps(model, {t.name: t.module for t in taps}, self._on_grad,
                                        as_float32=False)
        self.ctx: dict[str, Any] = {}
        self.tape = _Tape(replay_mb * 2**20, tape_tokens)  # half A's (x, d), for pass 3
        self.owner: dict[str, str] = {}  # target -> target whose input Gram it shares
        self.first: dict[str, torch.Tensor] = {}  # first batch's inputs, alive until compared
        self.head: nn.Module | None = None  # a classifier's head, once `hold_and_fit_head` ran

    def __enter__(self) -> _Streaming:
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.hooks.__exit__(*exc)

    def _on_grad(self, name: str, x3: torch.Tensor, d3: torch.Tensor) -> None:
        tap, ctx = self.by_name[name], self.ctx
        _feed(tap, ctx["half"], ctx["parts"], x3, d3, ctx["accumulate"], ctx["project"])
        if ctx["accumulate"]:
            self._read_inputs(tap, x3, ctx["mask"])
        if ctx["record"]:
            self.tape.keep(name, x3, d3)

    def replay(self, half: int, bar: Any) -> None:
        """Pass 3 without a forward+backward: project the batches recorded in pass 1, in
        their order (the sums come out as the live pass's), then free them."""
        for parts, tensors in self.tape.batches:
            for name, (x3, d3) in tensors.items():
                _feed(self.by_name[name], half, parts, x3, d3, accumulate=False, project=True)
            bar()
        self.tape.clear()

    def _read_inputs(self, tap: _Tap, x3: torch.Tensor, mask: torch.Tensor) -> None:
        """Add the layer's real-token inputs to its Gram matrix, once per distinct input tensor
        (q, k and v read the same one): sharing is decided on the first batch, as in
        `activation_spectrum`."""
        if not self.owner:
            self.first[tap.name] = x3
        elif self.owner[tap.name] != tap.name:
            return
        tap.gram.add(real_tokens(x3, mask))

    def _share_inputs(self) -> None:
        grams = {name: tap.gram for name, tap in self.by_name.items()}
        share_inputs(list(self.by_name), self.first, self.owner, grams)
        for name, tap in self.by_name.items():
            tap.gram = grams[name]
            tap.shares_input_with = None if self.owner[name] == name else self.owner[name]
        self.first.clear()

    def hold_and_fit_head(
        self, examples: list[dict], plan: _Plan, *, pad: int, limit_bytes: float, seed: int,
        bar: Any,
    ) -> tuple[list[list[_Held | None]] | None, dict[str, Any]]:
        """Fit a classifier's new head on frozen features of the whole calibration set
        before any gradient is read, from the forward passes 1 and 2 need anyway: each batch's
        graph is kept (`_Held`), and passes 1 and 2 then run only the backward, through the
        fitted head. One forward over the set instead of two (MiniLM-L6, 256 examples: the
        head fit's own forward was half a frozen forward+backward).

        Kept only while every batch's graph, scaled to the whole set, fits in `limit_bytes`
        (the autograd's saved tensors and the layer inputs the hooks hold, counted per
        storage), and only for a head that gives one vector per example (for a per-token head,
        `score`, the model picks the pooled token itself). Otherwise the graphs are dropped
        after the first batch (no more than one pass keeps anyway) and the rest of the
        features come from forwards without gradients, as `fit_head_on_frozen_features`'s:
        returns None for the held graphs then. The fitted head is the same either way."""
        name, head = find_classification_head(self.model)
        self.head = head  # what the held batches' backward reads through
        device = next(self.model.parameters()).device
        # the weights' storages count as seen: saved for backward, they take no new memory
        counted = {t.untyped_storage().data_ptr()
                   for t in (*self.model.parameters(), *self.model.buffers())}
        size = {"bytes": 0, "tokens": 0}
        total = plan.tokens(examples, 0) + plan.tokens(examples, 1)

        def count(t: torch.Tensor) -> torch.Tensor:
            size["bytes"] += _new_storage_bytes(t, counted)
            return t

        def count_input(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            count(inputs[0])  # what OutputGradientTaps' hook holds for the backward

        held: list[list[_Held | None]] | None = [[], []]
        cached: list[dict[str, torch.Tensor]] = []
        seen: dict[str, Any] = {}
        handles = [head.register_forward_hook(_head_input_hook(seen))]
        handles += [tap.module.register_forward_hook(count_input)
                    for tap in self.by_name.values()]
        try:
            for half in (0, 1):
                for idx, _, _ in plan.batches[half]:
                    batch = {k: v.to(device)
                             for k, v in collate([examples[i] for i in idx], pad).items()}
                    inputs = {"input_ids": batch["input_ids"],
                              "attention_mask": batch["attention_mask"]}
                    if held is None:
                        with torch.no_grad():
                            self.model(**inputs)
                    else:
                        with (self.hooks.reading(len(idx)),
                              torch.autograd.graph.saved_tensors_hooks(count, lambda t: t)):
                            self.model(**inputs)
                        size["tokens"] += batch["input_ids"].numel()
                    feats = seen["x"]
                    cached.append(_head_features(seen, batch))
                    if held is not None:
                        if (seen["per_token"]
                                or size["bytes"] * total / size["tokens"] > limit_bytes):
                            held = None  # the graphs go with it
                            for h in handles[1:]:
                                h.remove()
                            del handles[1:]
                        else:
                            held[half].append(_Held(feats, batch["labels"],
                                                    batch["attention_mask"],
                                                    batch["input_ids"].numel()))
                    bar()
        finally:
            for h in handles:
                h.remove()
        report = train_head(self.model, head, cached, seed=seed)
        return held, {"head": name, **report,
                      "features": "held forward of passes 1-2" if held is not None
                      else "forward without gradients"}

    def run(
        self,
        examples: list[dict],
        plan: _Plan,
        *,
        half: int,
        accumulate: bool,
        project: bool,
        pad: int,
        bar: Any,
        record: bool = False,
        held: list[_Held | None] | None = None,
    ) -> None:
        """One pass over a half's batches: forward and backward, or with `held` (the half's
        batches whose forward ran in `hold_and_fit_head`) only the backward, through the
        fitted head; each held graph is freed once read."""
        device = next(self.model.parameters()).device
        for b, (idx, chunks, groups) in enumerate(plan.batches[half]):
            parts = []
            for chunk in np.unique(chunks):  # rows None: the whole batch is one chunk
                rows = np.nonzero(chunks == chunk)[0]  # one run: `_plan` orders rows by chunk
                assert rows[-1] - rows[0] + 1 == len(rows), "a chunk's rows must be one run"
                whole = len(rows) == len(chunks)
                parts.append((int(chunk), None if whole else slice(int(rows[0]), int(rows[-1]) + 1),
                              torch.as_tensor(groups[rows], device=device)))
            if held is None:
                batch = {k: v.to(device)
                         for k, v in collate([examples[i] for i in idx], pad).items()}
                mask, tokens = batch["attention_mask"], batch["input_ids"].numel()
            else:
                item, held[b] = held[b], None
                assert item is not None
                mask, tokens = item.mask, item.tokens
            self.ctx = {
                "half": half,
                "accumulate": accumulate,
                "project": project,
                "record": record,
                "parts": parts,
                "mask": mask,
            }
            if record:
                self.tape.start_batch(parts, tokens)
            with self.hooks.reading(len(idx)):
                if held is None:
                    loss = summed_loss(self.model, batch)
                else:
                    loss = _summed(self.head(item.feats), item.labels)
                if not loss.requires_grad:
                    raise ValueError("the loss does not depend on any target layer")
                loss.backward()
            self.ctx = {}
            if accumulate and not self.owner:
                self._share_inputs()
            bar()


@dataclass
class _Held:
    """A batch whose forward ran before the head was fitted, its graph kept for the backward:
    the head's input (carrying that graph), the labels, the attention mask, token positions."""

    feats: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    tokens: int


class _Tape:
    """Half A's layer inputs and output gradients, batch by batch, for the replay of pass 3:
    the hooks' own tensors, kept alive. Memory is counted per storage, so an input that q, k
    and v all read counts once. Dropped for good as soon as the batches kept so far, scaled
    to the half's `total_tokens`, would pass `limit_bytes` (after the first batch on a model
    too large for it, so at most one batch is held in vain), or the bytes themselves do."""

    def __init__(self, limit_bytes: float, total_tokens: int):
        self.limit, self.total, self.bytes, self.tokens = limit_bytes, total_tokens, 0, 0
        self.on, self.dropped = limit_bytes > 0, False
        self.batches: list[tuple[list[tuple], dict[str, tuple[torch.Tensor, torch.Tensor]]]] = []
        self.storages: set[int] = set()

    @property
    def complete(self) -> bool:
        return self.on and bool(self.batches)

    def start_batch(self, parts: list[tuple], tokens: int) -> None:
        if self.on and self.tokens and self.bytes * self.total / self.tokens > self.limit:
            self._drop()
        if self.on:
            self.batches.append((parts, {}))
            self.tokens += tokens

    def keep(self, name: str, x3: torch.Tensor, d3: torch.Tensor) -> None:
        if not self.on:
            return
        self.bytes += _new_storage_bytes(x3, self.storages) + _new_storage_bytes(d3, self.storages)
        if self.bytes > self.limit:
            self._drop()
            return
        self.batches[-1][1][name] = (x3, d3)

    def _drop(self) -> None:
        self.clear()
        self.on, self.dropped = False, True

    def clear(self) -> None:
        self.batches, self.storages, self.bytes, self.tokens = [], set(), 0, 0


def _new_storage_bytes(t: torch.Tensor, seen: set[int]) -> int:
    """The bytes of `t`'s storage if it is not in `seen` (which it then joins), else 0: memory
    kept alive is counted once per storage, however many tensors view it. Only for tensors
    that stay alive while counted, so that no address is reused and matched stale."""
    storage = t.untyped_storage()
    if storage.data_ptr() in seen:
        return 0
    seen.add(storage.data_ptr())
    return storage.nbytes()
