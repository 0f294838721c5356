"""The model for the `model` config section: the project's Llama (sft.model.llama) or, with `name: hf`, a
pretrained transformers directory (sft.model.hf). The choice lives here, so llama.py never imports hf.py."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from sft.model.hf import HFModelConfig
    from sft.model.llama import LlamaConfig


def model_schema(section: Mapping[str, Any]) -> tuple[type, dict[str, Any]]:
    """(dataclass, values) for a `model` section: `name: hf` is HFModelConfig; any other name is a Llama
    preset's label (gpt-tiny, ...), not a LlamaConfig key, and is dropped."""
    from sft.model.hf import HFModelConfig
    from sft.model.llama import LlamaConfig

    if section.get("name") == "hf":
        return HFModelConfig, dict(section)
    return LlamaConfig, {key: value for key, value in section.items() if key != "name"}


def model_config_from_dict(section: Mapping[str, Any]) -> LlamaConfig | HFModelConfig:
    """A typed model config from a plain section (a checkpoint's `model_config`, a test's dict)."""
    from sft.config import ConfigError, Invalid, build_dataclass

    schema, values = model_schema(section)
    problems: list[str] = []
    try:
        return build_dataclass(schema, values, "model", problems)
    except Invalid:
        raise ConfigError("\n".join(problems)) from None


def build_model(config: LlamaConfig | HFModelConfig | Mapping[str, Any]) -> nn.Module:
    """The model for a typed `model` config (or a plain section); `vocab_size` must be filled from the
    tokenizer first (it is null in the YAML)."""
    from sft.model.hf import HFModelConfig, build_hf_model
    from sft.model.llama import LlamaForCausalLM

    if isinstance(config, Mapping):
        config = model_config_from_dict(config)
    if isinstance(config, HFModelConfig):
        return build_hf_model(config)  # transformers is an optional extra, imported there when used
    if config.vocab_size is None:
        raise ValueError("model.vocab_size is not set: fill it from the tokenizer before building the model")
    return LlamaForCausalLM(config)
