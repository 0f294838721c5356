"""The shape of sft-train's config, checked at start-up: a typo'd key or a wrong type fails with its name.

Hydra's struct mode already refuses `optim.lrr=1`. This catches the rest before any data is read: an added
key (`+optim.lrr=1`), a typo in a YAML file (an experiment, a group of your own under `--config-dir`), a
wrong type (`trainer.max_steps=abc`), a mandatory `???` left unset, and a `trainer.*` key that
`lightning.Trainer` does not take. Every problem is reported at once, each under its full key.

Each section's schema is a dataclass; `model` and `protocol` use the dataclasses of what they configure
(`LlamaConfig`, or `HFModelConfig` for `model=hf`; `ProtocolConfig`). `trainer` stays open to any
`lightning.Trainer` argument and is checked against its signature. Adding a key to conf/ means adding a
field here: the test that composes every option of every group fails until you do.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """The composed config does not fit the schema; the message lists every offending key."""


@dataclass
class TokenizerConfig:
    name: Literal["bpe", "file"]
    vocab_size: int | None = None
    path: str | None = None


@dataclass
class TemplateConfig:
    name: str  # chatml | llama3 | microlm | jinja (sft.protocol.templates.load_template checks the rest)
    path: str | None = None
    source: str | None = None
    eot: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    special_tokens: list[str] = dataclasses.field(default_factory=list)
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclass
class DataConfig:
    name: Literal["sample", "jsonl"]
    train: list[str] | str | None = None
    val: list[str] | str | None = None
    num_train: int = 6000
    num_val: int = 200
    format: str = "auto"
    mix: list[float] | None = None
    val_fraction: float = 0.0
    batch_size: int = 8
    packing: bool = True
    num_workers: int = 0
    cache_dir: str = ".cache/sft"


@dataclass
class OptimConfig:
    lr: float
    weight_decay: float = 0.0
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    grad_clip: float | None = None
    loss_chunk_tokens: int = 1024  # sft.loss.DEFAULT_LOSS_CHUNK_TOKENS


@dataclass
class HardwareConfig:
    accelerator: str
    devices: int | str | list[int] = 1
    num_nodes: int = 1
    strategy: str | dict[str, Any] = "auto"  # a Lightning strategy name, or a `_target_` mapping
    precision: str | int = "32-true"
    peak_flops: float = 0.0


@dataclass
class CsvLoggerConfig:
    name: Literal["csv"]


@dataclass
class TensorBoardLoggerConfig:
    name: Literal["tensorboard"]


@dataclass
class WandbLoggerConfig:
    name: Literal["wandb"]
    project: str | None = None
    entity: str | None = None
    run_name: str | None = None
    group: str | None = None
    tags: list[str] = dataclasses.field(default_factory=list)
    notes: str | None = None
    id: str | None = None
    save_dir: str | None = None
    offline: bool | None = None
    log_model: bool | Literal["all"] = False
    generations: int = 8


LOGGERS = {"csv": CsvLoggerConfig, "tensorboard": TensorBoardLoggerConfig, "wandb": WandbLoggerConfig}


@dataclass
class CheckpointConfig:
    every_n_train_steps: int | None = None


@dataclass
class EvalConfig:
    exact_match: bool = True
    max_items: int = 200
    max_new_tokens: int = 32


@dataclass
class TopConfig:
    """The keys of train.yaml that are not a section."""

    seed: int
    ckpt_path: str | None = None


SECTIONS: dict[str, type] = {
    "tokenizer": TokenizerConfig,
    "template": TemplateConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "hardware": HardwareConfig,
    "checkpoint": CheckpointConfig,
    "eval": EvalConfig,
}

# Trainer arguments that sft-train sets itself, and where to set them instead.
TRAINER_OWNED = {
    "accelerator": "hardware.accelerator",
    "devices": "hardware.devices",
    "num_nodes": "hardware.num_nodes",
    "strategy": "hardware.strategy",
    "precision": "hardware.precision",
    "logger": "logger=csv|tensorboard|wandb",
    "default_root_dir": "hydra.run.dir",
    "callbacks": None,
    "plugins": None,
    "use_distributed_sampler": None,
}


def section_schemas(config: Mapping[str, Any]) -> dict[str, type]:
    """The schema of every section, the logger's chosen by its name."""
    from sft.model.hf import HFModelConfig  # imports no transformers: safe without the [hf] extra
    from sft.model.llama import LlamaConfig
    from sft.protocol.types import ProtocolConfig

    logger_name = (config.get("logger") or {}).get("name")
    model_name = (config.get("model") or {}).get("name")
    return {
        **SECTIONS,
        "model": HFModelConfig if model_name == "hf" else LlamaConfig,
        "protocol": ProtocolConfig,
        "logger": LOGGERS.get(logger_name, WandbLoggerConfig),
    }


# Keys that a section's dataclass does not have, or types the YAML must be allowed to give differently.
FIELD_OVERRIDES = {"model": {"name": str, "vocab_size": int | None}}


def type_name(annotation: Any) -> str:
    if annotation is type(None):
        return "null"
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(type_name(arg) for arg in typing.get_args(annotation))
    if typing.get_origin(annotation) is Literal:
        return " or ".join(repr(arg) for arg in typing.get_args(annotation))
    if typing.get_origin(annotation) is not None:
        return str(annotation).replace("typing.", "")
    return getattr(annotation, "__name__", str(annotation))


