"""sft-train as a user meets it: what the checkpoint keeps of the config works from any directory (an empty
training set through the entry point: tests/e2e/test_train_cli.py)."""

from __future__ import annotations

from pathlib import Path

from sft.cli.train import with_absolute_path


def test_model_path_is_kept_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = with_absolute_path({"name": "hf", "path": "models/base", "lora": None})
    assert model == {"name": "hf", "path": str(tmp_path / "models" / "base"), "lora": None}
    assert Path(model["path"]).is_absolute()
    assert with_absolute_path({"name": "llama", "path": None}) == {"name": "llama", "path": None}
