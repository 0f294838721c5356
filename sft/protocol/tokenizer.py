"""Tokenizers: a byte-level BPE trained on the user's conversations, or any `tokenizer.json`.

Offsets must be exact character ranges for the labelling rule, so byte-level offset trimming is
turned off wherever a tokenizer would apply it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from sft.protocol.types import TemplateError


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: list[str]) -> Tokenizer:
    """A byte-level BPE (GPT-2 style: no unknown token, any text round-trips) with the template's
    control tokens added whole, so `<|im_end|>` is one id and never split."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load `tokenizer.json`, or the one inside a model directory."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer.path: no tokenizer file at {path}")
    tokenizer = Tokenizer.from_file(str(path))
    _untrim_offsets(tokenizer)
    return tokenizer


def _untrim_offsets(tokenizer: Tokenizer) -> None:
    """GPT-2-style tokenizer.json files trim whitespace out of offsets, which would leave a lone "\\n"
    token with an empty range (never trained). Ids are unaffected; only the reported offsets change."""
    processor = tokenizer.post_processor
    if isinstance(processor, processors.ByteLevel):
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)


def check_special_tokens(tokenizer: Tokenizer, special_tokens: Iterable[str], template_name: str) -> None:
    """Each control token of the template must be a single id in the vocabulary, or rendering would
    tokenize it as ordinary text and the model could never emit the end-of-turn token."""
    missing = []
    for token in special_tokens:
        ids = tokenizer.encode(token, add_special_tokens=False).ids
        if len(ids) != 1 or tokenizer.token_to_id(token) is None:
            missing.append(token)
    if missing:
        raise TemplateError(
            f"template {template_name!r} needs control tokens that the tokenizer does not have as single ids: "
            f"{missing}. Use a tokenizer that has them (or tokenizer=bpe, which adds them)."
        )


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """A content hash of the tokenizer, for cache keys."""
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]


def bpe_cache_key(texts_digest: str, vocab_size: int, special_tokens: list[str]) -> str:
    payload = json.dumps([texts_digest, vocab_size, special_tokens])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def check_template_tokens(template, tokenizer: Tokenizer) -> None:
    """The token-level half of the start-up probe: on the probe conversation, the trained tokens must
    decode to exactly the assistant spans' text — no header piece, no lost end-of-turn token. A tokenizer
    whose tokens straddle a span boundary would train text outside the assistant's turn."""
    from sft.protocol.labels import trained_token_mask
    from sft.protocol.templates import probe_messages

    rendered = template.render(probe_messages(template))
    encoding = tokenizer.encode(rendered.text, add_special_tokens=False)
    mask = trained_token_mask(np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2), rendered.assistant_spans)
    ids = np.asarray(encoding.ids)
    run_starts = np.flatnonzero(mask & ~np.concatenate([[False], mask[:-1]]))
    run_ends = np.flatnonzero(mask & ~np.concatenate([mask[1:], [False]])) + 1
    decoded = [tokenizer.decode(ids[a:b].tolist(), skip_special_tokens=False) for a, b in zip(run_starts, run_ends)]
    expected = [rendered.text[a:b] for a, b in rendered.assistant_spans]
    if decoded != expected:
        raise TemplateError(
            f"template {template.name!r} with this tokenizer trains the wrong tokens on the probe conversation: "
            f"trained tokens decode to {decoded!r}, the assistant spans are {expected!r}. The tokenizer merges "
            "text across a span boundary (or lacks a control token)."
        )