def conforms(value: Any, annotation: Any) -> bool:
    """Whether a plain (resolved) config value fits a type annotation; types a YAML value cannot have
    (a Callback, a timedelta) are accepted and left to the code that uses them."""
    if annotation is Any or annotation is object:
        return True
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, arg) for arg in args)
    if origin is Literal:
        return value in args
    if annotation is type(None) or annotation is None:
        return value is None
    if origin in (list, tuple, Sequence, Iterable) or annotation in (list, tuple):
        item = args[0] if args else Any
        return isinstance(value, (list, tuple)) and all(conforms(element, item) for element in value)
    if origin in (dict, Mapping) or annotation is dict:
        value_type = args[1] if len(args) == 2 else Any
        return isinstance(value, Mapping) and all(conforms(element, value_type) for element in value.values())
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if isinstance(annotation, type):
        # A mapping with `_target_` is how a YAML gives an object (e.g. a Lightning strategy).
        return isinstance(value, annotation) or (isinstance(value, Mapping) and "_target_" in value)
    return True


def did_you_mean(key: str, known: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def check_section(path: str, values: Any, schema: type, overrides: Mapping[str, Any]) -> list[str]:
    if not isinstance(values, Mapping):
        return [f"{path}: expected a mapping of keys, got {values!r}"]
    hints = {**typing.get_type_hints(schema), **overrides}
    fields = {field.name: field for field in dataclasses.fields(schema)}
    problems = []
    for key, value in values.items():
        if key not in hints:
            hint, known = did_you_mean(key, list(hints), f"{path}."), ", ".join(sorted(hints))
            problems.append(f"{path}.{key}: unknown key{hint} ({path} takes: {known})")
        elif not conforms(value, hints[key]):
            problems.append(f"{path}.{key}={value!r}: expected {type_name(hints[key])}")
    for name, field in fields.items():
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        if required and name not in values and name not in overrides:
            problems.append(f"{path}.{name}: missing (required)")
    return problems


def trainer_parameters() -> dict[str, Any]:
    """`lightning.Trainer`'s keyword arguments and their annotations."""
    import lightning

    hints = typing.get_type_hints(lightning.Trainer.__init__)
    names = [name for name in inspect.signature(lightning.Trainer.__init__).parameters if name != "self"]
    return {name: hints.get(name, Any) for name in names}


def check_trainer(values: Any) -> list[str]:
    if not isinstance(values, Mapping):
        return [f"trainer: expected a mapping of lightning.Trainer arguments, got {values!r}"]
    parameters = trainer_parameters()
    problems = []
    for key, value in values.items():
        if key in TRAINER_OWNED:
            where = TRAINER_OWNED[key]
            problems.append(f"trainer.{key}: set by sft-train" + (f"; use {where}" if where else ""))
        elif key not in parameters:
            hint = did_you_mean(key, list(parameters), "trainer.")
            problems.append(f"trainer.{key}: not an argument of lightning.Trainer{hint}")
        elif not conforms(value, parameters[key]):
            problems.append(f"trainer.{key}={value!r}: expected {type_name(parameters[key])}")
    return problems


def validate_config(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The resolved config as plain containers, or a ConfigError naming every key that does not fit."""
    if isinstance(cfg, DictConfig):
        try:
            missing = sorted(OmegaConf.missing_keys(cfg))
        except OmegaConfBaseException as error:  # e.g. tokenizer.path: ${model.path} with model.path=???
            unset = re.search(r"Missing mandatory value: (\S+)", str(error))
            key = unset.group(1) if unset else getattr(error, "full_key", "") or "config"
            raise ConfigError(
                f"config value not set (???): {key} (needed by {getattr(error, 'full_key', '?')}); "
                f"give it on the command line, e.g. {key}=..."
            ) from error
        if missing:
            raise ConfigError(
                "config values not set (???): " + ", ".join(missing) + "; give each on the command line, "
                "e.g. " + " ".join(f"{key}=..." for key in missing)
            )
        try:
            config = OmegaConf.to_container(cfg, resolve=True)
        except OmegaConfBaseException as error:
            raise ConfigError(f"{getattr(error, 'full_key', '') or 'config'}: {error.msg}") from error
    else:
        config = dict(cfg)
    schemas = section_schemas(config)
    top = typing.get_type_hints(TopConfig)
    known = [*top, "trainer", *schemas]
    problems = []
    for key, value in config.items():
        if key in schemas:
            problems += check_section(key, value, schemas[key], FIELD_OVERRIDES.get(key, {}))
            if key == "model" and isinstance(value, Mapping) and isinstance(value.get("lora"), Mapping):
                from sft.model.hf import LoraSettings

                problems += check_section("model.lora", value["lora"], LoraSettings, {})
        elif key == "trainer":
            problems += check_trainer(value)
        elif key in top:
            if not conforms(value, top[key]):
                problems.append(f"{key}={value!r}: expected {type_name(top[key])}")
        else:
            hint = did_you_mean(key, known, "")
            problems.append(f"{key}: unknown top-level key{hint} (the config has: {', '.join(known)})")
    problems += [f"{key}: missing section" for key in [*schemas, "trainer", "seed"] if key not in config]
    if problems:
        raise ConfigError(f"{len(problems)} problem(s) in the config:\n  " + "\n  ".join(problems))
    return config
