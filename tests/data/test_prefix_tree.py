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
    assert prefix_tree_size([ids for ids, _ in rows]) == len(tree)  # what packing counts without the tree
    mask = tree_mask(torch.as_tensor(tree.subtree_end)[None])[0, 0].numpy()  # what training attends with
    for (ids, labels), nodes in zip(rows, tree.row_nodes, strict=True):
        assert tree.input_ids[nodes].tolist() == ids.tolist()
        assert tree.position_ids[nodes].tolist() == list(range(len(ids)))
        for t, node in enumerate(nodes):  # exactly the row's tokens up to t are visible
            assert set(np.flatnonzero(mask[node]).tolist()) == set(nodes[: t + 1].tolist())
    expected = sorted(
        (int(nodes[t - 1]), int(labels[t]))
        for (_, labels), nodes in zip(rows, tree.row_nodes, strict=True)
        for t in range(1, len(labels))
        if labels[t] != IGNORE_INDEX
    )
    assert sorted(zip(tree.loss_positions.tolist(), tree.loss_targets.tolist(), strict=True)) == expected


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


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=12), min_size=1, max_size=5), st.data())
def test_any_rows(sequences, data):
    rows = [row(ids, data.draw(st.sets(st.integers(0, len(ids) - 1)))) for ids in sequences]
    check(build_prefix_tree(rows), rows)
