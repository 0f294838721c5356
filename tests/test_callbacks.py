"""Checkpoint files are complete or absent; inference entry points start without Lightning."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from sft.callbacks import AtomicCheckpointIO, LastCheckpoint, ValidateAtEnd
from sft.checkpoint import CheckpointError
from tests.helpers import fit_tiny


class ExplodesWhilePickled:
    def __reduce__(self):
        raise RuntimeError("killed mid-save")


def test_a_failed_save_keeps_the_last_good_checkpoint(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "step": 1}, path)
    with pytest.raises(RuntimeError, match="killed mid-save"):
        io.save_checkpoint({"state_dict": {}, "step": 2, "bad": ExplodesWhilePickled()}, path)
    assert io.load_checkpoint(path)["step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary left behind


def test_a_saved_checkpoint_is_on_disk_before_it_replaces_the_last_one(tmp_path, synced):
    """What the custom IO adds to Lightning's stock one (which renames, but never fsyncs): the file is synced
    under a temporary name in its own directory, then the directory, so that `last.ckpt` survives a crash of
    the machine, not only of the process."""
    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    temporary, directory = synced
    assert Path(temporary).parent == path.parent and Path(temporary).name.startswith(".last.ckpt.tmp-")
    assert directory == str(path.parent)


def test_checkpoints_load_with_weights_only(tmp_path):
    path = tmp_path / "c.ckpt"
    torch.save({"state_dict": {}, "x": object}, path)
    with pytest.raises(CheckpointError, match="could run code"):  # an arbitrary global is refused
        AtomicCheckpointIO().load_checkpoint(path)


def test_chat_eval_and_export_do_not_import_lightning():
    code = "import sys, sft.cli.chat, sft.cli.eval, sft.cli.export; print('lightning' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    )


@pytest.mark.parametrize("interval", [10, 2])
def test_a_run_shorter_than_its_validation_interval_still_ends_validated(tmp_path, interval):
    """3 steps, validation every 10 (never reached) or every 2: validation runs at step 3 either way, so
    the run has a final val/loss and a best checkpoint scored with it."""
    best = ModelCheckpoint(
        dirpath=tmp_path, filename="best-step{step}", auto_insert_metric_name=False, monitor="val/loss"
    )
    trainer = fit_tiny(
        [best, ValidateAtEnd()],
        validate=True,
        max_steps=3,
        val_check_interval=interval,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
    )
    assert trainer.global_step == 3
    assert "val/loss" in trainer.callback_metrics
    assert best.best_model_path.endswith("best-step3.ckpt")


def test_last_checkpoint_holds_the_final_step_when_the_interval_does_not_divide_the_run(tmp_path):
    fit_tiny([LastCheckpoint(tmp_path, every_n_train_steps=2)], max_steps=3, enable_progress_bar=False)
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 3
