"""The assistant-only loss as a sum, computed at the trained positions only and in chunks.

Normalising by the global trained-token count happens in SFTModule. The loss never builds the full
[B, T, vocab] logits (DESIGN.md invariant 2): it gathers the hidden states of the positions whose next token
is trained, and applies the output head and cross-entropy `chunk_tokens` positions at a time. Each chunk is
checkpointed, so its logits are freed after its forward and recomputed in the backward: at most one chunk's
logits (and their gradient) exist at any time, about 12 bytes × chunk_tokens × vocab.

The loss takes explicit (position, target id) pairs. A plain or packed row's pairs come from its labels
(`trained_positions`: position t predicts labels[t + 1]); a layout where the next token is not at the next
position (a prefix tree, at a branch) gives its own pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from sft.protocol.labels import IGNORE_INDEX

DEFAULT_LOSS_CHUNK_TOKENS = 1024


def trained_positions(labels: Tensor) -> tuple[Tensor, Tensor]:
    """(positions into the flattened [B * T] tokens, target ids) of every trained prediction in `labels`
    [B, T] (aligned with the inputs, IGNORE_INDEX where not trained): position t predicts labels[t + 1]."""
    seq_len = labels.shape[1]
    next_labels = labels[:, 1:]
    rows, columns = (next_labels != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows * seq_len + columns, next_labels[rows, columns]


def chunk_loss_sum(output_logits: Callable[[Tensor], Tensor], hidden: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(output_logits(hidden).float(), targets, reduction="sum")


def trained_token_loss_sum(
    hidden: Tensor,
    output_logits: Callable[[Tensor], Tensor],
    positions: Tensor,
    targets: Tensor,
    chunk_tokens: int = DEFAULT_LOSS_CHUNK_TOKENS,
) -> tuple[Tensor, Tensor]:
    """(sum of cross-entropy over the (position, target) pairs, number of pairs).

    hidden: final hidden states [B, T, H] (the model's forward with `return_hidden=True`); output_logits:
    the model's head, hidden [N, H] -> logits [N, vocab]. With no pair the sum is an exact 0 that still
    reaches the head's parameters, never a NaN from 0 / 0.
    """
    if chunk_tokens < 1:
        raise ValueError(f"optim.loss_chunk_tokens={chunk_tokens}: expected a positive number of tokens")
    selected = hidden.flatten(0, -2).index_select(0, positions)
    if len(positions) == 0:
        return output_logits(selected).float().sum(), positions.new_zeros(())
    recompute = torch.is_grad_enabled()
    loss_sum = None
    for start in range(0, len(positions), chunk_tokens):
        piece = (output_logits, selected[start : start + chunk_tokens], targets[start : start + chunk_tokens])
        chunk = (
            checkpoint(chunk_loss_sum, *piece, use_reentrant=False) if recompute else chunk_loss_sum(*piece)
        )
        loss_sum = chunk if loss_sum is None else loss_sum + chunk
    return loss_sum, positions.new_tensor(len(positions))


def batch_loss_sum(
    model: torch.nn.Module, batch: Mapping[str, Tensor], chunk_tokens: int = DEFAULT_LOSS_CHUNK_TOKENS
) -> tuple[Tensor, Tensor]:
    """(loss sum, trained tokens) of a collated batch (input_ids, labels; position_ids and document_ids
    when packed; for prefix trees subtree_end and explicit `loss_positions`/`loss_targets` pairs instead of
    labels and document ids: sft.data.collate) through a model with the project's forward and
    `output_logits` (sft.model). Trained tokens = pairs, so the global token mean stays exact."""
    tree = {"subtree_end": batch["subtree_end"]} if "subtree_end" in batch else {}
    hidden = model(
        batch["input_ids"],
        position_ids=batch.get("position_ids"),
        document_ids=batch.get("document_ids"),
        return_hidden=True,
        **tree,
    )
    if "loss_positions" in batch:
        positions, targets = batch["loss_positions"], batch["loss_targets"]
    else:
        positions, targets = trained_positions(batch["labels"])
    return trained_token_loss_sum(hidden, model.output_logits, positions, targets, chunk_tokens)


def full_logits_loss_sum(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The same sum from full logits [B, T, vocab] (what a model that only returns logits allows: the
    reference in tests and the 'before' column of scripts/bench_memory_model.py)."""
    shifted_logits = logits[:, :-1].reshape(-1, logits.size(-1)).float()
    shifted_labels = labels[:, 1:].reshape(-1)
    loss_sum = F.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, (shifted_labels != IGNORE_INDEX).sum()
