"""Prefix trees of split rows: each row is a root path, positions continue from the parent, each token
sees exactly its row's earlier tokens, and the loss pairs are the rows' trained tokens."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sft.data.prefix_tree import build_prefix_tree, prefix_tree_size, tokens_computed
from sft.model.attention import tree_mask
from sft.protocol.labels import IGNORE_INDEX


def row(ids, trained=()):
    ids = np.array(ids, dtype=np.int64)
    labels = np.full_like(ids, IGNORE_INDEX)
    labels[list(trained)] = ids[list(trained)]
    return ids, labels


def check(tree, rows):
    """The tree's defining properties, which fix every output: one node per distinct prefix of the rows,
    numbered in depth-first preorder with children in insertion order; each row recovered by its nodes;
    exactly the row's earlier tokens visible; the pairs the rows' trained tokens, row by row."""
    prefixes = {tuple(ids[: t + 1].tolist()) for ids, _ in rows for t in range(len(ids))}
    assert len(tree) == len(prefixes) == prefix_tree_size([ids for ids, _ in rows])  # what packing counts
    node_of = {}  # prefix -> node
    parent = {}  # node -> the node before it in its rows (-1 above the first tokens)
    first_row = {}  # node -> the first row through it (the one that inserted it)
    subtree = {}  # node -> itself and the nodes after it in its rows
    for row_number, ((ids, _), nodes) in enumerate(zip(rows, tree.row_nodes, strict=True)):
        assert tree.input_ids[nodes].tolist() == ids.tolist()
        assert tree.position_ids[nodes].tolist() == list(range(len(ids)))
        for t, node in enumerate(nodes.tolist()):
            assert node_of.setdefault(tuple(ids[: t + 1].tolist()), node) == node  # a prefix is one node
            parent[node] = int(nodes[t - 1]) if t else -1
            first_row.setdefault(node, row_number)
            subtree.setdefault(node, set()).update(nodes[t:].tolist())
    assert sorted(node_of.values()) == list(range(len(tree)))  # and distinct prefixes are distinct nodes
    for node in range(len(tree)):  # preorder: parents first, a node's subtree [node, subtree_end[node])
        assert parent[node] < node
        assert sorted(subtree[node]) == list(range(node, tree.subtree_end[node]))
    for a in range(len(tree)):  # siblings in insertion order
        for b in range(a + 1, len(tree)):
            if parent[a] == parent[b]:
                assert first_row[a] < first_row[b]
    mask = tree_mask(torch.as_tensor(tree.subtree_end)[None])[0, 0].numpy()  # what training attends with
    for (ids, _), nodes in zip(rows, tree.row_nodes, strict=True):
        for t, node in enumerate(nodes):  # exactly the row's tokens up to t are visible
            assert set(np.flatnonzero(mask[node]).tolist()) == set(nodes[: t + 1].tolist())
    expected = [
        (int(nodes[t - 1]), int(labels[t]))
        for (_, labels), nodes in zip(rows, tree.row_nodes, strict=True)
        for t in range(1, len(labels))
        if labels[t] != IGNORE_INDEX
    ]
    assert list(zip(tree.loss_positions.tolist(), tree.loss_targets.tolist(), strict=True)) == expected
    for array in (
        tree.input_ids,
        tree.position_ids,
        tree.subtree_end,
        tree.loss_positions,
        tree.loss_targets,
    ):
        assert array.dtype == np.int64


def test_rows_that_share_history_share_nodes():
    # Turn 1's row, and turn 2's row whose history renders turn 1 without its reasoning (Qwen3).
    rows = [row([1, 2, 3, 7, 7, 4, 5], trained=[3, 4, 5, 6]), row([1, 2, 3, 4, 5, 2, 6, 5], trained=[6, 7])]
    tree = build_prefix_tree(rows)
    assert len(tree) == 3 + 4 + 5 and tokens_computed(rows) == (15, 12)
    assert tree.input_ids.tolist() == [1, 2, 3, 7, 7, 4, 5, 4, 5, 2, 6, 5]
    assert tree.subtree_end.tolist() == [12, 12, 12, 7, 7, 7, 7, 12, 12, 12, 12, 12]
    check(tree, rows)


def test_documents_side_by_side_are_a_forest_of_paths():
    rows = [row([1, 2, 3], trained=[2]), row([4, 5], trained=[1])]
    tree = build_prefix_tree(rows)
    mask = tree_mask(torch.as_tensor(tree.subtree_end)[None])[0, 0].numpy()  # what training attends with
    assert tree.position_ids.tolist() == [0, 1, 2, 0, 1]
    assert np.array_equal(mask[3:, :3], np.zeros((2, 3), bool)) and np.array_equal(
        mask[:3, 3:], np.zeros((3, 2), bool)
    )
    check(tree, rows)


@st.composite
def related_rows(draw):
    """Rows as a split conversation gives them: each one a fresh row, or an earlier row's prefix (any
    length: duplicates, prefixes, branches) continued by a few tokens; large ids among small ones."""
    rows = []
    for _ in range(draw(st.integers(1, 6))):
        base = draw(st.sampled_from(rows))[0] if rows and draw(st.booleans()) else np.zeros(0, np.int64)
        kept = draw(st.integers(0, len(base)))
        tail = draw(
            st.lists(st.sampled_from([0, 1, 2, 255, 256, 2**40]), min_size=int(kept == 0), max_size=8)
        )
        ids = np.concatenate([base[:kept], tail]).astype(np.int64)
        rows.append(row(ids, draw(st.sets(st.integers(0, len(ids) - 1)))))
    return rows


@settings(max_examples=300, deadline=None)
@given(related_rows())
def test_any_rows(rows):
    check(build_prefix_tree(rows), rows)
