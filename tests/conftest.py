"""Hermetic fixtures: tiny tokenizers trained in-process, no network, no cache."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CORPUS = [
    "Hello, how are you? I am fine, thank you.",
    "The quick brown fox jumps over the lazy dog.",
    "Reverse the list 3 1 2 -> 2 1 3. Sort it: 1 2 3.",
    "system user assistant tool You are a helpful assistant.",
    "Ünïcödé text, emoji 🙂, 中文字符, tabs\tand\nnewlines.",
    # whitespace runs, so that the tokenizer learns merges like "\n\n" and "  " that could cross a boundary
    "<|im_start|>assistant\n\n\n  indented\n\n\tcode\n    more  spaces\n\n<|im_end|>\n\n",
] * 4

CHATML_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
MICROLM_SPECIALS = ["<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|endoftext|>"]
ALL_SPECIALS = sorted(set(CHATML_SPECIALS + LLAMA3_SPECIALS + MICROLM_SPECIALS))


def make_tokenizer(special_tokens=ALL_SPECIALS, vocab_size: int = 400, corpus=CORPUS):
    from sft.protocol.tokenizer import train_bpe

    return train_bpe(corpus, vocab_size=vocab_size, special_tokens=list(special_tokens))


@pytest.fixture(scope="session")
def tokenizer():
    """A byte-level BPE that knows the control tokens of every builtin template."""
    return make_tokenizer()
