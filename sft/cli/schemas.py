"""The typed configs of sft-prepare, sft-train and sft-inspect: dataclasses of the sections in conf/.

Sections live next to what they configure (TokenizerConfig in sft/protocol/tokenizer.py, TemplateConfig
and ProtocolConfig in sft/protocol/types.py, DataConfig in sft/data/config.py, OptimConfig in sft/optim.py,
LlamaConfig / HFModelConfig in sft/model/, picked by `model.name` and imported only when a model section
is built: sft-prepare and sft-inspect never import torch). The run-level sections that only sft-train's
wiring reads (hardware, loggers, checkpoint, eval) live here. `trainer` stays open to any
`lightning.Trainer` argument and is checked against its signature.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from sft.config import Invalid, build, did_you_mean, register_defaults
from sft.data.config import DataConfig
from sft.optim import OptimConfig
from sft.protocol.tokenizer import TokenizerConfig
from sft.protocol.types import ProtocolConfig, TemplateConfig


@dataclass
class HardwareConfig:
    """Where and how Lightning runs (conf/hardware/)."""

    accelerator: str = "cpu"
    devices: int | str | list[int] = 1
    num_nodes: int = 1
    strategy: str = "auto"  # a Lightning strategy name, or fsdp (FSDP2, sft.hardware)
    precision: str | int = "32-true"  # a Lightning precision, or auto (sft.hardware.resolve_precision)
    float32_matmul_precision: Literal["highest", "high", "medium"] = "highest"  # high: TF32 on GPUs
    # One device's dense matmul FLOP/s per compute dtype (fp32, tf32, bf16, fp16), for train/mfu: the run's
    # precision picks its figure (sft.hardware.compute_dtype); none for it, no MFU.
    peak_flops: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_nodes < 1:
            raise ValueError(f"hardware.num_nodes={self.num_nodes}: expected >= 1")
        if negative := sorted(dtype for dtype, value in self.peak_flops.items() if value <= 0):
            raise ValueError(f"hardware.peak_flops.{negative[0]}: expected > 0 (delete the key for no MFU)")


@dataclass
class CsvLoggerConfig:
    name: Literal["csv"] = "csv"


@dataclass
class TensorBoardLoggerConfig:
    name: Literal["tensorboard"] = "tensorboard"


@dataclass
class WandbLoggerConfig:
    """conf/logger/wandb.yaml; each null falls back as the comments there say."""

    name: Literal["wandb"] = "wandb"
    project: str | None = None
    entity: str | None = None
    run_name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    notes: str | None = None
    id: str | None = None
    save_dir: str | None = None
    offline: bool | None = None
    log_model: bool | Literal["all"] = False
    generations: int = 8

    def __post_init__(self) -> None:
        if self.generations < 0:
            raise ValueError(f"logger.generations={self.generations}: expected >= 0")


LoggerConfig = CsvLoggerConfig | TensorBoardLoggerConfig | WandbLoggerConfig
LOGGERS = {"csv": CsvLoggerConfig, "tensorboard": TensorBoardLoggerConfig, "wandb": WandbLoggerConfig}


@dataclass
class CheckpointConfig:
    every_n_train_steps: int | None = None

    def __post_init__(self) -> None:
        if self.every_n_train_steps is not None and self.every_n_train_steps < 1:
            raise ValueError(f"checkpoint.every_n_train_steps={self.every_n_train_steps}: expected >= 1")


SAMPLE_MAX_NEW_TOKENS = 32


@dataclass
class SampleEvalConfig:
    """Greedy exact match on held-out sample conversations (data=sample only), and generation on data.val:
    each trained assistant turn generated and scored (sft.generation_eval) by sft-eval, and every
    `generate_every_n_steps` optimizer steps during training (0: never)."""

    exact_match: bool = True
    max_items: int = 200
    # None: generation gives each item its reference's length + 16 tokens (sft.generation_eval), the sample's
    # exact match and W&B samples SAMPLE_MAX_NEW_TOKENS; a number: that budget for all of them
    max_new_tokens: int | None = None
    generate: bool = True  # sft-eval: the gen/* scores, the report's items and the HTML page
    generate_every_n_steps: int = 0
    batch_size: int = 16  # prompts generated together (sorted by length, left-padded)
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0

    @property
    def sample_max_new_tokens(self) -> int:
        """The fixed budget of the sample's exact match and of W&B samples (short replies)."""
        return SAMPLE_MAX_NEW_TOKENS if self.max_new_tokens is None else self.max_new_tokens

    def __post_init__(self) -> None:
        for key in ("max_items", "max_new_tokens", "batch_size"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"eval.{key}={getattr(self, key)}: expected >= 1")
        if self.generate_every_n_steps < 0 or self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(
                f"eval: expected generate_every_n_steps >= 0, temperature >= 0 and 0 < top_p <= 1, got "
                f"{self.generate_every_n_steps}, {self.temperature}, {self.top_p}"
            )


