"""A conversation's per-turn rows as one token-level prefix tree, so shared history is computed once.

A conversation split into K rows (see `protocol.turns`) repeats its history K times. The rows' token
sequences nest as a trie: each distinct prefix is one node, numbered in depth-first preorder so that a
node's subtree is the contiguous range [j, subtree_end[j]). A node's position is its depth (positions
continue from the parent, as in its rows), and key j is visible to query i iff j <= i < subtree_end[j]
(j is i or one of its ancestors): each token attends to exactly its row's earlier tokens. Because the
next token is not the next node at a branch, the loss takes explicit (node, target id) pairs: one per
trained token of each row, so per-token losses are those of the rows run separately. Documents packed
side by side are the special case of a forest of paths.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sft.protocol.labels import IGNORE_INDEX


@dataclass(frozen=True)
class PrefixTree:
    input_ids: np.ndarray  # [nodes] int64, depth-first preorder
    position_ids: np.ndarray  # [nodes] int64: the node's depth (its position in each of its rows)
    subtree_end: np.ndarray  # [nodes] int64: node j's subtree is [j, subtree_end[j])
    loss_positions: np.ndarray  # [pairs] int64: the node whose output predicts...
    loss_targets: np.ndarray  # [pairs] int64: ...this token id
    row_nodes: list[np.ndarray]  # per input row, the node of each of its tokens

    def __len__(self) -> int:
        return len(self.input_ids)


def build_prefix_tree(rows: Sequence[tuple[np.ndarray, np.ndarray]]) -> PrefixTree:
    """The prefix tree of rows given as (input_ids, labels), labels unshifted (IGNORE_INDEX where not
    trained): token t of a row is trained iff labels[t] != IGNORE_INDEX, predicted from token t - 1.

    Built from the rows sorted, not by a walk over their tokens: in an order where every subtree's rows
    are consecutive (a preorder), each row shares exactly its longest common prefix with the row before it
    and its remaining tokens are the next nodes."""
    ids = [np.asarray(row_ids, dtype=np.int64) for row_ids, _ in rows]
    order, shared = _insertion_preorder(*_lexicographic(ids))
    row_nodes, starts = _number_nodes(ids, order, shared)
    lengths = np.array([len(ids[row]) for row in order], dtype=np.int64)
    # a new node's depth: how far it is past its row's first new node, plus the nodes the row shares
    depth = np.arange(starts[-1], dtype=np.int64) - np.repeat(starts[:-1] - shared, lengths - shared)
    positions, targets = [], []
    for nodes, (_, labels) in zip(row_nodes, rows, strict=True):
        labels = np.asarray(labels)
        trained = np.flatnonzero(labels[1:] != IGNORE_INDEX)  # token t + 1 is predicted at token t
        positions.append(nodes[trained])
        targets.append(labels[trained + 1])
    return PrefixTree(
        input_ids=_concatenate([ids[row][first:] for row, first in zip(order, shared, strict=True)]),
        position_ids=depth,
        subtree_end=_subtree_ends(lengths, shared, starts),
        loss_positions=_concatenate(positions),
        loss_targets=_concatenate(targets),
        row_nodes=row_nodes,
    )


def _lexicographic(sequences: Sequence[np.ndarray]) -> tuple[list[int], np.ndarray]:
    """The sequences' indices in lexicographic order, and the length of each one's longest common prefix
    with the one before it in that order (0 for the first): its longest with any earlier one."""
    # Fixed-width bytes compare (memcmp, a prefix first) lexicographically under some order of token ids,
    # which is all the grouping needs: rows that share a prefix are consecutive.
    keys = [np.asarray(sequence, dtype=np.int64).tobytes() for sequence in sequences]
    order = sorted(range(len(sequences)), key=keys.__getitem__)
    shared = np.zeros(len(order), dtype=np.int64)
    for i in range(1, len(order)):
        previous, current = sequences[order[i - 1]], sequences[order[i]]
        shortest = min(len(previous), len(current))
        differ = np.flatnonzero(previous[:shortest] != current[:shortest])
        shared[i] = differ[0] if len(differ) else shortest
    return order, shared


def _insertion_preorder(order: list[int], shared: np.ndarray) -> tuple[list[int], np.ndarray]:
    """The rows, given in lexicographic order, reordered so that sibling subtrees come in insertion order
    (the order of their first rows) rather than by token id; with each one's common prefix with the row
    before it. Works on the rows alone (plain lists: a few per turn): a subtree is a run of rows, cut into
    its children where `shared` is the run's least."""
    shared_list = shared.tolist()
    reordered: list[int] = []
    reordered_shared: list[int] = []
    runs = [(0, len(order), 0)] if order else []  # (first, end, common prefix with the row before)
    while runs:
        first, end, before = runs.pop()
        if end - first == 1:
            reordered.append(order[first])
            reordered_shared.append(before)
            continue
        common = min(shared_list[first + 1 : end])  # the run's rows branch (or end) at this depth
        cuts = [first, *(i for i in range(first + 1, end) if shared_list[i] == common), end]
        children = sorted(zip(cuts, cuts[1:]), key=lambda child: min(order[child[0] : child[1]]))
        for rank in reversed(range(len(children))):  # a stack: the first child is taken next
            runs.append((*children[rank], before if rank == 0 else common))
    return reordered, np.array(reordered_shared, dtype=np.int64)


def _number_nodes(
    ids: Sequence[np.ndarray], order: list[int], shared: np.ndarray
) -> tuple[list[np.ndarray], np.ndarray]:
    """Each row's nodes when the rows, taken in `order`, number their new nodes consecutively; and where
    each row's new nodes start (in `order`, then the node count)."""
    starts = np.zeros(len(order) + 1, dtype=np.int64)
    starts[1:] = np.cumsum([len(ids[row]) for row in order]) - np.cumsum(shared)
    row_nodes: list[np.ndarray] = [np.zeros(0, np.int64)] * len(ids)
    previous = np.zeros(0, np.int64)
    for i, row in enumerate(order):
        new = np.arange(starts[i], starts[i + 1], dtype=np.int64)
        row_nodes[row] = previous = np.concatenate([previous[: shared[i]], new])
    return row_nodes, starts


def _subtree_ends(lengths: np.ndarray, shared: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Per node in preorder, its subtree's end. The node at depth t added by row i (in preorder) holds the
    new nodes of rows i, i + 1, ... up to the first row j > i that shares at most t tokens with row i, the
    first where the running minimum of `shared` after row i is at most t: it ends where row j's start."""
    shared_after = np.append(shared, 0)  # past the last row, nothing is shared: the tree ends
    ends = []
    for i in np.flatnonzero(lengths > shared):
        running_min = np.minimum.accumulate(shared_after[i + 1 :])
        depths = np.arange(shared[i], lengths[i])
        ends.append(starts[i + 1 + np.searchsorted(-running_min, -depths, side="left")])
    return _concatenate(ends)


def _concatenate(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays).astype(np.int64) if arrays else np.zeros(0, np.int64)


def prefix_tree_size(rows: Sequence[np.ndarray]) -> int:
    """The node count of the rows' prefix tree without building it (what packing needs for every
    conversation): in lexicographic order each row adds its tokens beyond the longest common prefix with
    the row before it."""
    rows = [np.asarray(ids) for ids in rows]
    _, shared = _lexicographic(rows)
    return sum(len(ids) for ids in rows) - int(shared.sum())


def tokens_computed(rows: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[int, int]:
    """(tokens in the rows, nodes of their prefix tree): what sharing the history saves."""
    return sum(len(ids) for ids, _ in rows), prefix_tree_size([ids for ids, _ in rows])
