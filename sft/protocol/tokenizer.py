"""Tokenizers: a byte-level BPE trained on the user's conversations, or any `tokenizer.json`.

Offsets must be exact character ranges for the labelling rule, so byte-level offset trimming is
turned off wherever a tokenizer would apply it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from sft.protocol.labels import trained_token_mask
from sft.protocol.templates import ChatTemplate, probe_messages
from sft.protocol.types import TemplateError


class TokenizerFileError(ValueError):
    """A tokenizer.json that exists but cannot be loaded (cut short, not a tokenizer)."""


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: list[str]) -> Tokenizer:
    """A byte-level BPE (GPT-2 style: no unknown token, any text round-trips) with the template's
    control tokens added whole, so `<|im_end|>` is one id and never split."""
    tokenizer = Tokenizer(models.BPE())
    # Newlines stand alone: a merge such as "\n\n" or "\n  " would make one token of a template's header
    # newline and the first characters of a reply, and the overlap rule would then train the header.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
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
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # the Rust side raises a bare Exception for any unreadable file
        raise TokenizerFileError(f"the tokenizer file {path} cannot be read ({error})") from None
    _untrim_offsets(tokenizer)
    return tokenizer


def _untrim_offsets(tokenizer: Tokenizer) -> None:
    """GPT-2-style tokenizer.json files trim whitespace out of offsets (`trim_offsets`, also inside a
    Sequence of processors), which would shift span boundaries and leave a lone "\\n" token with an empty
    range. Ids are unaffected; only the reported offsets change."""
    processor = tokenizer.post_processor
    if processor is None:
        return
    state = json.loads(processor.__getstate__())  # the processor's own JSON, as in tokenizer.json
    if _clear_trim_offsets(state):
        processor.__setstate__(json.dumps(state).encode())
        tokenizer.post_processor = processor


def _clear_trim_offsets(node: object) -> bool:
    """Set every `trim_offsets` in a processor's JSON to false; True if one was set."""
    changed = False
    if isinstance(node, dict):
        if node.get("trim_offsets") is True:
            node["trim_offsets"] = False
            changed = True
        node = list(node.values())
    if isinstance(node, list):
        for child in node:
            changed = _clear_trim_offsets(child) or changed
    return changed


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
            f"template {template_name!r} needs control tokens that the tokenizer does not have as single "
            f"ids: {missing}. Use a tokenizer that has them (or tokenizer=bpe, which adds them)."
        )


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """A content hash of the tokenizer, for cache keys."""
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]


def check_template_tokens(template: ChatTemplate, tokenizer: Tokenizer) -> None:
    """The token-level half of the start-up probe: the template's control tokens are single ids, and on
    the probe conversation the tokens trained for each assistant message lie inside its span and end
    with the end-of-turn id. A tokenizer that merges text across a span boundary would train header text
    (or leave content untrained); this says so before any data is read."""
    check_special_tokens(tokenizer, template.special_tokens, template.name)
    messages = probe_messages(template)
    rendered = template.render(messages)
    text = rendered.text
    encoding = tokenizer.encode(text, add_special_tokens=False)
    offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
    eot_id = tokenizer.token_to_id(template.eot)
    trained_messages = [i for i, m in enumerate(messages) if m.role == "assistant" and m.train]
    for index, (start, end) in zip(trained_messages, rendered.assistant_spans, strict=True):
        tokens = np.flatnonzero(trained_token_mask(offsets, [(start, end)]))
        outside = [token for token in tokens if offsets[token, 0] < start or offsets[token, 1] > end]
        problem = None
        if len(tokens) == 0:
            problem = "no token is trained"
        elif outside:
            token_start, token_end = offsets[outside[0]]
            problem = (
                f"token {encoding.tokens[outside[0]]!r} covers {text[token_start:token_end]!r}, across the "
                f"boundary of the trained span {text[start:end]!r}: the tokenizer merges text across it"
            )
        elif encoding.ids[tokens[-1]] != eot_id:
            last = encoding.tokens[tokens[-1]]
            problem = f"its last trained token is {last!r}, not the end-of-turn {template.eot!r}"
        if problem:
            raise TemplateError(
                f"template {template.name!r} with this tokenizer trains the wrong tokens for probe message "
                f"{index} (assistant, {messages[index].content!r}): {problem}. Use a tokenizer whose tokens "
                "split where assistant turns begin and end."
            )


@dataclass
class TokenizerConfig:
    """The `tokenizer` section: `bpe` trains a byte-level BPE on the training conversations (cached by
    content); `file` loads a tokenizer.json (or a model directory holding one)."""

    name: Literal["bpe", "file"] = "bpe"
    vocab_size: int = 1024  # bpe only
    path: str | None = None  # file only

    def __post_init__(self) -> None:
        if self.name == "bpe" and self.vocab_size < 257:
            raise ValueError(f"tokenizer.vocab_size={self.vocab_size}: expected > 256 (the byte alphabet)")
        if self.name == "file" and not self.path:
            raise ValueError(
                "tokenizer.path: required with tokenizer=file (a tokenizer.json or its directory)"
            )
