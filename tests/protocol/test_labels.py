"""The labelling rule: a token is trained iff it overlaps an assistant span (transformers' rule), and the
fast path that reads only the tokens at span ends gives exactly the same labels."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

from sft.protocol.labels import (
    IGNORE_INDEX,
    build_loss_labels,
    labels_from_encoding,
    trained_token_mask,
    trained_token_ranges,
)
from tests.helpers import CORPUS, make_tokenizer


def reference_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """The rule written per token, as transformers' loop does it."""
    return [any(start < e and end > s for s, e in spans if e > s) for start, end in offsets]


def mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    return trained_token_mask(np.asarray(offsets, dtype=np.int64).reshape(-1, 2), spans).tolist()


def test_overlap_rule_at_span_boundaries():
    span = [(10, 20)]
    assert mask([(5, 10), (20, 25)], span) == [False, False]  # touching is not overlapping
    assert mask([(8, 11), (19, 22)], span) == [True, True]  # straddling the start or the end
    assert mask([(10, 20), (12, 13)], span) == [True, True]
    assert mask([(0, 30)], span) == [True]  # a token that swallows the whole span


def test_empty_spans_train_nothing_and_empty_tokens_count_strictly_inside():
    assert mask([(0, 5), (5, 10)], [(5, 5)]) == [False, False]
    assert mask([(10, 10), (15, 15), (20, 20)], [(10, 20)]) == [False, True, False]
    assert mask([], [(0, 3)]) == [] and mask([(0, 3)], []) == [False]


def test_build_loss_labels_keeps_ids_inside_and_checks_lengths():
    labels = build_loss_labels([7, 8, 9], [(0, 2), (2, 4), (4, 6)], [(2, 4)])
    assert labels.tolist() == [IGNORE_INDEX, 8, IGNORE_INDEX]
    with pytest.raises(ValueError, match="3 input ids but 2 offsets"):
        build_loss_labels([7, 8, 9], [(0, 2), (2, 4)], [(2, 4)])


@st.composite
def offsets_and_spans(draw):
    """Arbitrary token ranges (overlapping, empty, out of order) and sorted disjoint spans, some empty."""
    tokens = draw(st.lists(st.tuples(st.integers(0, 60), st.integers(0, 8)), max_size=40))
    offsets = [(start, start + width) for start, width in tokens]
    cuts = sorted(draw(st.lists(st.integers(0, 70), max_size=10)))
    spans = list(zip(cuts[::2], cuts[1::2], strict=False))
    return offsets, spans


@settings(max_examples=300, deadline=None)
@given(offsets_and_spans())
def test_vectorised_rule_equals_per_token_reference(case):
    offsets, spans = case
    assert mask(offsets, spans) == reference_mask(offsets, spans)


def test_multibyte_character_split_over_byte_tokens_trains_every_piece(tokenizer):
    text = "ab 𝄞 cd"  # U+1D11E is not in the tiny corpus: four byte-level tokens, each with its range
    encoding = tokenizer.encode(text, add_special_tokens=False)
    clef = text.index("𝄞")
    pieces = [i for i, offset in enumerate(encoding.offsets) if offset == (clef, clef + 1)]
    assert len(pieces) == 4
    for spans, trained in (
        ([(clef, clef + 1)], True),
        ([(0, clef)], False),
        ([(clef + 1, len(text))], False),
    ):
        _, labels = labels_from_encoding(encoding, spans)
        assert all((labels[pieces] != IGNORE_INDEX) == trained)
        assert labels.tolist() == build_loss_labels(encoding.ids, encoding.offsets, spans).tolist()


def gpt2_style(trim_offsets: bool) -> Tokenizer:
    tokenizer = make_tokenizer()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=trim_offsets)
    return tokenizer


def sentencepiece_style() -> Tokenizer:
    """Unigram with NFKC and Metaspace, like tokenizers converted from SentencePiece."""
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=150, special_tokens=["<unk>"], unk_token="<unk>")
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    return tokenizer


def bert_style() -> Tokenizer:
    """WordPiece with lowercasing and whitespace splitting: spaces belong to no token."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(
        CORPUS, trainer=trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[UNK]"])
    )
    return tokenizer


TOKENIZERS = {
    "byte-level": make_tokenizer,
    "byte-level-trimmed": lambda: gpt2_style(trim_offsets=True),
    "sentencepiece-style": sentencepiece_style,
    "bert-style": bert_style,
}
TEXT = st.text(
    st.sampled_from("ab c\n\t Ünï🙂中文 ̈́x 𝄞,.") | st.characters(blacklist_categories=["Cs"]), max_size=60
)


@st.composite
def text_and_spans(draw):
    text = draw(TEXT)
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=8)))
    return text, list(zip(cuts[::2], cuts[1::2], strict=False))


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_fast_labels_equal_the_offsets_rule(name):
    tokenizer = TOKENIZERS[name]()

    @settings(max_examples=200, deadline=None)
    @given(text_and_spans())
    def check(case):
        text, spans = case
        encoding = tokenizer.encode(text, add_special_tokens=False)
        ids, labels = labels_from_encoding(encoding, spans)
        assert ids.tolist() == encoding.ids
        assert labels.tolist() == build_loss_labels(encoding.ids, encoding.offsets, spans).tolist()

    check()


def test_fast_path_defers_to_offsets_where_a_span_end_is_in_no_token():
    encoding = bert_style().encode("hello there", add_special_tokens=False)
    assert trained_token_ranges(encoding, [(5, 8)]) is None  # char 5 is the space: in no token
    assert trained_token_ranges(encoding, [(6, 11)]) == [(encoding.char_to_token(6), len(encoding))]
