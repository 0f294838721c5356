"""The assistant-only loss: token-mean normalisation over the global batch, zero-token batches, packing."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from sft.data.collate import collate_rows, example_row, packed_row, without_targets
from sft.loss import full_logits_loss_sum
from sft.module import SFTModule
from sft.protocol.labels import IGNORE_INDEX
from tests.helpers import MODEL, OPTIM, make_examples, split_conversation_rows, trained_document


class GradientCapture(SFTModule):
    """Keeps the gradients as the optimizer will see them (after normalisation)."""

    captured: list[dict[str, torch.Tensor]]

    def on_before_optimizer_step(self, optimizer):
        super().on_before_optimizer_step(optimizer)
        self.captured = getattr(self, "captured", [])
        self.captured.append({n: p.grad.clone() for n, p in self.named_parameters() if p.grad is not None})


def first_step_gradients(batch_size: int, accumulate: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    module = GradientCapture(MODEL, OPTIM)
    loader = DataLoader(make_examples(), batch_size=batch_size, collate_fn=collate_rows)
    trainer = L.Trainer(
        max_steps=1,
        accumulate_grad_batches=accumulate,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=loader)
    return module.captured[0]


def reference_gradients() -> dict[str, torch.Tensor]:
    """Plain PyTorch: the mean loss over every trained token of the four examples, each run alone."""
    torch.manual_seed(0)
    module = SFTModule(MODEL, OPTIM)
    total, count = 0.0, 0
    for example in make_examples():
        batch = collate_rows([example])
        loss_sum, trained = full_logits_loss_sum(module.model(batch["input_ids"]), batch["labels"])
        total, count = total + loss_sum, count + trained
    (total / count).backward()
    return {n: p.grad.clone() for n, p in module.named_parameters()}


def assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rtol: float) -> None:
    for name in want:
        scale = want[name].abs().max().clamp_min(1e-12)
        assert (got[name] - want[name]).abs().max() / scale < rtol, name


def test_accumulated_micro_batches_equal_one_big_batch_and_the_global_token_mean():
    reference = reference_gradients()
    assert_close(first_step_gradients(batch_size=4, accumulate=1), reference, 1e-6)
    assert_close(first_step_gradients(batch_size=1, accumulate=4), reference, 1e-6)
    assert_close(first_step_gradients(batch_size=2, accumulate=2), reference, 1e-6)


def test_mean_of_micro_batch_means_would_differ():
    """Guards the test above: its data really separates the right normalisation from the naive one."""
    torch.manual_seed(0)
    module = SFTModule(MODEL, OPTIM)
    per_example, total, count = [], 0.0, 0
    for example in make_examples():
        batch = collate_rows([example])
        loss_sum, trained = module.loss_sum(batch)
        per_example.append(loss_sum / trained)
        total, count = total + loss_sum, count + trained
    assert abs(float(sum(per_example).detach() / 4 - total.detach() / count)) > 1e-3


def test_no_trained_token_gives_exact_zero_and_a_gradient_free_of_nan():
    module = SFTModule(MODEL, OPTIM)
    example = make_examples(1)[0]
    example["labels"][:] = IGNORE_INDEX
    batch = collate_rows([example])
    loss_sum, trained = module.loss_sum(batch)
    assert trained == 0 and loss_sum.item() == 0.0
    loss_sum.backward()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)


def test_a_step_without_trained_tokens_is_skipped_without_weight_decay_drift():
    examples = make_examples(2)
    for example in examples:
        example["labels"][:] = IGNORE_INDEX
    torch.manual_seed(0)
    module = SFTModule(MODEL, OPTIM)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(module, train_dataloaders=DataLoader(examples, batch_size=1, collate_fn=collate_rows))
    assert module.skipped_steps == 2
    for name, parameter in module.named_parameters():
        assert torch.equal(parameter.detach(), before[name]), name


def test_packed_row_gives_the_same_loss_and_gradient_as_its_examples_alone():
    examples = make_examples(3)
    packed = {
        "input_ids": np.concatenate([e["input_ids"] for e in examples]),
        "labels": np.concatenate([e["labels"] for e in examples]),
        "position_ids": np.concatenate([e["position_ids"] for e in examples]),
        "document_ids": np.concatenate([np.full(len(e["input_ids"]), d) for d, e in enumerate(examples)]),
    }
    torch.manual_seed(0)
    module = SFTModule(MODEL, OPTIM)
    packed_sum, packed_count = module.loss_sum(collate_rows([packed]))
    packed_sum.backward()
    packed_grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    module.zero_grad()
    alone_sum, alone_count = 0.0, 0
    for example in examples:
        batch = collate_rows([example])
        loss_sum, trained = module.loss_sum(batch)
        alone_sum, alone_count = alone_sum + loss_sum, alone_count + trained
    alone_sum.backward()
    assert packed_count == alone_count
    assert torch.allclose(packed_sum, alone_sum, rtol=1e-5)
    assert_close({n: p.grad for n, p in module.named_parameters()}, packed_grads, 1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_stops_with_a_checkpoint_of_the_last_good_state(tmp_path, bad):
    from sft.module import NonFiniteLossError

    class Poisoned(SFTModule):
        """Step 1's loss (as the optimizer-step check sees it) is non-finite."""

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            if self.global_step == 1:
                self._window_loss_sum = bad
            return loss

    torch.manual_seed(0)
    module = Poisoned(MODEL, OPTIM)
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    loader = DataLoader(make_examples(), batch_size=1, collate_fn=collate_rows)
    with pytest.raises(NonFiniteLossError, match="non-finite"):
        trainer.fit(module, train_dataloaders=loader)
    saved = torch.load(tmp_path / "checkpoints" / "last-finite.ckpt", weights_only=True)
    assert saved["global_step"] == 1
    for name, value in saved["state_dict"].items():
        assert torch.isfinite(value).all(), name


