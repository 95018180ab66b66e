"""Batches of tokenized examples: padding them together and counting the tokens with loss."""

from __future__ import annotations

from typing import Any

import torch

from lorank.data.formats import IGNORE_INDEX


def collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of tokenized examples into a batch (labels padded with -100)."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    seq_labels = isinstance(examples[0]["labels"], list)
    labels = (
        torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        if seq_labels
        else torch.tensor([int(e["labels"]) for e in examples], dtype=torch.long)
    )
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        mask[i, :n] = 1
        if seq_labels:
            labels[i, :n] = torch.tensor(e["labels"], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def supervised_tokens(example: dict[str, Any]) -> int:
    """Tokens that carry loss (labels shift by one in causal LMs: the first is never predicted)."""
    if isinstance(example["labels"], list):
        return sum(lab != IGNORE_INDEX for lab in example["labels"][1:])
    return 1
