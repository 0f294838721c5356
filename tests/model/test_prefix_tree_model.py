"""A prefix tree of split rows through the Llama decoder (dense tree mask, positions from the parent, loss at
explicit (node, target) pairs) gives the per-token losses and gradients of the rows run separately."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sft.data.prefix_tree import build_prefix_tree
from sft.model.attention import AttentionPlan, tree_mask
from sft.model.llama import LlamaConfig, LlamaForCausalLM, rotary_cos_sin
from sft.protocol.labels import IGNORE_INDEX


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)  # a large init, so that attention is far from uniform and mask mistakes show
    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=72, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def hidden_states(
    model, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """The decoder's final hidden states [1, T, H] under an explicit boolean attention mask [T, T]."""
    decoder = model.model
    x = decoder.embed_tokens(ids[None])
    cos, sin = rotary_cos_sin(positions[None], model.config.head_dim, model.config.rope_theta, x.dtype)
    for layer in decoder.layers:
        x = layer(x, cos, sin, AttentionPlan(mask=mask), None)
    return decoder.norm(x)


def per_token_losses_of_rows(model, rows) -> torch.Tensor:
    losses = []
    for ids, labels in rows:
        ids_t = torch.as_tensor(ids)
        causal = torch.ones(len(ids), len(ids), dtype=torch.bool).tril()  # the same kernel as the tree's
        logits = model.lm_head(hidden_states(model, ids_t, torch.arange(len(ids)), causal))[0]
        trained = np.flatnonzero(labels[1:] != IGNORE_INDEX)
        losses.append(
            F.cross_entropy(logits[trained], torch.as_tensor(labels[trained + 1]), reduction="none")
        )
    return torch.cat(losses)


def per_token_losses_of_tree(model, tree) -> torch.Tensor:
    ids, positions = torch.as_tensor(tree.input_ids), torch.as_tensor(tree.position_ids)
    hidden = hidden_states(model, ids, positions, tree_mask(torch.as_tensor(tree.subtree_end)[None])[0, 0])[0]
    logits = model.lm_head(hidden[torch.as_tensor(tree.loss_positions)])
    return F.cross_entropy(logits, torch.as_tensor(tree.loss_targets), reduction="none")


def split_rows(seed: int = 0):
    """Rows as a history-rewriting template gives them: shared history, then each turn's own text."""
    rng = np.random.default_rng(seed)
    system, turn1, turn1_history, user2, turn2 = (rng.integers(0, 97, n) for n in (9, 7, 3, 5, 6))
    first = np.concatenate([system, turn1])
    second = np.concatenate([system, turn1_history, user2, turn2])

    def trained_tail(ids, count):
        labels = np.full_like(ids, IGNORE_INDEX)
        labels[-count:] = ids[-count:]
        return ids.astype(np.int64), labels.astype(np.int64)

    return [trained_tail(first, len(turn1)), trained_tail(second, len(turn2))]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tree_losses_and_gradients_equal_the_separate_rows(seed):
    """fp32, to 1e-6 relative: each token's loss, and each parameter's gradient in norm (the same math
    summed in another order; RMSNorm and rotary run in fp32 even in an fp64 model, so fp32 is the floor)."""
    dtype, tolerance = torch.float32, 1e-6
    rows = split_rows(seed)
    tree = build_prefix_tree(rows)
    assert len(tree) < sum(len(ids) for ids, _ in rows)  # the history is computed once
    separate_model, tree_model = tiny_model().to(dtype), tiny_model().to(dtype)
    separate = per_token_losses_of_rows(separate_model, rows)
    shared = per_token_losses_of_tree(tree_model, tree)
    torch.testing.assert_close(shared, separate, rtol=tolerance, atol=0)
    separate.sum().backward()
    shared.sum().backward()
    for (name, a), b in zip(separate_model.named_parameters(), tree_model.parameters(), strict=True):
        assert torch.linalg.norm(b.grad - a.grad) <= tolerance * torch.linalg.norm(a.grad), name
