"""eval.generate_every_n_steps during training: scores logged every N steps, generated on one process
under DDP too (rank 0 generates, the other rank waits)."""

from __future__ import annotations

import pytest

from sft.data.sample import generate_conversations
from tests.helpers import metric_rows, train, write_jsonl

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("hardware", ["cpu", "ddp_cpu"])
def test_generation_scores_are_logged_every_n_steps(tmp_path, cache_dir, hardware):
    run_dir = tmp_path / "run"
    train(
        run_dir,
        cache_dir,
        f"hardware={hardware}",
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
        "eval.exact_match=false",
        "eval.generate_every_n_steps=2",
        "eval.max_items=4",
    )
    for metric in ("gen/exact_match", "gen/normalized_exact_match", "gen/token_f1"):
        rows = metric_rows(run_dir, metric)
        assert set(rows) == {2, 4}, (metric, rows)
        assert all(0.0 <= value <= 1.0 for value in rows.values())


@pytest.mark.parametrize("hardware", ["cpu"])  # ddp_cpu generation: the test above (CI time)
def test_a_val_fraction_run_generates_on_the_conversations_its_datamodule_held_out(
    tmp_path, cache_dir, hardware
):
    """No data.val: rank 0 takes the held-out conversations from the datamodule's stores (the training data
    listed twice: two entries) and generates on them, under DDP too."""
    train_file = write_jsonl(tmp_path / "train.jsonl", list(generate_conversations(60, 3, "train")))
    run_dir = tmp_path / "run"
    train(
        run_dir,
        cache_dir,
        f"hardware={hardware}",
        "data=jsonl",
        f"data.train=[{train_file},{train_file}]",
        "data.val_fraction=0.25",
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
        "eval.exact_match=false",
        "eval.generate_every_n_steps=2",
    )
    rows = metric_rows(run_dir, "gen/token_f1")
    assert set(rows) == {2, 4} and all(0.0 <= value <= 1.0 for value in rows.values())
