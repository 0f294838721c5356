"""The `hardware` section made concrete on this machine: Lightning's Trainer arguments, the precision the run
computes in (`auto`: bf16 where the CPU has native bf16 instructions), TF32, the peak FLOP/s of that
precision (the denominator of train/mfu), and FSDP2 sharding through Lightning's ModelParallelStrategy.

`strategy: fsdp` is `torch.distributed.fsdp.fully_shard` on every decoder layer, then on the root: data
parallel over every process (ModelParallelStrategy's automatic sizes would give tensor parallelism within a
node), checkpoints consolidated into one file on rank 0 like every other option. FSDP2 averages gradients
over ranks as DDP does, which SFTModule's loss normalization already undoes (see sft/module.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

if TYPE_CHECKING:
    from sft.cli.schemas import HardwareConfig, TrainConfig

# x86 flags of native bf16 matmul (oneDNN uses them for autocast's bf16 on CPU).
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")

# Lightning's precision flag -> what the matmuls run in; `peak_flops` holds one figure per entry.
COMPUTE_DTYPES = {
    "32-true": "fp32",
    "32": "fp32",
    "bf16-mixed": "bf16",
    "bf16-true": "bf16",
    "bf16": "bf16",
    "16-mixed": "fp16",
    "16-true": "fp16",
    "16": "fp16",
    "64-true": "fp64",
    "64": "fp64",
}


class HardwareError(ValueError):
    """The hardware section cannot run as asked; the message says what to change."""


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags (Linux; an empty set elsewhere)."""
    if not cpuinfo.is_file():
        return set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


@dataclass
class PrecisionChoice:
    """The precision a run uses and why: recorded in summary.json."""

    precision: str  # Lightning's flag
    reason: str


def resolve_precision(hardware: HardwareConfig, flags: set[str] | None = None) -> PrecisionChoice:
    """`precision: auto` picks bf16 autocast where the hardware computes bf16 natively (CPU feature flags,
    never a timing), fp32 elsewhere; any other value is used as given."""
    precision = str(hardware.precision)
    if precision != "auto":
        return PrecisionChoice(precision, "hardware.precision")
    if hardware.accelerator == "cpu":
        native = [flag for flag in CPU_BF16_FLAGS if flag in (cpu_flags() if flags is None else flags)]
        if native:
            return PrecisionChoice("bf16-mixed", f"auto: the CPU has native bf16 ({native[0]})")
        return PrecisionChoice(
            "32-true", "auto: the CPU has no native bf16 (no amx_bf16 or avx512_bf16 flag)"
        )
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return PrecisionChoice("bf16-mixed", "auto: the GPU supports bf16")
    return PrecisionChoice("32-true", "auto: no bf16-capable GPU")


def compute_dtype(precision: str, hardware: HardwareConfig) -> str:
    """What the matmuls run in: fp32 runs as tf32 on a GPU when `float32_matmul_precision` allows it, and
    Lightning turns `16-mixed` into bf16 on a CPU."""
    dtype = COMPUTE_DTYPES.get(precision, precision)  # e.g. transformer-engine: its own peak_flops key
    on_cpu = hardware.accelerator == "cpu"
    if dtype == "fp32" and not on_cpu and hardware.float32_matmul_precision != "highest":
        return "tf32"
    if dtype == "fp16" and on_cpu and precision == "16-mixed":
        return "bf16"
    return dtype


@dataclass
class HardwarePlan:
    """What the hardware section resolves to: the run's precision and the peak its MFU is measured against."""

    precision: str
    precision_reason: str
    compute_dtype: str
    peak_flops: float | None  # hardware.peak_flops[compute_dtype] (one device); None: no MFU

    def describe(self) -> str:
        peak = (
            f"{self.peak_flops:.3g} FLOP/s"
            if self.peak_flops
            else f"no MFU (no peak_flops.{self.compute_dtype})"
        )
        return f"precision {self.precision} ({self.precision_reason}); {self.compute_dtype} peak: {peak}"

    def record(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "precision_reason": self.precision_reason,
            "compute_dtype": self.compute_dtype,
            "peak_flops": self.peak_flops,
        }


def plan_hardware(hardware: HardwareConfig, flags: set[str] | None = None) -> HardwarePlan:
    choice = resolve_precision(hardware, flags)
    dtype = compute_dtype(choice.precision, hardware)
    peak = hardware.peak_flops.get(dtype)
    return HardwarePlan(choice.precision, choice.reason, dtype, float(peak) if peak else None)


class Float32MatmulPrecision(L.Callback):
    """Sets `torch.set_float32_matmul_precision` in every process (spawned ranks do not inherit it):
    `high` lets fp32 matmuls run as TF32 on a GPU."""

    def __init__(self, value: str):
        self.value = value

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        torch.set_float32_matmul_precision(self.value)


