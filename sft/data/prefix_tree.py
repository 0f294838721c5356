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
    trained): token t of a row is trained iff labels[t] != IGNORE_INDEX, predicted from token t - 1."""
    children: list[dict[int, int]] = [{}]  # trie node 0 is a virtual root above the first tokens
    tokens: list[int] = [-1]
    trie_paths = []
    for ids, _ in rows:
        node, path = 0, []
        for token in np.asarray(ids).tolist():
            child = children[node].get(token)
            if child is None:
                child = len(tokens)
                children[node][token] = child
                children.append({})
                tokens.append(token)
            path.append(child)
            node = child
        trie_paths.append(path)

    order, depth, subtree_end = _preorder(children)
    index_of = {trie_node: index for index, trie_node in enumerate(order)}
    row_nodes = [np.array([index_of[node] for node in path], dtype=np.int64) for path in trie_paths]
    positions, targets = [], []
    for nodes, (_, labels) in zip(row_nodes, rows, strict=True):
        labels = np.asarray(labels)
        trained = np.flatnonzero(labels[1:] != IGNORE_INDEX)  # token t + 1 is predicted at token t
        positions.append(nodes[trained])
        targets.append(labels[trained + 1])
    return PrefixTree(
        input_ids=np.array([tokens[node] for node in order], dtype=np.int64),
        position_ids=np.array(depth, dtype=np.int64),
        subtree_end=np.array(subtree_end, dtype=np.int64),
        loss_positions=np.concatenate(positions).astype(np.int64) if positions else np.zeros(0, np.int64),
        loss_targets=np.concatenate(targets).astype(np.int64) if targets else np.zeros(0, np.int64),
        row_nodes=row_nodes,
    )


def _preorder(children: list[dict[int, int]]) -> tuple[list[int], list[int], list[int]]:
    """Trie nodes in depth-first preorder (children in insertion order), their depths, and each one's
    subtree end in that order; iterative, so deep trees do not hit the recursion limit."""
    order: list[int] = []
    depth: list[int] = []
    subtree_end: list[int] = []
    stack = [(child, 0, False) for child in reversed(list(children[0].values()))]
    while stack:
        node, node_depth, closing = stack.pop()
        if closing:
            subtree_end[node_depth] = len(order)  # node_depth holds the node's index here
            continue
        index = len(order)
        order.append(node)
        depth.append(node_depth)
        subtree_end.append(-1)
        stack.append((node, index, True))
        stack.extend((child, node_depth + 1, False) for child in reversed(list(children[node].values())))
    return order, depth, subtree_end


def prefix_tree_size(rows: Sequence[np.ndarray]) -> int:
    """The node count of the rows' prefix tree without building it (what packing needs for every
    conversation): in lexicographic order each row adds its tokens beyond the longest common prefix with
    the row before it, which is its longest with any earlier row."""
    ordered = sorted(np.asarray(ids).tolist() for ids in rows)
    nodes = sum(len(ids) for ids in ordered)
    for previous, current in zip(ordered, ordered[1:], strict=False):
        shortest = min(len(previous), len(current))
        differ = np.flatnonzero(np.asarray(previous[:shortest]) != np.asarray(current[:shortest]))
        nodes -= int(differ[0]) if len(differ) else shortest
    return nodes


def tokens_computed(rows: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[int, int]:
    """(tokens in the rows, nodes of their prefix tree): what sharing the history saves."""
    return sum(len(ids) for ids, _ in rows), prefix_tree_size([ids for ids, _ in rows])
