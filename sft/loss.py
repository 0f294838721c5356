"""The assistant-only loss as a sum: normalising by the global trained-token count happens in SFTModule."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sft.protocol.labels import IGNORE_INDEX


def masked_token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of cross-entropy over trained tokens, number of trained tokens); the shift happens here.

    Labels are aligned with the inputs, so the logits at t predict labels at t + 1. With no trained
    token the sum is an exact 0 that still carries a graph, never a NaN from 0 / 0.
    """
    shifted_logits = logits[:, :-1].reshape(-1, logits.size(-1)).float()
    shifted_labels = labels[:, 1:].reshape(-1)
    loss_sum = F.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, (shifted_labels != IGNORE_INDEX).sum()
