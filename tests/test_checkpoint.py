"""Loading a checkpoint: every broken, foreign or hostile file is one CheckpointError naming the file and
what is wrong, never a traceback and never torch's advice to switch `weights_only` off."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sft.checkpoint import CheckpointError, load_checkpoint, load_for_inference
from tests.helpers import write_checkpoint


class RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def broken_file(kind: str, directory: Path, good: Path) -> Path:
    path = directory / f"{kind}.ckpt"
    if kind == "garbage":
        path.write_bytes(b"this is not a checkpoint\n" * 40)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "malicious":
        torch.save({"state_dict": {}, "payload": RunsCodeWhenUnpickled(directory / "pwned")}, path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "not_a_checkpoint":
        torch.save([torch.ones(2)], path)
    return path  # "missing": never written


REASONS = {
    "garbage": "truncated or corrupt",
    "empty": "empty file",
    "truncated": "truncated or corrupt",
    "malicious": "could run code",
    "missing": "no such checkpoint file",
    "directory": "not a checkpoint file",
    "not_a_checkpoint": "not a training checkpoint",
}


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory, tokenizer) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("good") / "good.ckpt", tokenizer)


@pytest.mark.parametrize("kind", sorted(REASONS))
def test_each_bad_file_is_one_clear_error(kind, tmp_path, good_checkpoint):
    path = broken_file(kind, tmp_path, good_checkpoint)
    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: ") and REASONS[kind] in message, message
    assert "weights_only" not in message and "\n" not in message, message
    assert not (tmp_path / "pwned").exists()  # the payload never ran


def test_a_foreign_training_checkpoint_is_named_as_such(tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save({"weights": torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match=f"^{path}: not an sft-train checkpoint"):
        load_for_inference(path)


def test_weights_that_do_not_fit_the_saved_config_are_named(tmp_path, good_checkpoint):
    checkpoint = torch.load(good_checkpoint, weights_only=True)
    checkpoint["hyper_parameters"]["model_config"]["hidden_size"] = 64
    torch.save(checkpoint, tmp_path / "mismatch.ckpt")
    with pytest.raises(CheckpointError, match="weights do not fit its model config"):
        load_for_inference(tmp_path / "mismatch.ckpt")


def test_a_good_checkpoint_loads(good_checkpoint):
    assert load_checkpoint(good_checkpoint, mmap=True)["state_dict"]
    assert load_for_inference(good_checkpoint).template.name == "chatml"


@pytest.mark.parametrize("entry", ["sft-chat", "sft-eval", "sft-export"])
def test_the_inference_entry_points_print_the_error_without_a_traceback(entry, tmp_path):
    path = broken_file("malicious", tmp_path, good=tmp_path)
    command = [str(Path(sys.executable).with_name(entry)), f"ckpt={path}"]
    extra = {"sft-chat": ["prompt=hi"], "sft-eval": [], "sft-export": [f"out={tmp_path / 'out'}"]}[entry]
    result = subprocess.run([*command, *extra], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith(f"{entry}: {path}: ") and "could run code" in result.stderr
    assert "Traceback" not in result.stderr and "weights_only" not in result.stderr
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()
