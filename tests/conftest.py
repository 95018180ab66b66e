"""Tiny models and tokenizers built inside the tests: the math is checked without downloads."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "[CLS]", "[SEP]", "<|user|>", "<|assistant|>",
            "<|system|>"]


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII with a chat template."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": SPECIALS[4:]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread and do not fight other processes for 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def make_llama(vocab_size: int = 128, hidden: int = 32, layers: int = 2, seed: int = 0,
               intermediate: int = 64, kv_heads: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=kv_heads, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def make_bert(num_labels: int = 3, vocab_size: int = 128, seed: int = 0
              ) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
                        num_labels=num_labels)
    return BertForSequenceClassification(config).eval()


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    return make_llama()


@pytest.fixture
def tiny_bert() -> BertForSequenceClassification:
    return make_bert()


@pytest.fixture
def tiny_llama_dir(tmp_path: Path) -> Path:
    """A tiny Llama saved as a local HF directory (safetensors) with its tokenizer."""
    path = tmp_path / "tiny-llama"
    make_llama().save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def tiny_bert_dir(tmp_path: Path) -> Path:
    path = tmp_path / "tiny-bert"
    model = make_bert()
    model.config.architectures = ["BertModel"]
    model.bert.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def pc_data(tmp_path: Path) -> Path:
    rows = [{"prompt": f"Q{i}: what is {i}+{i}?", "completion": f" {2 * i}"} for i in range(40)]
    return write_jsonl(tmp_path / "pc.jsonl", rows)


@pytest.fixture
def cls_data(tmp_path: Path) -> Path:
    words = ["apple pie", "green tree", "fast car", "blue sky", "old book", "red wine"]
    rows = [{"text": f"{words[i % 6]} {i}", "label": ["food", "nature", "thing"][i % 3]}
            for i in range(36)]
    return write_jsonl(tmp_path / "cls.jsonl", rows)
