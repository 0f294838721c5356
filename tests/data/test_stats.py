"""sft-inspect's packing figure is the one training sees: a split conversation is packed as its prefix tree
(its nodes are what is computed), not as its separate rows."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from sft.data.build import PreparedData
from sft.data.config import DataConfig
from sft.data.datamodule import SFTDataModule
from sft.data.packing import best_fit_decreasing
from sft.data.prefix_tree import build_prefix_tree
from sft.data.stats import dataset_stats
from sft.data.store import StoreWriter, TokenStore
from sft.protocol.pipeline import Accounting
from tests.helpers import MODEL, split_conversation_rows, trained_document


def store_of(path, units) -> TokenStore:
    """A store of units: each a document alone, or the per-turn rows of one conversation."""
    with StoreWriter(path, vocab_size=MODEL["vocab_size"]) as writer:
        for unit in units:
            for turn, (ids, labels) in enumerate(unit):
                writer.add(ids, labels, new_conversation=turn == 0)
        writer.close({"source": "x.jsonl", "accounting": Accounting().to_dict()})
    return TokenStore(path)


@pytest.fixture
def tree_and_document(tmp_path):
    """A store of a 4-turn split conversation and a document, and a row length they fill exactly once the
    conversation is its tree (its rows alone are longer)."""
    rng = np.random.default_rng(0)
    conversation, document = split_conversation_rows(rng, 4), trained_document(rng)
    store = store_of(tmp_path / "store", [conversation, [document]])
    capacity = len(build_prefix_tree(conversation)) + len(document[0])
    assert store.lengths.sum() > capacity
    return store, capacity


def test_a_split_conversation_is_packed_as_its_tree(tree_and_document):
    store, capacity = tree_and_document
    stats = dataset_stats([store], capacity)
    assert (stats.packed_rows, stats.packing_efficiency) == (1, 1.0)
    assert stats.tokens == store.lengths.sum()  # the rows' tokens are still counted as such
    unshared = dataset_stats([store], capacity, prefix_sharing=False)
    rows = len(best_fit_decreasing(store.lengths, capacity))
    assert (unshared.packed_rows, unshared.packing_efficiency) == (
        rows,
        store.lengths.sum() / (rows * capacity),
    )


@pytest.mark.parametrize("prefix_sharing", [True, False])
def test_the_figure_is_the_one_training_logs(tree_and_document, prefix_sharing):
    store, capacity = tree_and_document
    config = SimpleNamespace(
        data=DataConfig(prefix_sharing=prefix_sharing), protocol=SimpleNamespace(max_seq_len=capacity), seed=0
    )
    datamodule = SFTDataModule(config, PreparedData(None, None, [store], [], Accounting()))
    stats = dataset_stats([store], capacity, prefix_sharing)
    assert datamodule.packing_efficiency == stats.packing_efficiency
    assert len(datamodule.train_dataset) == stats.packed_rows
