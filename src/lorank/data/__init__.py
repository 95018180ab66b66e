"""Data: load records, detect their format, tokenize with loss masks, split, profile.

Tokenized examples are plain dicts so every stage (estimators, Trainer, sweep) shares them:
  causal LM:       {"input_ids": list[int], "labels": list[int]}   (labels -100 = no loss)
  classification:  {"input_ids": list[int], "labels": int}
Only completion / assistant tokens carry loss; prompts, instructions and user turns do not.

The parts, in the order they run: `reading` (files, folders, hub datasets, their splits),
`formats` (the columns of each format, checks, tokenizing), `prepared` (the tokenized, split
dataset), `batching` (padding examples into batches), `profiling` (the data profile and the
base model's measurements on it). Every name is re-exported here: `from lorank.data import X`.
"""

from lorank.data.batching import collate, supervised_tokens
from lorank.data.formats import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_INPUT,
    FORMATS,
    IGNORE_INDEX,
    NOT_UNICODE,
    TEXT_FIELDS,
    check_columns,
    check_labels,
    detect_format,
    label_vocabulary,
    tokenize,
)
from lorank.data.prepared import (
    PreparedData,
    data_hash,
    prepare,
    prepare_records,
    read_data,
    read_dataset,
)
from lorank.data.profiling import MODEL_MEASUREMENTS, DataProfile, profile, profile_samples
from lorank.data.reading import (
    DATA_SUFFIXES,
    TRAIN_SPLITS,
    UNSPLIT,
    VAL_SPLITS,
    Records,
    load_records,
    load_splits,
    read_records,
)

__all__ = [
    "ALPACA_PROMPT", "ALPACA_PROMPT_INPUT", "DATA_SUFFIXES", "FORMATS", "IGNORE_INDEX",
    "MODEL_MEASUREMENTS", "NOT_UNICODE", "TEXT_FIELDS", "TRAIN_SPLITS", "UNSPLIT", "VAL_SPLITS",
    "DataProfile", "PreparedData", "Records", "check_columns", "check_labels", "collate",
    "data_hash", "detect_format", "label_vocabulary", "load_records", "load_splits", "prepare",
    "prepare_records", "profile", "profile_samples", "read_data", "read_dataset", "read_records",
    "supervised_tokens", "tokenize",
]
