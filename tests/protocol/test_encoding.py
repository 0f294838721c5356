"""Labels placed by byte lengths (encoded without offsets) equal the labels placed by the offsets."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers

from sft.protocol.encoding import ByteLevelOffsets
from sft.protocol.labels import build_loss_labels
from sft.protocol.pipeline import Accounting, ConversationEncoder
from sft.protocol.templates import BUILTINS
from sft.protocol.types import Conversation, Message, ProtocolConfig
from tests.helpers import make_tokenizer

# The pre-tokenizer regex of Qwen2/Qwen3's tokenizer.json, which also NFC-normalizes.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


def qwen_like() -> Tokenizer:
    tokenizer = make_tokenizer()
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    return tokenizer


TOKENIZERS = {"bpe": make_tokenizer(), "qwen-like": qwen_like()}
# Not NFC: "e\u0301" composes (fewer bytes); "x\u0301\u0316" reorders and U+F900 maps to U+8C48 (as many).
NOT_NFC = ["e\u0301", "x\u0301\u0316", "\uf900"]
PIECES = [
    "a",
    "the ",
    "  ",
    "\n",
    "\n\n",
    "é",
    "東京",
    "🙂",
    "x=1;",
    "<|im_end|>",
    "<|im_start|>",
    "'s",
    *NOT_NFC,
]


@st.composite
def text_and_spans(draw) -> tuple[str, list[tuple[int, int]]]:
    text = "".join(draw(st.lists(st.sampled_from(PIECES) | st.text(max_size=3), max_size=30)))
    text = text.encode("utf-8", "replace").decode("utf-8", "replace")  # tokenizers refuse lone surrogates
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=8)))
    return text, list(zip(cuts[::2], cuts[1::2]))


@pytest.mark.parametrize("name", TOKENIZERS)
@settings(max_examples=300, deadline=None)
@given(case=text_and_spans())
def test_labels_equal_the_offsets_rule(name, case):
    tokenizer, (text, spans) = TOKENIZERS[name], case
    byte_offsets = ByteLevelOffsets.of(tokenizer)
    with_offsets = tokenizer.encode(text, add_special_tokens=False)
    fast_ids = tokenizer.encode_batch_fast([text], add_special_tokens=False)[0].ids
    assert fast_ids == with_offsets.ids
    ids = np.asarray(fast_ids, dtype=np.int64)
    labels = byte_offsets.labels(text, ids, spans)
    if byte_offsets.nfc and text != normalizers.NFC().normalize_str(text):
        assert labels is None  # the offsets are the original text's, the bytes the normalized text's
        return
    assert labels is not None
    assert np.array_equal(labels, build_loss_labels(ids, with_offsets.offsets, spans))


def byte_level(**changes) -> Tokenizer:
    tokenizer = make_tokenizer()
    for name, value in changes.items():
        setattr(tokenizer, name, value)
    return tokenizer


class KeepsText:
    """A custom (Python) pre-tokenizer and normalizer: they have no settings to read, so nothing to vouch
    that they keep the bytes."""

    def pre_tokenize(self, pretokenized) -> None:
        pass

    def normalize(self, normalized) -> None:
        pass


def with_added(token: AddedToken) -> Tokenizer:
    tokenizer = make_tokenizer()
    tokenizer.add_tokens([token])
    return tokenizer


def without_byte(byte: str) -> Tokenizer:
    tokenizer = make_tokenizer()
    vocab = {t: i for t, i in tokenizer.get_vocab(with_added_tokens=False).items() if t != byte}
    tokenizer.model = models.BPE(vocab, [], unk_token=None)
    return tokenizer


@pytest.mark.parametrize(
    "tokenizer",
    [
        byte_level(normalizer=normalizers.Lowercase()),
        byte_level(normalizer=normalizers.Sequence([normalizers.NFC(), normalizers.Strip()])),
        byte_level(pre_tokenizer=pre_tokenizers.ByteLevel(add_prefix_space=True)),
        byte_level(pre_tokenizer=pre_tokenizers.Split("x", behavior="removed")),
        byte_level(
            pre_tokenizer=pre_tokenizers.Sequence(
                [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.ByteLevel(add_prefix_space=False)]
            )
        ),
        byte_level(pre_tokenizer=pre_tokenizers.Metaspace()),
        with_added(AddedToken("<tool>", lstrip=True)),
        with_added(AddedToken("<tool>", rstrip=True)),
        without_byte("Ġ"),
        Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")),
        byte_level(pre_tokenizer=pre_tokenizers.PreTokenizer.custom(KeepsText())),
        byte_level(normalizer=normalizers.Normalizer.custom(KeepsText())),
    ],
    ids=[
        "lowercase",
        "strip",
        "prefix-space",
        "removing-split",
        "whitespace-split",
        "metaspace",
        "lstrip",
        "rstrip",
        "missing-byte",
        "word-level",
        "custom-pre-tokenizer",
        "custom-normalizer",
    ],
)
def test_tokenizers_that_change_the_text_keep_their_offsets(tokenizer):
    assert ByteLevelOffsets.of(tokenizer) is None


def test_a_text_that_is_not_nfc_is_labelled_from_its_offsets():
    """Qwen's NFC composes "e" + U+0301 into "é": the pipeline re-encodes that row with offsets."""
    tokenizer = qwen_like()
    conversation = Conversation(
        [
            Message("user", "cafe\u0301 or tea?"),
            Message("assistant", "cafe\u0301, x\u0301\u0316 東京 🙂 please"),
        ]
    )
    fast = ConversationEncoder(tokenizer, BUILTINS["chatml"], ProtocolConfig())
    slow = ConversationEncoder(tokenizer, BUILTINS["chatml"], ProtocolConfig())
    slow.row_encoder.byte_offsets = None
    assert fast.row_encoder.byte_offsets is not None
    (ours,) = fast.encode_conversations([conversation], Accounting())
    (theirs,) = slow.encode_conversations([conversation], Accounting())
    assert np.array_equal(ours.input_ids, theirs.input_ids)
    assert np.array_equal(ours.labels, theirs.labels)
    assert (ours.labels != -100).any()
