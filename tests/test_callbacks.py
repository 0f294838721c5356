"""Checkpoint files are complete or absent; inference entry points start without Lightning."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sft.callbacks import AtomicCheckpointIO
from sft.checkpoint import CheckpointError


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