@dataclass
class PrepareConfig:
    """conf/prepare.yaml."""

    seed: int = 1234
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    template: TemplateConfig = field(default_factory=TemplateConfig)
    data: DataConfig = field(default_factory=DataConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    export: str | None = None  # a path: one JSON line per kept example, in input order


# Trainer arguments that sft-train sets itself, and where to set them instead.
TRAINER_OWNED = {
    "accelerator": "hardware.accelerator",
    "devices": "hardware.devices",
    "num_nodes": "hardware.num_nodes",
    "strategy": "hardware.strategy",
    "precision": "hardware.precision",
    "logger": "logger=csv|tensorboard|wandb",
    "default_root_dir": "hydra.run.dir",
    "gradient_clip_val": "optim.grad_clip (SFTModule clips the token-normalised gradients itself)",
    "gradient_clip_algorithm": "optim.grad_clip (SFTModule clips by the global norm itself)",
    "callbacks": None,
    "plugins": None,
    "use_distributed_sampler": None,
}


def trainer_problems(values: Mapping[str, Any]) -> list[str]:
    """`trainer.*` against `lightning.Trainer`'s signature (types a YAML cannot give: left to Lightning)."""
    import lightning

    hints = typing.get_type_hints(lightning.Trainer.__init__)
    names = [name for name in inspect.signature(lightning.Trainer.__init__).parameters if name != "self"]
    problems: list[str] = []
    for key, value in values.items():
        if key in TRAINER_OWNED:
            where = TRAINER_OWNED[key]
            problems.append(f"trainer.{key}: set by sft-train" + (f"; use {where}" if where else ""))
        elif key not in names:
            hint = did_you_mean(key, names, "trainer.")
            problems.append(f"trainer.{key}: not an argument of lightning.Trainer{hint}")
        else:
            try:
                build(yaml_type(hints.get(key, Any)), value, f"trainer.{key}", problems)
            except Invalid:  # recorded in problems
                pass
    return problems


def yaml_type(annotation: Any) -> Any:
    """The part of a Trainer annotation a YAML value can take (drop Callbacks, timedeltas, Profilers...)."""
    plain = (int, float, str, bool, type(None))
    members = [
        member
        for member in typing.get_args(annotation) or (annotation,)
        if member in plain or typing.get_origin(member) in (Literal, list, dict)
    ]
    if not members:
        return Any
    if len(members) < len(typing.get_args(annotation) or (annotation,)) and str not in members:
        members.append(dict)  # e.g. a `_target_` mapping for an object
    return typing.Union[tuple(members)] if len(members) > 1 else members[0]  # noqa: UP007


@dataclass
class TrainConfig(PrepareConfig):
    """conf/train.yaml: what sft-train builds, in typed form."""

    ckpt_path: str | None = None  # a checkpoint, or "last": resume this run directory's last if present
    model: Any = None  # LlamaConfig | HFModelConfig, picked by model.name (resolve_section)
    optim: OptimConfig = field(default_factory=OptimConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    logger: LoggerConfig = field(default_factory=CsvLoggerConfig)
    trainer: dict[str, Any] = field(default_factory=dict)  # lightning.Trainer keyword arguments
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: SampleEvalConfig = field(default_factory=SampleEvalConfig)

    check_trainer = True  # against lightning.Trainer (sft-inspect skips it: it never imports Lightning)

    @staticmethod
    def resolve_section(name: str, value: Mapping[str, Any], annotation: Any) -> tuple[Any, Any]:
        """`model.name` and `logger.name` pick the section's dataclass."""
        if name == "model":
            from sft.model import model_schema

            return model_schema(value)
        if name == "logger" and value.get("name") in LOGGERS:
            return LOGGERS[value["name"]], value
        return annotation, value

    @staticmethod
    def command_line_schema(name: str, annotation: Any) -> Any:
        """The model section's possible dataclasses, for checking `model.KEY=...` before composition."""
        if name == "model":
            from sft.model.hf import HFModelConfig
            from sft.model.llama import LlamaConfig

            return LlamaConfig | HFModelConfig
        return annotation

    @classmethod
    def override_problems(cls, key: str, value: Any) -> list[str]:
        """A command-line `trainer.X=V` checked before Hydra (which only says "not in struct")."""
        if cls.check_trainer and key.startswith("trainer.") and key.count(".") == 1:
            return trainer_problems({key.split(".", 1)[1]: value})
        return []

    @classmethod
    def field_problems(cls, name: str, value: Any) -> list[str]:
        return trainer_problems(value) if name == "trainer" and cls.check_trainer else []

    def __post_init__(self) -> None:
        if self.model is None:
            raise ValueError("model: missing section (model=gpt-tiny|gpt-small|gpt-medium|hf)")


@dataclass
class InspectConfig(TrainConfig):
    """conf/inspect.yaml: the training config plus what to show."""

    n: int = 3  # examples to print
    split: Literal["train", "val"] = "train"
    html: str | None = None  # a path: the same view as one self-contained HTML page
    stats: str | None = None  # a path: the dataset statistics as JSON

    check_trainer = False

    @staticmethod
    def resolve_section(name: str, value: Mapping[str, Any], annotation: Any) -> tuple[Any, Any]:
        """The model section stays a plain mapping: inspecting builds no model (and imports no torch)."""
        if name == "model":
            return dict[str, Any], value
        return TrainConfig.resolve_section(name, value, annotation)


register_defaults("sft_prepare_defaults", PrepareConfig)
register_defaults("sft_train_defaults", TrainConfig)
register_defaults("sft_inspect_defaults", InspectConfig, skip=TrainConfig)
register_defaults("sft_logger_wandb", WandbLoggerConfig)
