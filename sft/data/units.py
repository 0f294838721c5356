"""Packing units: what packing places whole. An example alone, or (`data.prefix_sharing`) the per-turn rows
of one split conversation as their prefix tree, whose length is its node count, so the history the rows
share is computed once. A tree longer than the row (`protocol.max_seq_len`) falls back to its rows, each a
unit of its own. No torch here: the counts need none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from sft.data.prefix_tree import prefix_tree_size


class ExampleSource(Protocol):
    lengths: np.ndarray  # tokens per example
    conversations: np.ndarray  # per example, a conversation number unique over the whole source

    def __getitem__(self, example_id: int) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass
class PackingUnits:
    """Unit u is the examples `members[offsets[u]:offsets[u + 1]]` (one example, or the rows of one
    conversation, turn order kept) and `lengths[u]` tokens long."""

    members: np.ndarray  # example ids
    offsets: np.ndarray  # units + 1
    lengths: np.ndarray  # units

    def __len__(self) -> int:
        return len(self.lengths)

    def examples(self, unit: int) -> np.ndarray:
        return self.members[self.offsets[unit] : self.offsets[unit + 1]]


def packing_units(
    source: ExampleSource, example_ids: np.ndarray, max_seq_len: int, prefix_sharing: bool
) -> PackingUnits:
    """The units training packs (`prefix_sharing` as `data.prefix_sharing`)."""
    if prefix_sharing:
        return conversation_units(source, example_ids, max_seq_len)
    return single_examples(source, example_ids)


def single_examples(source: ExampleSource, example_ids: np.ndarray) -> PackingUnits:
    return PackingUnits(example_ids, np.arange(len(example_ids) + 1), source.lengths[example_ids])


def conversation_units(source: ExampleSource, example_ids: np.ndarray, max_seq_len: int) -> PackingUnits:
    """The examples grouped by conversation, each group a unit where its tree fits `max_seq_len`.

    Groups are ordered by their first example's place in `example_ids`, and keep their examples in that
    order (a duplicate drawn by data.mix is a duplicate row of the tree: its pairs count twice, as two rows
    would). Without split conversations this is `single_examples`, in the same order."""
    keys = source.conversations[example_ids]
    by_conversation = np.argsort(keys, kind="stable")  # positions in example_ids, grouped, in order
    sorted_keys = keys[by_conversation]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    if len(starts) == len(example_ids):
        return single_examples(source, example_ids)
    sizes = np.diff(np.r_[starts, len(keys)])
    group_rank = np.empty(len(starts), dtype=np.int64)
    group_rank[np.argsort(by_conversation[starts], kind="stable")] = np.arange(len(starts))
    positions = by_conversation[np.lexsort((by_conversation, np.repeat(group_rank, sizes)))]
    members = example_ids[positions]
    group_sizes = sizes[np.argsort(group_rank)]
    group_starts = np.r_[0, np.cumsum(group_sizes)[:-1]]
    unit_starts = np.zeros(len(members), dtype=bool)
    unit_starts[group_starts] = True
    lengths = source.lengths[members].copy()  # a tree's length goes to its first member
    for start, size in zip(group_starts[group_sizes > 1], group_sizes[group_sizes > 1], strict=True):
        rows = [source[int(example_id)][0] for example_id in members[start : start + size]]
        nodes = prefix_tree_size(rows)
        if nodes <= max_seq_len:
            lengths[start] = nodes
        else:  # too long for one row: the conversation's rows stay separate units
            unit_starts[start : start + size] = True
    offsets = np.append(np.flatnonzero(unit_starts), len(members))
    return PackingUnits(members, offsets, lengths[unit_starts])
