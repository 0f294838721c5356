"""Rows of examples → padded batches (no Lightning: sft-eval and the training data module share it).

A row holds packing units laid end to end: one example (a document: positions from 0, its first token never
a target), or the per-turn rows of one split conversation as their prefix tree (sft.data.prefix_tree), each
shared token once. A batch with a tree carries what its layout needs instead of labels: `subtree_end`
[B, T] (key j is visible to query i iff j <= i < subtree_end[j]; a document is a path, a padding token sees
itself) and explicit loss pairs, `loss_positions` into the flattened [B * T] tokens and `loss_targets`.
Batches without a tree keep labels and document ids, and with them the model's fast attention paths.
Trees are built here, per batch, not kept from the start: building one takes about 1 ms of CPU for a
16-turn 8k-token conversation, while keeping it would hold about 1 MB of memory per such conversation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from sft.data.prefix_tree import build_prefix_tree
from sft.protocol.labels import IGNORE_INDEX

Unit = Sequence[tuple[np.ndarray, np.ndarray]]  # the (input_ids, labels) rows of one packing unit


def example_row(input_ids: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """One example alone in its row: positions from 0, one document."""
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": np.arange(len(input_ids)),
        "document_ids": np.zeros(len(input_ids), dtype=np.int64),
    }


def packed_row(units: Sequence[Unit]) -> dict[str, np.ndarray]:
    """Units laid end to end in one row, each its own document. A row that holds a tree also gets
    `subtree_end` (row indices) and the loss pairs (`loss_positions` within the row, `loss_targets`); its
    tree tokens have no labels, since at a branch the next token is not the next position."""
    pieces: dict[str, list[np.ndarray]] = {key: [] for key in DOCUMENT_KEYS + TREE_KEYS}
    start = 0
    for document, unit in enumerate(units):
        if len(unit) == 1:
            ids, labels = unit[0]
            labels = labels.copy()
            labels[0] = IGNORE_INDEX  # not predicted from the previous document's last token
            positions, subtree_end = np.arange(len(ids)), np.full(len(ids), start + len(ids))
        else:
            tree = build_prefix_tree(unit)
            ids, labels = tree.input_ids, np.full(len(tree), IGNORE_INDEX, dtype=np.int64)
            positions, subtree_end = tree.position_ids, tree.subtree_end + start
            pieces["loss_positions"].append(tree.loss_positions + start)
            pieces["loss_targets"].append(tree.loss_targets)
        for key, value in (
            ("input_ids", ids),
            ("labels", labels),
            ("position_ids", positions),
            ("document_ids", np.full(len(ids), document)),
            ("subtree_end", subtree_end),
        ):
            pieces[key].append(value)
        start += len(ids)
    keys = DOCUMENT_KEYS + TREE_KEYS if pieces["loss_positions"] else DOCUMENT_KEYS
    return {key: np.concatenate(pieces[key]) for key in keys}


DOCUMENT_KEYS = ("input_ids", "labels", "position_ids", "document_ids")
TREE_KEYS = ("subtree_end", "loss_positions", "loss_targets")


def without_targets(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The row with nothing trained: it runs through the model like any row and adds nothing to the loss."""
    empty = {key: row[key][:0] for key in ("loss_positions", "loss_targets") if key in row}
    return {**row, "labels": np.full_like(row["labels"], IGNORE_INDEX), **empty}


def collate_rows(rows: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest; padding is its own document (-1), never a target.

    Rows of one example each need no document ids: under causal attention right padding cannot reach the
    real tokens, so the model may take its fast `is_causal` path. `real_tokens` (the unpadded count: a
    tree's nodes, what is computed) stays a tensor: the trainer sums it on the device and reads it once per
    logging interval."""
    width = max(len(row["input_ids"]) for row in rows)
    fill = {"input_ids": 0, "labels": IGNORE_INDEX, "position_ids": 0, "document_ids": -1}
    if all(row["document_ids"][-1] == 0 for row in rows):
        del fill["document_ids"]
    batch = {key: torch.full((len(rows), width), value, dtype=torch.long) for key, value in fill.items()}
    for i, row in enumerate(rows):
        for key in fill:
            batch[key][i, : len(row[key])] = torch.from_numpy(row[key].astype(np.int64))
    batch["real_tokens"] = torch.tensor(sum(len(row["input_ids"]) for row in rows))
    if any("loss_positions" in row for row in rows):
        batch.update(tree_inputs(rows, batch.pop("labels").numpy(), width))
        batch.pop("document_ids", None)
    return batch


def tree_inputs(rows: list[dict[str, np.ndarray]], labels: np.ndarray, width: int) -> dict[str, torch.Tensor]:
    """`subtree_end` [B, width] and the loss pairs of a batch with a tree: a row's tree pairs, and for
    its documents (and every row without a tree) position t predicting labels[t + 1]."""
    subtree_end = np.tile(np.arange(1, width + 1), (len(rows), 1))  # padding sees itself only
    trained_rows, trained_columns = np.nonzero(labels[:, 1:] != IGNORE_INDEX)
    positions = [trained_rows * width + trained_columns]
    targets = [labels[trained_rows, trained_columns + 1]]
    for i, row in enumerate(rows):
        subtree_end[i, : len(row["input_ids"])] = (
            row["subtree_end"] if "subtree_end" in row else document_ends(row["document_ids"])
        )
        if "loss_positions" in row:
            positions.append(row["loss_positions"] + i * width)
            targets.append(row["loss_targets"])
    return {
        "subtree_end": torch.from_numpy(subtree_end.astype(np.int64)),
        "loss_positions": torch.from_numpy(np.concatenate(positions).astype(np.int64)),
        "loss_targets": torch.from_numpy(np.concatenate(targets).astype(np.int64)),
    }


def document_ends(document_ids: np.ndarray) -> np.ndarray:
    """Each token's document end (one past its last token): a document as a path of the tree."""
    starts = np.flatnonzero(np.diff(document_ids)) + 1
    ends = np.append(starts, len(document_ids))
    return ends[np.searchsorted(starts, np.arange(len(document_ids)), side="right")]
