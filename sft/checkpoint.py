"""Checkpoints loaded without unpickling arbitrary objects, and rebuilt for inference without Lightning.

The checkpoint's own section, `checkpoint["sft"]`, is what chat, evaluation, export and resume read:

    format               SECTION_FORMAT, bumped when a key changes meaning
    tokenizer            the tokenizer.json text
    template             the template's standalone config (a Jinja template carries its source)
    protocol             the `protocol` section trained with (max_seq_len, system prompt, mask, ...)
    data                 the `data` section, file paths absolute (which files, val split, seed-dependent)
    config               the whole resolved run config, paths absolute, secrets redacted
    versions             sft, python, torch, lightning and the protocol version that wrote it
    trained_tokens_seen, skipped_steps, rng   the training state at this step (resume)
"""

from __future__ import annotations

import copy
import os
import pickle
import platform
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from sft.model import build_model
from sft.protocol.pipeline import PROTOCOL_VERSION
from sft.protocol.templates import ChatTemplate, load_template

SECTION_FORMAT = 1
# Config keys that hold paths: recorded absolute, so the run can be evaluated or resumed from anywhere.
PATH_KEYS = {
    "data": ("train", "val", "cache_dir"),
    "tokenizer": ("path",),
    "template": ("path",),
    "model": ("path",),
}


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
    section: dict[str, Any]  # the checkpoint's own section (module docstring): protocol, data, config, ...


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
        section=saved,
    )


def trained_system_prompt(section: dict[str, Any]) -> str | None:
    """The system prompt training put in every conversation without one, if it always did (one string,
    probability 1): what chat should send too."""
    protocol = section.get("protocol") or {}
    prompt = protocol.get("system_prompt")
    return prompt if isinstance(prompt, str) and protocol.get("system_prompt_prob", 1.0) >= 1.0 else None


def absolute_paths(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of the run config with every file path (PATH_KEYS) made absolute."""
    recorded = copy.deepcopy(config)
    for section, keys in PATH_KEYS.items():
        values = recorded.get(section) or {}
        for key in keys:
            value = values.get(key)
            if isinstance(value, str):
                values[key] = str(Path(value).absolute())
            elif isinstance(value, list):
                values[key] = [str(Path(item).absolute()) for item in value]
    return recorded


def versions() -> dict[str, str | int]:
    def installed(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {
        "sft": installed("sft"),
        "python": platform.python_version(),
        "torch": str(torch.__version__),  # a TorchVersion would not load with weights_only
        "lightning": installed("lightning"),
        "protocol": PROTOCOL_VERSION,
    }


def run_section(config: dict[str, Any], precision: str) -> dict[str, Any]:
    """The run-wide part of the checkpoint's section (see the module docstring) for a resolved config whose
    secrets are already redacted; the module adds the tokenizer, template and training state at each save.
    `precision`: Lightning's flag the run trained and validated with (`auto` resolved), so that sft-eval
    scores the way validation did."""
    recorded = absolute_paths(config)
    return {
        "format": SECTION_FORMAT,
        "precision": precision,
        "protocol": recorded["protocol"],
        "data": recorded["data"],
        "config": recorded,
        "versions": versions(),
    }


def follow_checkpoint(section: dict[str, Any], given: dict[str, Any], explicit: set[str]) -> dict[str, Any]:
    """The `data`, `protocol` and `seed` to evaluate with: the run's own (from its checkpoint section),
    with what the command line set explicitly on top: `data=...`/`protocol=...` replaces a whole section,
    `data.val=[...]` one key. A checkpoint without a section (older runs) leaves `given` as it is."""
    if "config" not in section:
        return given
    followed = {"seed": given["seed"] if "seed" in explicit else section["config"]["seed"]}
    for name in ("data", "protocol"):
        if name in explicit:
            followed[name] = given[name]
        else:
            chosen = {key: value for key, value in given[name].items() if f"{name}.{key}" in explicit}
            followed[name] = {**section[name], **chosen}
    return followed