class ShardedDataParallel(ModelParallelStrategy):
    """`strategy: fsdp`: FSDP2 as data parallelism over every process, with one consolidated checkpoint
    file (what resume, sft-chat, sft-eval and sft-export read). SFTModule.configure_model shards."""

    def __init__(self) -> None:
        super().__init__(save_distributed_checkpoint=False)

    def setup_environment(self) -> None:
        # The world is known only now (devices=-1, SLURM); ModelParallelStrategy's "auto" sizes would make
        # the processes of one node tensor parallel.
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()


def trainer_kwargs(config: TrainConfig, plan: HardwarePlan, multirun: bool = False) -> dict[str, Any]:
    """The Trainer arguments of the hardware section (and `trainer.*`) for this run."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    hardware = config.hardware
    strategy = hardware.strategy
    if multirun and strategy in ("ddp", "fsdp") and not SLURMEnvironment.detect():
        # Lightning re-launches the command line for each extra process; a re-launched `sft-train -m ...`
        # (or submitit's local job) would run the whole sweep again. On SLURM nothing is re-launched.
        if strategy == "fsdp":
            raise HardwareError(
                "hardware=fsdp inside a local -m sweep would re-run the sweep in every process; run the jobs "
                "one by one, or through SLURM (hydra/launcher=slurm)"
            )
        print("strategy=ddp inside a -m sweep: using ddp_spawn (ddp would re-run the sweep in each process)")
        strategy = "ddp_spawn"
    if strategy == "fsdp":
        strategy = ShardedDataParallel()
    return {
        "accelerator": hardware.accelerator,
        "devices": hardware.devices,
        "num_nodes": hardware.num_nodes,
        "strategy": strategy,
        "precision": plan.precision,
        # The datamodule shards every epoch itself (disjoint, resumable); Lightning must not re-wrap samplers.
        "use_distributed_sampler": False,
        **config.trainer,
    }


def local_processes(hardware: HardwareConfig) -> int:
    """The processes Lightning will start on this node, one per device: `devices` as a count, a list of
    ids or "0,1"; -1 or "auto" count the visible GPUs (one process on a CPU)."""
    devices = hardware.devices
    if isinstance(devices, str) and devices not in ("auto", "-1"):
        return len([part for part in devices.split(",") if part.strip()]) if "," in devices else int(devices)
    if isinstance(devices, list | tuple):
        return len(devices)
    if devices in (-1, "-1", "auto"):
        gpus = hardware.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
        return torch.cuda.device_count() if gpus else 1
    return max(int(devices), 1)


def hardware_callbacks(hardware: HardwareConfig) -> list[L.Callback]:
    value = hardware.float32_matmul_precision
    return [] if value == "highest" else [Float32MatmulPrecision(value)]


# ---- FSDP2 -----------------------------------------------------------------------------------------------
def shard_unit_classes(model: nn.Module) -> tuple[type, ...]:
    """The classes sharded one unit each: the project's DecoderLayer, or the classes a transformers model
    names in `_no_split_modules` (its decoder layers)."""
    from sft.model.llama import DecoderLayer

    base = getattr(model, "base_model", None)
    names = set(getattr(base, "_no_split_modules", None) or ())
    if not names:
        return (DecoderLayer,)
    classes = tuple({type(module) for module in model.modules() if type(module).__name__ in names})
    if not classes:
        raise HardwareError(f"strategy=fsdp: no module of the model is one of its _no_split_modules {names}")
    return classes


def fully_shard_model(model: nn.Module, mesh, precision: str) -> None:
    """`fully_shard` each decoder layer (gathered only while it runs), then the root (embeddings, final
    norm, output head). Under bf16-mixed the gathered parameters are bf16 (half the all-gather traffic;
    autocast would compute in bf16 anyway) and gradients are reduced in fp32 into the fp32 shards."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    classes = shard_unit_classes(model)
    layers = [module for module in model.modules() if isinstance(module, classes)]
    if not layers:
        raise HardwareError(f"strategy=fsdp: the model has no {[c.__name__ for c in classes]} to shard")
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if precision == "bf16-mixed" else None, reduce_dtype=torch.float32
    )
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gathered_parameters(model: nn.Module) -> Iterator[None]:
    """Generation runs a different number of forward passes on each rank (different prompts, different stop
    points); a sharded model would all-gather in each and hang. Gather every unit once, on every rank, and
    keep it gathered until the block ends. A no-op for a model that is not sharded."""
    if not is_sharded(model):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    units = [module for module in model.modules() if isinstance(module, FSDPModule)]
    layers = [unit for unit in units if unit is not model]  # the root is never resharded after forward
    for unit in units:
        unit.unshard()
    for layer in layers:
        layer.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for layer in layers:
            layer.set_reshard_after_forward(True, recurse=False)
        for unit in units:
            unit.reshard()
