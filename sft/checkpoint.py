"""Checkpoints loaded without unpickling arbitrary objects, and rebuilt for inference without Lightning."""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from sft.model import build_model
from sft.protocol.templates import ChatTemplate, load_template


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded safely; the message names the file and what is wrong."""


def load_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """A training checkpoint as plain tensors and dicts. It is loaded with `weights_only=True`, always: a
    file that holds anything else is refused (unpickling it could run code), never retried unsafely.
    `mmap`: map the tensors instead of reading them (for a look at the step counters)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a checkpoint file (a directory or a device)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"{path}: {unpickling_problem(str(error))}") from None
    except Exception as error:  # a broken zip or pickle fails anywhere in torch's reader, with any type
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: truncated or corrupt, not a readable checkpoint ({reason})") from None
    if not isinstance(checkpoint, dict):  # Lightning's own files (e.g. ddp_spawn's) may lack a state_dict
        raise CheckpointError(f"{path}: not a training checkpoint (a {type(checkpoint).__name__})")
    return checkpoint


def unpickling_problem(torch_message: str) -> str:
    """What torch's weights-only unpickler refused, without its advice to load with `weights_only=False`."""
    refused = re.search(r"unsupported (?:global|operand)\W*(?:GLOBAL )?([\w.]+)", torch_message, re.I)
    if refused:
        return (
            f"holds {refused.group(1)}, not only tensors and plain containers: refused unread, as unpickling "
            "it could run code (was it written by sft-train?)"
        )
    detail = re.search(r"WeightsUnpickler error: ([^\n]*)", torch_message)
    return f"truncated or corrupt, not a readable checkpoint ({detail.group(1) if detail else 'bad pickle'})"


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
    model_config = (checkpoint.get("hyper_parameters") or {}).get("model_config")
    if not saved.get("tokenizer") or not model_config or "state_dict" not in checkpoint:
        raise CheckpointError(
            f"{path}: not an sft-train checkpoint (no saved model config, tokenizer and template)"
        )
    model_config = dict(model_config)
    model = build_model(model_config)
    prefix = "model."
    try:
        model.load_state_dict(
            {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
        )
    except RuntimeError as error:  # missing, unexpected or misshapen tensors
        raise CheckpointError(f"{path}: its weights do not fit its model config: {error}") from None
    return InferenceBundle(
        model=model.to(device).eval(),
        tokenizer=Tokenizer.from_str(saved["tokenizer"]),
        template=load_template(saved["template"]),
        model_config=model_config,
        template_config=saved["template"],
    )
