"""Packed attention without dense masks (per-document sdpa, flex block masks) equals the dense mask;
activation checkpointing changes neither loss nor gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sft.loss import batch_loss_sum
from sft.model.attention import (
    AttentionPlan,
    attend,
    causal_mask,
    document_block_mask,
    document_offsets,
    flex_attention,
    plan_attention,
    tree_mask,
)
from tests.helpers import assert_relative_close, loss_and_grads, packed_batch, tiny_model

# Two rows: four documents and padding (its own id), then a single document.
DOCUMENT_IDS = torch.tensor([[0] * 40 + [1] * 70 + [2] * 3 + [3] * 100 + [-1] * 43, [5] * 256])


def qkv(seed: int = 0, heads: int = 4, kv_heads: int = 2) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(2, heads, 256, 16), (2, kv_heads, 256, 16), (2, kv_heads, 256, 16)]
    return tuple(torch.randn(shape, generator=generator, requires_grad=True) for shape in shapes)


def test_document_offsets_start_every_run_and_every_row():
    offsets = document_offsets(torch.tensor([[0, 0, 1, 1, 1, -1], [4, 4, 4, 4, 4, 4]]))
    assert offsets.tolist() == [0, 2, 5, 6, 12] and offsets.dtype == torch.int32


def test_per_document_attention_equals_the_dense_mask_in_outputs_and_gradients():
    dense_plan = AttentionPlan(mask=causal_mask(256, 0, DOCUMENT_IDS, torch.device("cpu")))
    per_document = plan_attention(256, 0, DOCUMENT_IDS, "documents", torch.device("cpu"))
    assert per_document.mask is None and per_document.document_offsets is not None
    results = []
    for plan in (dense_plan, per_document):
        q, k, v = qkv()
        output = attend(q, k, v, plan)
        (output * torch.linspace(-1, 1, 16)).sum().backward()
        results.append((output.detach(), q.grad, k.grad, v.grad))
    for dense, documents in zip(*results, strict=True):
        torch.testing.assert_close(documents, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")
def test_flex_block_mask_equals_the_dense_mask_in_a_forward_pass():
    """CPU runs flex_attention eagerly (forward only): what the GPU path compiles is the same mask."""
    q, k, v = (t.detach() for t in qkv())
    block_mask = document_block_mask(DOCUMENT_IDS)
    dense = causal_mask(256, 0, DOCUMENT_IDS, torch.device("cpu"))
    expected = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), attn_mask=dense
    )
    torch.testing.assert_close(flex_attention(q, k, v, block_mask), expected, atol=1e-5, rtol=1e-5)


def test_the_dense_path_takes_an_arbitrary_boolean_mask():
    """Prefix trees on CPU: any mask goes through the dense path, e.g. one where a branch skips a sibling."""
    q, k, v = (t.detach()[:1, :, :5] for t in qkv())
    mask = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 0, 1, 0], [1, 1, 0, 1, 1]],
        dtype=torch.bool,
    )
    got = attend(q, k, v, AttentionPlan(mask=mask))
    scores = q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) / 4.0
    weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    torch.testing.assert_close(got, weights @ v.repeat_interleave(2, dim=1), atol=1e-5, rtol=1e-5)


# Two rows of prefix trees: node 3's subtree skips nodes 1-2 (a branch), then a path; padding sees itself.
SUBTREE_END = torch.tensor([[5, 3, 3, 5, 5, 6, 7, 8], [4, 4, 4, 4, 5, 6, 7, 8]])


def test_tree_mask_shows_each_token_its_ancestors_and_itself():
    mask = tree_mask(SUBTREE_END)[:, 0]
    assert mask.shape == (2, 8, 8)
    assert [mask[0, 3].nonzero().flatten().tolist(), mask[0, 4].nonzero().flatten().tolist()] == [
        [0, 3],
        [0, 3, 4],
    ]
    assert mask[1, :4, :4].equal(torch.ones(4, 4, dtype=torch.bool).tril())  # a path is a causal document
    assert mask[:, 5:].sum(-1).eq(1).all()  # padding sees itself only


@pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")
def test_tree_plans_use_the_flex_tree_mask_or_else_the_dense_one():
    """On CPU (`documents`, the default) a tree takes the dense mask; under flex the same tree as a
    mask_mod (forward only on CPU)."""
    q, k, v = (t.detach()[:, :, :8] for t in qkv())
    cpu = torch.device("cpu")
    dense = plan_attention(8, 0, None, "documents", cpu, subtree_end=SUBTREE_END)
    assert dense.mask is not None and dense.mask.equal(tree_mask(SUBTREE_END))
    flex = plan_attention(8, 0, None, "flex", cpu, subtree_end=SUBTREE_END)
    assert flex.block_mask is not None
    torch.testing.assert_close(attend(q, k, v, flex), attend(q, k, v, dense), atol=1e-5, rtol=1e-5)


def test_unknown_packed_attention_mode_is_refused():
    with pytest.raises(ValueError, match="packed_attention"):
        plan_attention(4, 0, torch.zeros(1, 4, dtype=torch.long), "sparse", torch.device("cpu"))


def model_loss_and_grads(seed: int = 0, **overrides):
    model = tiny_model(seed, **overrides).train()
    return loss_and_grads(model, lambda: batch_loss_sum(model, packed_batch(), chunk_tokens=4))


def test_llama_per_document_attention_trains_exactly_as_the_dense_mask():
    dense_loss, dense_grads = model_loss_and_grads(packed_attention="dense")
    loss, grads = model_loss_and_grads(packed_attention="documents")
    assert abs(float(loss - dense_loss)) / float(dense_loss) < 1e-6
    assert_relative_close(grads, dense_grads, 1e-5)


def test_activation_checkpointing_keeps_the_loss_and_gradients(monkeypatch):
    import torch.utils.checkpoint

    calls = []
    original = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr("sft.model.llama.checkpoint", lambda *a, **k: calls.append(k) or original(*a, **k))
    plain_loss, plain_grads = model_loss_and_grads()
    loss, grads = model_loss_and_grads(activation_checkpointing=True)
    assert len(calls) == 3 and all(call["use_reentrant"] is False for call in calls)  # one per decoder layer
    assert torch.equal(loss, plain_loss)
    assert_relative_close(grads, plain_grads, 1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex_attention trains on CUDA only")
def test_flex_attention_trains_exactly_as_the_dense_mask_on_cuda():
    results = []
    for mode in ("dense", "flex"):
        model = tiny_model(packed_attention=mode).cuda().train()
        batch = {key: value.cuda() for key, value in packed_batch().items()}
        results.append(loss_and_grads(model, lambda m=model, b=batch: batch_loss_sum(m, b, chunk_tokens=4)))
    (dense_loss, dense_grads), (flex_loss, flex_grads) = results
    assert abs(float(flex_loss - dense_loss)) / float(dense_loss) < 1e-5
    assert_relative_close(flex_grads, dense_grads, 1e-4)
