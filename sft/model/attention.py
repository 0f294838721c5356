"""Causal attention that keeps packed documents apart without a dense T×T mask where it can.

A packed row holds several documents laid end to end; a token must see only the earlier tokens of its own
document (DESIGN.md invariant 3). Three ways, chosen by `model.packed_attention`:
- `documents`: causal SDPA over each document's slice. No mask at all and no wasted blocks; what CPU
  training uses (torch 2.13's flex_attention has no CPU backward).
- `flex`: flex_attention with a block mask built from the document ids (compiled; GPU training).
- `dense`: one boolean mask [B, 1, T, T]. The fallback, and the path for any other mask (a KV cache,
  prefix trees): `attend` takes an arbitrary boolean mask in `AttentionPlan.mask`.
`auto` is flex on CUDA and documents elsewhere.

A batch holding prefix trees (sft.data.collate) gives `subtree_end` [B, T] instead of document ids: key j is
visible to query i iff j <= i < subtree_end[j]. `flex` takes that as its mask_mod; every other mode uses the
dense mask (on CPU the tree always does: there is no per-document slice to attend over).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

PackedAttention = Literal["auto", "documents", "flex", "dense"]  # the `model.packed_attention` values
PACKED_ATTENTION_MODES = typing.get_args(PackedAttention)


@dataclass
class AttentionPlan:
    """What every layer's attention needs for one forward; with nothing set it is plain causal attention."""

    mask: Tensor | None = None  # boolean, True = attend: [T, past + T] or [B, 1, T, past + T]
    document_offsets: list[int] | None = None  # runs of one document over the flattened [B * T] tokens
    block_mask: Any = None  # a flex_attention BlockMask


def causal_mask(
    num_new: int, num_past: int, document_ids: Tensor | None, device: torch.device
) -> Tensor | None:
    """Boolean SDPA mask (True = attend), or None when `is_causal=True` alone is exact.

    New token i sits at cache position num_past + i and sees every cached token and the new tokens up to
    itself; with `document_ids` [B, T] only the earlier tokens of its own document. `is_causal` cannot serve
    a non-empty cache: SDPA aligns its triangle to the top-left, hiding the cache from all but the first
    new token. The diagonal is always allowed, so no row is empty (an empty row makes SDPA return NaN).
    """
    if document_ids is None and num_past == 0:
        return None
    query_positions = torch.arange(num_past, num_past + num_new, device=device)
    key_positions = torch.arange(num_past + num_new, device=device)
    mask = key_positions[None, :] <= query_positions[:, None]  # [T, past + T]
    if document_ids is not None:
        same_document = document_ids[:, :, None] == document_ids[:, None, :]  # [B, T, T]
        mask = (mask & same_document)[:, None]  # [B, 1, T, T]: one mask for all heads
    return mask


def padded_causal_mask(attention_mask: Tensor, num_new: int) -> Tensor:
    """Boolean SDPA mask [B, 1, T, past + T] for left-padded rows: causal over the cache and the new tokens,
    never attending a padding key (`attention_mask` [B, past + T]: 0 at padding, as transformers takes it).
    The diagonal is always allowed, so a padding query's row is never empty (SDPA gives NaN for one)."""
    total = attention_mask.shape[1]
    query_positions = torch.arange(total - num_new, total, device=attention_mask.device)
    key_positions = torch.arange(total, device=attention_mask.device)
    mask = (key_positions[None, :] <= query_positions[:, None]) & attention_mask.bool()[:, None, :]
    return (mask | (key_positions[None, :] == query_positions[:, None]))[:, None]


def document_offsets(document_ids: Tensor) -> Tensor:
    """Where each run of equal ids starts in the flattened [B * T] tokens, then B * T (FlashAttention's
    `cu_seqlens`, int32). A run never crosses a row: every row starts one. Documents must be contiguous,
    as the collate lays them out."""
    batch, seq_len = document_ids.shape
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    offsets = starts.flatten().nonzero().flatten()
    return torch.cat([offsets, offsets.new_tensor([batch * seq_len])]).to(torch.int32)


def attend_per_document(
    q: Tensor, k: Tensor, v: Tensor, offsets: list[int], scale: float | None = None, dropout: float = 0.0
) -> Tensor:
    """Causal SDPA over each document's slice of q, k, v [B, heads, T, head_dim] (k/v with q's heads);
    `offsets` from `document_offsets`. The same outputs and gradients as the dense block-diagonal mask,
    without building it and without computing the blocks it masks out."""
    batch, heads, seq_len, head_dim = q.shape
    lengths = [end - start for start, end in zip(offsets[:-1], offsets[1:], strict=True)]

    def documents(x: Tensor) -> tuple[Tensor, ...]:
        # split, not slicing: its backward writes every document's gradient into one buffer at once
        return x.transpose(0, 1).reshape(heads, batch * seq_len, head_dim).split(lengths, dim=1)

    pieces = [
        F.scaled_dot_product_attention(q_doc, k_doc, v_doc, is_causal=True, scale=scale, dropout_p=dropout)
        for q_doc, k_doc, v_doc in zip(documents(q), documents(k), documents(v), strict=True)
    ]
    return torch.cat(pieces, dim=1).view(heads, batch, seq_len, head_dim).transpose(0, 1)


