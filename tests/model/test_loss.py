"""The trained-position loss: the same value and gradient as cross-entropy over full logits, chunk by chunk,
without ever holding more than one chunk's logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sft.loss import batch_loss_sum, full_logits_loss_sum, trained_positions, trained_token_loss_sum
from sft.protocol.labels import IGNORE_INDEX
from tests.helpers import assert_relative_close, loss_and_grads, packed_batch, random_ids, tiny_model


def full_logits_reference(model, batch):
    logits = model(batch["input_ids"], position_ids=batch["position_ids"], document_ids=batch["document_ids"])
    return full_logits_loss_sum(logits, batch["labels"])


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("chunk_tokens", [1, 5, 1024])
def test_chunked_loss_equals_full_logits_cross_entropy_in_value_and_gradient(tied, chunk_tokens):
    model = tiny_model(tie_word_embeddings=tied).train()
    batch = packed_batch()
    want_loss, want_grads = loss_and_grads(model, lambda: full_logits_reference(model, batch))
    got_loss, got_grads = loss_and_grads(model, lambda: batch_loss_sum(model, batch, chunk_tokens))
    assert abs(float(got_loss - want_loss)) / float(want_loss) < 1e-6
    assert_relative_close(got_grads, want_grads, 1e-6)


def test_no_more_than_one_chunk_of_logits_is_ever_computed():
    """Forward and the recomputation in backward both see at most `chunk_tokens` rows (the old loss
    computed the logits of every position at once)."""
    model = tiny_model().train()
    batch = packed_batch()
    rows_seen: list[int] = []
    head = model.output_logits
    model.output_logits = lambda hidden: rows_seen.append(hidden.shape[0]) or head(hidden)
    loss_sum, count = batch_loss_sum(model, batch, chunk_tokens=4)
    forward_rows = list(rows_seen)
    loss_sum.backward()
    assert int(count) == len(trained_positions(batch["labels"])[0]) > 8
    assert max(rows_seen) == 4 and sum(forward_rows) == int(count)
    assert len(rows_seen) == 2 * len(forward_rows)  # each chunk recomputed once in backward


def test_bf16_autocast_matches_within_its_precision():
    model = tiny_model().train()
    batch = packed_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_loss, want_grads = loss_and_grads(model, lambda: full_logits_reference(model, batch))
        got_loss, got_grads = loss_and_grads(model, lambda: batch_loss_sum(model, batch, 4))
    assert abs(float(got_loss - want_loss)) / float(want_loss) < 1e-2
    assert_relative_close(got_grads, want_grads, 5e-2)


def test_explicit_pairs_score_any_position_against_any_target():
    """The pairs interface serves layouts where the next token is not at the next position (prefix trees)."""
    model = tiny_model().train()
    input_ids = random_ids(2, 10)
    positions = torch.tensor([3, 3, 12, 0, 19])  # position 3 predicts two branches; flat indices over 2 x 10
    targets = torch.tensor([5, 8, 1, 96, 40])
    hidden = model(input_ids, return_hidden=True)
    loss_sum, count = trained_token_loss_sum(hidden, model.output_logits, positions, targets, chunk_tokens=2)
    logits = model(input_ids).flatten(0, 1)
    assert int(count) == 5
    torch.testing.assert_close(loss_sum, F.cross_entropy(logits[positions], targets, reduction="sum"))


def test_no_trained_token_gives_an_exact_zero_that_still_reaches_the_head():
    model = tiny_model().train()
    batch = packed_batch()
    batch["labels"][:] = IGNORE_INDEX
    loss_sum, count = batch_loss_sum(model, batch)
    assert int(count) == 0 and loss_sum.item() == 0.0
    loss_sum.backward()
    assert model.lm_head.weight.grad is not None and not model.lm_head.weight.grad.any()


def test_trained_positions_pair_each_position_with_the_next_label():
    labels = torch.tensor([[IGNORE_INDEX, 4, IGNORE_INDEX, 7], [IGNORE_INDEX, IGNORE_INDEX, 9, 2]])
    positions, targets = trained_positions(labels)
    assert positions.tolist() == [0, 2, 5, 6] and targets.tolist() == [4, 7, 9, 2]


def test_a_non_positive_chunk_size_is_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="loss_chunk_tokens"):
        batch_loss_sum(model, packed_batch(), chunk_tokens=0)
