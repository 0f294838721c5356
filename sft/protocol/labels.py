"""build_loss_labels: the one rule that decides which tokens are trained.

Token [a, b) is trained iff some assistant span [s, e) has a < e and b > s: the token overlaps the span
(or is an empty range strictly inside it). This is exactly the rule of transformers'
`return_assistant_tokens_mask`, so our labels can be compared with it token for token. Empty spans train
nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from tokenizers import Encoding

IGNORE_INDEX = -100


def trained_token_mask(offsets: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """Boolean mask over tokens: token [a, b) is trained iff some span [s, e) has s < b and e > a.

    `offsets` is an int array of shape (tokens, 2); `spans` are sorted and disjoint. Vectorised: each
    token looks up the first span ending after its start (binary search) and checks that span's start.
    """
    span_array = np.asarray([span for span in spans if span[1] > span[0]], dtype=np.int64).reshape(-1, 2)
    if len(span_array) == 0 or len(offsets) == 0:
        return np.zeros(len(offsets), dtype=bool)
    starts, ends = offsets[:, 0], offsets[:, 1]
    first_span = np.searchsorted(span_array[:, 1], starts, side="right")
    in_range = first_span < len(span_array)
    candidate_start = span_array[np.minimum(first_span, len(span_array) - 1), 0]
    return in_range & (candidate_start < ends)


def build_loss_labels(
    input_ids: Sequence[int] | np.ndarray,
    offsets: Sequence[tuple[int, int]] | np.ndarray,
    spans: Sequence[tuple[int, int]],
) -> np.ndarray:
    """Labels aligned with `input_ids` (unshifted: the loss shifts), IGNORE_INDEX outside assistant spans."""
    ids = np.asarray(input_ids, dtype=np.int64)
    offset_array = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    if len(ids) != len(offset_array):
        raise ValueError(f"{len(ids)} input ids but {len(offset_array)} offsets")
    return np.where(trained_token_mask(offset_array, spans), ids, IGNORE_INDEX)


def trained_token_ranges(
    encoding: Encoding, spans: Sequence[tuple[int, int]]
) -> list[tuple[int, int]] | None:
    """The trained tokens as index ranges [first, last + 1), one per non-empty span, found with a few
    lookups at each span's ends instead of reading every token's offsets (which costs more than the
    tokenization itself). None when a span's first or last character is in no token; then only the
    offsets can tell.

    Why it is exact: the offsets of one tokenized string are in order (starts and ends non-decreasing),
    so the tokens with end > s are a suffix and those with start < e a prefix, and the trained tokens
    of [s, e) are their intersection: from the first token holding char s through the last token
    starting before e."""
    ranges, token_count = [], len(encoding)
    for start, end in spans:
        if end <= start:
            continue
        first, last = encoding.char_to_token(start), encoding.char_to_token(end - 1)
        if first is None or last is None:
            return None
        # A character split over several tokens (byte-level BPE) is in each of them: take the last.
        while last + 1 < token_count and encoding.token_to_chars(last + 1)[0] < end:
            last += 1
        ranges.append((first, last + 1))
    return ranges


def labels_from_encoding(
    encoding: Encoding, spans: Sequence[tuple[int, int]]
) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, labels) of one encoded text: `build_loss_labels` without reading every offset."""
    ids = np.fromiter(encoding.ids, dtype=np.int64, count=len(encoding))  # faster than np.array(list)
    ranges = trained_token_ranges(encoding, spans)
    if ranges is None:
        return ids, build_loss_labels(ids, encoding.offsets, spans)
    return ids, labels_from_ranges(ids, ranges)


def labels_from_ranges(ids: np.ndarray, ranges: Iterable[tuple[int, int]]) -> np.ndarray:
    """`ids` where a token index lies in one of the ranges [first, stop), IGNORE_INDEX elsewhere."""
    labels = np.empty_like(ids)
    labels.fill(IGNORE_INDEX)  # faster than np.full_like
    for first, stop in ranges:
        labels[first:stop] = ids[first:stop]
    return labels
