"""Packing units: a split conversation's rows become one unit, its prefix tree, when the tree fits the row;
otherwise (or with sharing off) every example is a unit of its own."""

from __future__ import annotations

import numpy as np

from sft.data.prefix_tree import build_prefix_tree
from sft.data.units import conversation_units, single_examples
from tests.helpers import split_conversation_rows, trained_document


class Examples:
    """An ExampleSource over in-memory rows with their conversation numbers."""

    def __init__(self, rows, conversations):
        self.rows = rows
        self.lengths = np.array([len(ids) for ids, _ in rows])
        self.conversations = np.asarray(conversations)

    def __getitem__(self, example_id):
        return self.rows[example_id]


def source() -> tuple[Examples, int]:
    """A document, a conversation of three rows, a document; and the tree's node count."""
    rng = np.random.default_rng(0)
    conversation = split_conversation_rows(rng, 3)
    rows = [trained_document(rng), *conversation, trained_document(rng)]
    return Examples(rows, [0, 1, 1, 1, 2]), len(build_prefix_tree(conversation))


def units_as_lists(units):
    return [units.examples(unit).tolist() for unit in range(len(units))]


def test_a_split_conversation_is_one_unit_as_long_as_its_tree():
    examples, nodes = source()
    units = conversation_units(examples, np.arange(5), max_seq_len=nodes)
    assert units_as_lists(units) == [[0], [1, 2, 3], [4]]
    assert units.lengths.tolist() == [examples.lengths[0], nodes, examples.lengths[4]]
    assert nodes < examples.lengths[1:4].sum()


def test_a_tree_longer_than_the_row_falls_back_to_separate_rows():
    examples, nodes = source()
    units = conversation_units(examples, np.arange(5), max_seq_len=nodes - 1)
    assert units_as_lists(units) == [[0], [1], [2], [3], [4]]
    assert units.lengths.tolist() == examples.lengths.tolist()


def test_units_keep_first_appearance_order_and_duplicates_drawn_by_mixing():
    examples, _ = source()
    units = conversation_units(examples, np.array([4, 2, 0, 1, 2]), max_seq_len=1000)
    assert units_as_lists(units) == [[4], [2, 1, 2], [0]]  # a duplicate row is a duplicate path of the tree
    assert units.lengths[1] == len(build_prefix_tree([examples[2], examples[1], examples[2]]))


def test_without_split_conversations_units_are_the_examples_in_order():
    examples, _ = source()
    examples.conversations = np.arange(5)
    ids = np.array([3, 1, 4, 0])
    for units in (conversation_units(examples, ids, 10), single_examples(examples, ids)):
        assert units_as_lists(units) == [[3], [1], [4], [0]]
        assert units.lengths.tolist() == examples.lengths[ids].tolist()
