"""Split conversations packed as prefix trees in training batches: every trained token of every row keeps
exactly its row's context and target, and the model's per-token losses on a batch of trees equal those of
the rows run separately (fp32, 1e-6), as do the loss sum and (to fp32's summation floor) the gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sft.data.collate import collate_rows, example_row, packed_row, without_targets
from sft.loss import batch_loss_sum, trained_positions
from sft.protocol.labels import IGNORE_INDEX
from tests.helpers import split_conversation_rows, tiny_model, trained_document


def random_rows_of_units(seed: int, rows: int) -> list[list[list[tuple[np.ndarray, np.ndarray]]]]:
    """Rows of packing units: documents alone and split conversations of 2-4 turns, mixed."""
    rng = np.random.default_rng(seed)
    return [
        [
            split_conversation_rows(rng, int(rng.integers(2, 5)))
            if rng.random() < 0.6
            else [trained_document(rng)]
            for _ in range(int(rng.integers(1, 4)))
        ]
        for _ in range(rows)
    ]


def expected_contexts(units_by_row) -> list[tuple[tuple[int, ...], int]]:
    """(context ids, target) of every trained token of every example row, as it is trained alone."""
    return sorted(
        (tuple(ids[:t].tolist()), int(labels[t]))
        for units in units_by_row
        for unit in units
        for ids, labels in unit
        for t in range(1, len(ids))
        if labels[t] != IGNORE_INDEX
    )


def batch_contexts(batch) -> list[tuple[tuple[int, ...], int]]:
    """(ids the query of each loss pair sees, in position order, target): read back from the batch alone."""
    width = batch["input_ids"].shape[1]
    subtree_end, ids, positions = (batch[key].numpy() for key in ("subtree_end", "input_ids", "position_ids"))
    contexts = []
    for flat, target in zip(batch["loss_positions"].tolist(), batch["loss_targets"].tolist(), strict=True):
        row, query = divmod(flat, width)
        visible = [key for key in range(width) if key <= query < subtree_end[row, key]]
        assert positions[row, visible].tolist() == list(range(len(visible)))  # positions continue the row
        contexts.append((tuple(ids[row, visible].tolist()), target))
    return sorted(contexts)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 4))
def test_collated_trees_give_every_trained_token_its_row_context_and_target(seed, rows):
    units_by_row = random_rows_of_units(seed, rows)
    batch = collate_rows([packed_row(units) for units in units_by_row])
    if "loss_positions" not in batch:  # no tree drawn: today's layout, labels and document ids
        assert "labels" in batch and "subtree_end" not in batch
        return
    assert "labels" not in batch and "document_ids" not in batch
    assert batch_contexts(batch) == expected_contexts(units_by_row)
    computed = sum(len(packed_row(units)["input_ids"]) for units in units_by_row)
    separate = sum(len(ids) for units in units_by_row for unit in units for ids, _ in unit)
    assert int(batch["real_tokens"]) == computed < separate  # the shared history is computed once


def test_a_row_without_targets_keeps_its_tokens_and_drops_its_pairs():
    row = packed_row(random_rows_of_units(1, 1)[0] + [split_conversation_rows(np.random.default_rng(2), 2)])
    empty = without_targets(row)
    assert np.array_equal(empty["input_ids"], row["input_ids"]) and len(row["loss_positions"])
    assert len(empty["loss_positions"]) == 0 and (empty["labels"] == IGNORE_INDEX).all()
    assert int(batch_loss_sum(tiny_model(), collate_rows([empty]))[1]) == 0


def per_token_losses(model, batch) -> torch.Tensor:
    tree = {"subtree_end": batch["subtree_end"]} if "subtree_end" in batch else {}
    hidden = model(
        batch["input_ids"], batch["position_ids"], batch.get("document_ids"), return_hidden=True, **tree
    )
    if "loss_positions" in batch:
        positions, targets = batch["loss_positions"], batch["loss_targets"]
    else:
        positions, targets = trained_positions(batch["labels"])
    logits = model.output_logits(hidden.flatten(0, 1)[positions])
    return F.cross_entropy(logits, targets, reduction="none")


@pytest.mark.parametrize("seed", range(4))
def test_tree_batch_losses_and_gradients_equal_the_rows_run_separately(seed):
    """fp32, 1e-6 relative: each token's loss and the batch_loss_sum the module trains on; the gradients
    to the fp32 floor of summing in another order."""
    units_by_row = random_rows_of_units(seed, 2)
    units_by_row[0].append(split_conversation_rows(np.random.default_rng(seed + 100), 3))  # one tree at least
    tree_batch = collate_rows([packed_row(units) for units in units_by_row])
    # The pairs' order: every row's document pairs (row-major), then each row's tree pairs, turn by turn.
    documents = [unit[0] for units in units_by_row for unit in units if len(unit) == 1]
    trees = [example for units in units_by_row for unit in units if len(unit) > 1 for example in unit]
    separate_batch = collate_rows([example_row(ids, labels) for ids, labels in documents + trees])
    assert int(tree_batch["real_tokens"]) < int(separate_batch["real_tokens"])
    separate_model, tree_model = tiny_model(), tiny_model()
    separate = per_token_losses(separate_model, separate_batch)
    shared = per_token_losses(tree_model, tree_batch)
    torch.testing.assert_close(shared, separate, rtol=1e-6, atol=0)
    (separate_sum, separate_count), (tree_sum, tree_count) = (
        batch_loss_sum(separate_model, separate_batch, chunk_tokens=5),
        batch_loss_sum(tree_model, tree_batch, chunk_tokens=5),
    )
    assert int(tree_count) == int(separate_count) == len(separate)
    torch.testing.assert_close(tree_sum, separate_sum, rtol=1e-6, atol=0)
    separate_sum.backward()
    tree_sum.backward()
    separate_grad, tree_grad = (
        torch.cat([p.grad.flatten() for p in model.parameters()]) for model in (separate_model, tree_model)
    )
    # Gradients sum many fp32 terms in another order: the same rows batched or run one by one already differ
    # by up to 1.2e-6 overall and 1.5e-6 in one parameter (a norm-1 RMSNorm weight), so 2e-6 and 5e-6 here.
    assert torch.linalg.norm(tree_grad - separate_grad) <= 2e-6 * torch.linalg.norm(separate_grad)
    for (name, a), b in zip(separate_model.named_parameters(), tree_model.parameters(), strict=True):
        assert torch.linalg.norm(b.grad - a.grad) <= 5e-6 * torch.linalg.norm(a.grad), name
