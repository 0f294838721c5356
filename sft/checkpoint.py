"""Checkpoint files that are either complete or absent, loaded without unpickling arbitrary objects."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary sibling, fsync, then rename over the target: a process killed mid-save leaves
    the previous checkpoint (e.g. `last.ckpt`) intact instead of a truncated file that resume would trust."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(temporary, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict[str, Any]:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A training checkpoint as plain tensors and dicts (`weights_only=True`)."""
    return torch.load(path, map_location="cpu", weights_only=True)
