"""Checkpoints loaded without unpickling arbitrary objects, and rebuilt for inference without Lightning."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from tokenizers import Tokenizer

from sft.model import build_model
from sft.protocol.templates import ChatTemplate, load_template


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