def document_block_mask(document_ids: Tensor):
    """A flex_attention BlockMask in which a token sees the earlier tokens of its own document."""
    from torch.nn.attention.flex_attention import create_block_mask

    def same_document_causal(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (kv_idx <= q_idx) & (document_ids[b, q_idx] == document_ids[b, kv_idx])

    batch, seq_len = document_ids.shape
    return create_block_mask(same_document_causal, batch, None, seq_len, seq_len, device=document_ids.device)


def tree_mask(subtree_end: Tensor) -> Tensor:
    """Boolean SDPA mask [B, 1, T, T] of prefix trees laid in rows: query i sees key j iff
    j <= i < subtree_end[b, j] (its ancestors and itself). The diagonal is always in, so no row is empty."""
    index = torch.arange(subtree_end.shape[1], device=subtree_end.device)
    mask = (index[None, None, :] <= index[None, :, None]) & (index[None, :, None] < subtree_end[:, None, :])
    return mask[:, None]


def tree_block_mask(subtree_end: Tensor):
    """The same visibility as `tree_mask`, as a flex_attention BlockMask."""
    from torch.nn.attention.flex_attention import create_block_mask

    def ancestor_or_self(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (kv_idx <= q_idx) & (q_idx < subtree_end[b, kv_idx])

    batch, seq_len = subtree_end.shape
    return create_block_mask(ancestor_or_self, batch, None, seq_len, seq_len, device=subtree_end.device)


def resolve_packed_attention(mode: str, device: torch.device) -> str:
    if mode not in PACKED_ATTENTION_MODES:
        raise ValueError(
            f"model.packed_attention={mode!r}: expected one of {', '.join(PACKED_ATTENTION_MODES)}"
        )
    if mode == "auto":
        return "flex" if device.type == "cuda" else "documents"
    return mode


def plan_attention(
    num_new: int,
    num_past: int,
    document_ids: Tensor | None,
    mode: str,
    device: torch.device,
    subtree_end: Tensor | None = None,
) -> AttentionPlan:
    """The plan for `num_new` tokens after `num_past` cached ones; packed rows (`document_ids` [B, T]) are
    kept apart as `mode` (a `PACKED_ATTENTION_MODES` value) says; rows of prefix trees (`subtree_end`
    [B, T]) get the flex tree mask under `flex`, else the dense one."""
    if subtree_end is not None:
        if num_past or document_ids is not None:
            raise ValueError("subtree_end (prefix trees) cannot be combined with a KV cache or document_ids")
        if resolve_packed_attention(mode, device) == "flex":
            return AttentionPlan(block_mask=tree_block_mask(subtree_end))
        return AttentionPlan(mask=tree_mask(subtree_end))
    if document_ids is None or num_past:
        return AttentionPlan(mask=causal_mask(num_new, num_past, document_ids, device))
    resolved = resolve_packed_attention(mode, device)
    if resolved == "documents":
        return AttentionPlan(document_offsets=document_offsets(document_ids).tolist())
    if resolved == "flex":
        return AttentionPlan(block_mask=document_block_mask(document_ids))
    return AttentionPlan(mask=causal_mask(num_new, 0, document_ids, document_ids.device))


_compiled_flex_attention = None


def flex_attention(q: Tensor, k: Tensor, v: Tensor, block_mask) -> Tensor:
    """flex_attention, compiled once per process where that makes it fast (eager runs a slow reference)."""
    global _compiled_flex_attention
    from torch.nn.attention import flex_attention as flex

    if q.device.type != "cuda":
        return flex.flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)
    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex.flex_attention, dynamic=False)
    return _compiled_flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)


def attend(q: Tensor, k: Tensor, v: Tensor, plan: AttentionPlan) -> Tensor:
    """Attention output [B, heads, T, head_dim] for q [B, heads, T, d] and k/v [B, kv_heads, S, d]; each k/v
    head serves a group of consecutive query heads (HF's repeat_kv layout)."""
    if plan.block_mask is not None:
        return flex_attention(q, k, v, plan.block_mask)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if plan.document_offsets is not None:
        return attend_per_document(q, k, v, plan.document_offsets)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=plan.mask, is_causal=plan.mask is None)
