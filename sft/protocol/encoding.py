"""Rows → (input_ids, labels): tokens labelled without the tokenizer's offsets, for byte-level BPEs.

Tracking offsets costs the Rust tokenizer about a fifth of its instructions (`encode_batch_fast` skips
it). A byte-level BPE (GPT-2, Llama 3, Qwen, DeepSeek, GPT-OSS) cuts a text's UTF-8 bytes into tokens in
order, each token always the same bytes, so the token boundaries are the running sum of the tokens'
byte lengths: that sum places each assistant span's ends among the tokens, by the same overlap rule as
`labels.trained_token_mask` on the offsets.

This holds only where the tokenizer neither adds, drops nor changes text before cutting it. So a
tokenizer qualifies only when every step is one known to keep the bytes (no normalizer, or NFC on text
that is already NFC; splitting pre-tokenizers; a ByteLevel without prefix space; added tokens that strip
nothing; all 256 bytes in the vocabulary, so nothing is unknown), and each text's byte lengths must
still add up to its own; anything else is encoded with offsets.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tokenizers import Encoding, Tokenizer, pre_tokenizers

from sft.protocol.labels import labels_from_encoding, labels_from_ranges
from sft.protocol.types import RenderedChat

SPLITTING_PRE_TOKENIZERS = {"Split", "Digits", "Punctuation", "ByteLevel"}
NFC_ONLY = ({"type": "NFC"}, {"type": "Sequence", "normalizers": [{"type": "NFC"}]})


class RowEncoder:
    """Encodes rendered rows and labels their tokens: from byte lengths where the tokenizer qualifies
    (ByteLevelOffsets), else, or for a text they cannot place, from the tokenizer's offsets."""

    def __init__(self, tokenizer: Tokenizer | None):
        self.tokenizer = tokenizer
        self.byte_offsets = ByteLevelOffsets.of(tokenizer)

    def encode_batch(self, texts: list[str]) -> list[Encoding]:
        if self.byte_offsets is None:
            return self.tokenizer.encode_batch(texts, add_special_tokens=False)
        return self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)

    def labels(self, rendered: RenderedChat, encoding: Encoding) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, labels) of a row and its encoding from `encode_batch`."""
        if self.byte_offsets is not None:
            ids = np.fromiter(encoding.ids, dtype=np.int64, count=len(encoding))
            labels = self.byte_offsets.labels(rendered.text, ids, rendered.assistant_spans)
            if labels is not None:
                return ids, labels
            encoding = self.tokenizer.encode(rendered.text, add_special_tokens=False)  # with offsets
        return labels_from_encoding(encoding, rendered.assistant_spans)


@dataclass(frozen=True)
class ByteLevelOffsets:
    lengths: np.ndarray  # int64, each id's length in UTF-8 bytes
    nfc: bool  # the tokenizer NFC-normalizes: a text that is not NFC already needs the real offsets

    @classmethod
    def of(cls, tokenizer: Tokenizer | None) -> ByteLevelOffsets | None:
        """The byte lengths of the tokenizer's ids, or None when its tokens are not plain byte pieces."""
        if tokenizer is None or type(tokenizer.model).__name__ != "BPE" or tokenizer.pre_tokenizer is None:
            return None
        try:
            normalizer = _state(tokenizer.normalizer) if tokenizer.normalizer is not None else None
            pre_tokenizer = _state(tokenizer.pre_tokenizer)
        except Exception:  # a custom (Python) component has no settings to read
            return None
        nfc = normalizer is not None
        if (nfc and normalizer not in NFC_ONLY) or not _keeps_bytes(pre_tokenizer):
            return None
        vocab = tokenizer.get_vocab(with_added_tokens=False)
        byte_alphabet = set(pre_tokenizers.ByteLevel.alphabet())
        if not byte_alphabet <= vocab.keys():
            return None
        lengths = np.zeros(tokenizer.get_vocab_size(with_added_tokens=True), dtype=np.int64)
        for token, index in vocab.items():
            if not token or not byte_alphabet.issuperset(token):
                return None
            lengths[index] = len(token)  # one character of the byte alphabet per byte
        for index, added in tokenizer.get_added_tokens_decoder().items():
            if added.lstrip or added.rstrip:  # it would take the whitespace around it too
                return None
            lengths[index] = len(added.content.encode())
        return cls(lengths, nfc)

    def labels(self, text: str, ids: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray | None:
        """Labels of `ids` (the tokens of `text`), or None when this text needs the real offsets."""
        if self.nfc and not unicodedata.is_normalized("NFC", text):
            return None
        bounds = [position for span in spans if span[1] > span[0] for position in span]
        in_bytes = _byte_positions(text, [*bounds, len(text)])
        if in_bytes is None:
            return None
        ends = self.lengths.take(ids).cumsum()  # token i holds bytes [ends[i - 1], ends[i]), ends rising
        if (ends[-1] if len(ends) else 0) != in_bytes[-1]:
            return None
        # Span [S, E) trains token i iff ends[i] > S and ends[i - 1] < E: from the count of ends <= S
        # (those < S + 1) through the count of ends < E, inclusive.
        queries = [byte + 1 if k % 2 == 0 else byte for k, byte in enumerate(in_bytes[:-1])]
        found = ends.searchsorted(queries).tolist()
        return labels_from_ranges(ids, zip(found[0::2], [last + 1 for last in found[1::2]], strict=True))


def _state(component) -> dict:
    """A tokenizer component's settings, as in tokenizer.json."""
    return json.loads(component.__getstate__())


def _keeps_bytes(pre_tokenizer: dict) -> bool:
    """The pre-tokenizer only cuts the text, and maps it to the byte alphabet exactly once."""
    steps = pre_tokenizer["pretokenizers"] if pre_tokenizer["type"] == "Sequence" else [pre_tokenizer]
    byte_levels = [step for step in steps if step["type"] == "ByteLevel"]
    return (
        all(step["type"] in SPLITTING_PRE_TOKENIZERS for step in steps)
        and all(step.get("behavior") != "Removed" for step in steps)
        and len(byte_levels) == 1
        and not byte_levels[0]["add_prefix_space"]
    )


def _byte_positions(text: str, positions: list[int]) -> list[int] | None:
    """UTF-8 byte positions of sorted character positions; None for text that is not valid Unicode."""
    if text.isascii():
        return positions
    in_bytes, character, byte = [], 0, 0
    try:
        for position in positions:
            byte += len(text[character:position].encode())
            character = position
            in_bytes.append(byte)
    except UnicodeEncodeError:  # a lone surrogate
        return None
    return in_bytes
