"""Checkpoint files are complete or absent; inference entry points start without Lightning."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from sft.callbacks import AtomicCheckpointIO


class ExplodesWhilePickled:
    def __reduce__(self):
        raise RuntimeError("killed mid-save")


def test_a_failed_save_keeps_the_last_good_checkpoint(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 1, "weights": torch.ones(3)}, path)
    with pytest.raises(RuntimeError, match="killed mid-save"):
        io.save_checkpoint({"step": 2, "weights": torch.zeros(3), "bad": ExplodesWhilePickled()}, path)
    assert io.load_checkpoint(path)["step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary left behind


def test_checkpoints_load_with_weights_only(tmp_path):
    path = tmp_path / "c.ckpt"
    torch.save({"x": object}, path)
    with pytest.raises(Exception, match="weights_only"):  # an arbitrary global is refused, not unpickled
        AtomicCheckpointIO().load_checkpoint(path)


def test_chat_eval_and_export_do_not_import_lightning():
    code = "import sys, sft.cli.chat, sft.cli.eval, sft.cli.export; print('lightning' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    )
