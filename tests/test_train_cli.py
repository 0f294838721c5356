"""sft-train as a user meets it: what the checkpoint keeps of the config works from any directory (an empty
training set through the entry point: tests/e2e/test_train_cli.py)."""

from __future__ import annotations

from pathlib import Path

from sft.cli.train import with_absolute_path
from sft.model.hf import HFModelConfig


def test_model_path_is_kept_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = with_absolute_path(HFModelConfig(name="hf", path="models/base"))
    assert model == HFModelConfig(name="hf", path=str(tmp_path / "models" / "base"))
    assert Path(model.path).is_absolute()
