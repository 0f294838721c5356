"""build_loss_labels: the one rule that decides which tokens are trained.

A token is trained iff its character range overlaps an assistant span — the rule of transformers'
`return_assistant_tokens_mask`, so our labels can be compared with it token for token.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IGNORE_INDEX = -100


def trained_token_mask(offsets: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """Boolean mask over tokens: token [a, b) is trained iff some span [s, e) has s < b and e > a.

    `offsets` is an int array of shape (tokens, 2); `spans` are sorted and disjoint. Vectorised: each
    token looks up the first span ending after its start (binary search) and checks that span's start.
    """
    if len(spans) == 0 or len(offsets) == 0:
        return np.zeros(len(offsets), dtype=bool)
    span_array = np.asarray(spans, dtype=np.int64)
    starts, ends = offsets[:, 0], offsets[:, 1]
    first_span = np.searchsorted(span_array[:, 1], starts, side="right")
    in_range = first_span < len(span_array)
    candidate_start = span_array[np.minimum(first_span, len(span_array) - 1), 0]
    return in_range & (candidate_start < ends) & (ends > starts)


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