def test_random_streams_round_trip_through_a_weights_only_checkpoint(tmp_path):
    import random

    from sft.module import rng_state, set_rng_state

    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    path = tmp_path / "rng.pt"
    torch.save(rng_state(), path)
    expected = (torch.rand(2), np.random.rand(2), random.random())
    set_rng_state(torch.load(path, weights_only=True))
    got = (torch.rand(2), np.random.rand(2), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def tree_rows(count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Rows that each hold a split conversation's prefix tree (and some a document beside it)."""
    rng = np.random.default_rng(seed)
    return [
        packed_row([split_conversation_rows(rng, 2 + i % 3), *([[trained_document(rng)]] if i % 2 else [])])
        for i in range(count)
    ]


@pytest.mark.parametrize("rows", ["examples", "prefix_trees"])
def test_host_syncs_are_two_per_step_and_one_per_logging_interval(monkeypatch, rows):
    """Counts stay on the device: per optimizer step only the zero-token skip (the reduced sums) and the
    non-finite stop (the grad norm's finiteness) read the host, plus one read per logging interval —
    never one per micro-batch (sft/module.py's docstring lists them)."""
    reads = {"count": 0}
    inside = {"module": False}

    def counted(original):
        def wrapper(self, *args, **kwargs):
            reads["count"] += inside["module"]
            return original(self, *args, **kwargs)

        return wrapper

    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name)))

    def traced(original):
        def wrapper(*args, **kwargs):
            inside["module"] = True
            try:
                return original(*args, **kwargs)
            finally:
                inside["module"] = False

        return wrapper

    module = SFTModule(MODEL, OPTIM)
    for hook in ("training_step", "on_before_optimizer_step"):
        monkeypatch.setattr(module, hook, traced(getattr(module, hook)))
    steps, accumulate, log_every = 8, 2, 4
    examples = (make_examples if rows == "examples" else tree_rows)(count=steps * accumulate)
    trainer = L.Trainer(
        max_steps=steps,
        accumulate_grad_batches=accumulate,
        log_every_n_steps=log_every,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=DataLoader(examples, batch_size=1, collate_fn=collate_rows))
    assert reads["count"] == 2 * steps + steps // log_every
    assert "train/loss" in trainer.callback_metrics and "train/tokens_per_s" in trainer.callback_metrics


def test_a_training_step_on_prefix_trees_equals_the_rows_run_separately():
    """Through SFTModule and Lightning: the logged loss (the global token mean over the pairs) and the
    normalised gradients the optimizer sees, against the same conversations' rows one per batch row."""
    rng = np.random.default_rng(5)
    units = [split_conversation_rows(rng, 3), [trained_document(rng)], split_conversation_rows(rng, 2)]
    batches = {
        "trees": collate_rows([packed_row(units[:2]), packed_row(units[2:])]),
        "rows": collate_rows([example_row(ids, labels) for unit in units for ids, labels in unit]),
    }
    assert "loss_positions" in batches["trees"] and "loss_positions" not in batches["rows"]
    losses, gradients = {}, {}
    for name, batch in batches.items():
        torch.manual_seed(0)
        module = GradientCapture(MODEL, OPTIM)
        trainer = L.Trainer(
            max_steps=1,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, train_dataloaders=DataLoader([batch], batch_size=None))
        losses[name], gradients[name] = float(trainer.callback_metrics["train/loss"]), module.captured[0]
    assert losses["trees"] == pytest.approx(losses["rows"], rel=1e-6)
    assert_close(gradients["trees"], gradients["rows"], 5e-6)  # fp32's floor for another summation order


def test_a_step_of_trees_without_trained_tokens_is_skipped():
    torch.manual_seed(0)
    module = SFTModule(MODEL, OPTIM)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = L.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    rows = [without_targets(row) for row in tree_rows(1)]
    trainer.fit(module, train_dataloaders=DataLoader(rows, batch_size=1, collate_fn=collate_rows))
    assert module.skipped_steps == 1
    for name, parameter in module.named_parameters():
        assert torch.equal(parameter.detach(), before[name]), name
