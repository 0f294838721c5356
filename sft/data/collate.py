"""Rows of examples → padded batches (no Lightning: sft-eval and the training data module share it)."""

from __future__ import annotations

import numpy as np
import torch

from sft.protocol.labels import IGNORE_INDEX


def example_row(input_ids: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """One example alone in its row: positions from 0, one document."""
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": np.arange(len(input_ids)),
        "document_ids": np.zeros(len(input_ids), dtype=np.int64),
    }


def collate_rows(rows: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest; padding is its own document (-1), never a target.

    Rows of one example each need no document ids: under causal attention right padding cannot reach the
    real tokens, so the model may take its fast `is_causal` path. `real_tokens` (the unpadded count) stays
    a tensor: the trainer sums it on the device and reads it once per logging interval."""
    width = max(len(row["input_ids"]) for row in rows)
    fill = {"input_ids": 0, "labels": IGNORE_INDEX, "position_ids": 0, "document_ids": -1}
    if all(row["document_ids"][-1] == 0 for row in rows):
        del fill["document_ids"]
    batch = {key: torch.full((len(rows), width), value, dtype=torch.long) for key, value in fill.items()}
    for i, row in enumerate(rows):
        for key in fill:
            batch[key][i, : len(row[key])] = torch.from_numpy(row[key].astype(np.int64))
    batch["real_tokens"] = torch.tensor(sum(len(row["input_ids"]) for row in rows))
    return batch
