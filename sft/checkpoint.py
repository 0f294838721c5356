"""Checkpoint files that are either complete or absent, loaded without unpickling arbitrary objects."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from tokenizers import Tokenizer

from sft.model.llama import build_model
from sft.protocol.templates import ChatTemplate, load_template


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


@dataclass
class InferenceBundle:
    """Everything chat, evaluation and export need, rebuilt from the checkpoint file alone."""

    model: torch.nn.Module
    tokenizer: Tokenizer
    template: ChatTemplate
    model_config: dict[str, Any]
    template_config: dict[str, Any]


def load_for_inference(path: str | os.PathLike, device: str = "cpu") -> InferenceBundle:
    """The model (eval mode), tokenizer and template saved in an `sft-train` checkpoint."""
    checkpoint = load_checkpoint(path)
    saved = checkpoint.get("sft") or {}
    if not saved.get("tokenizer"):
        raise ValueError(f"{path}: not an sft-train checkpoint (no saved tokenizer and template)")
    model_config = dict(checkpoint["hyper_parameters"]["model_config"])
    model = build_model(model_config)
    prefix = "model."
    model.load_state_dict(
        {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    )
    return InferenceBundle(
        model=model.to(device).eval(),
        tokenizer=Tokenizer.from_str(saved["tokenizer"]),
        template=load_template(saved["template"]),
        model_config=model_config,
        template_config=saved["template"],
    )
