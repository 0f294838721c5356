"""eval.generate_every_n_steps during training: scores logged every N steps, generated on one process
under DDP too (rank 0 generates, the other rank waits)."""

from __future__ import annotations

import pytest

from tests.helpers import metric_rows, train

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
