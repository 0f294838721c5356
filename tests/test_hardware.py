"""sft.hardware: the precision a run picks (and why), the peak its MFU is measured against, the strategy it
gets, and what FSDP shards."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from hydra import compose, initialize_config_module

from sft.cli.schemas import HardwareConfig, TrainConfig
from sft.config import load_config
from sft.hardware import (
    HardwareError,
    ShardedDataParallel,
    cpu_flags,
    hardware_callbacks,
    local_processes,
    plan_hardware,
    shard_unit_classes,
    trainer_kwargs,
)
from sft.model import build_model
from sft.model.llama import DecoderLayer


def train_config(option: str, *overrides: str) -> TrainConfig:
    with initialize_config_module("sft.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"hardware={option}", *overrides])
    return load_config(cfg, TrainConfig)


def test_auto_precision_is_bf16_exactly_where_the_cpu_flags_say_bf16_is_native():
    hardware = train_config("cpu").hardware
    assert hardware.precision == "auto"
    for flags in ({"avx512f", "amx_bf16", "amx_tile"}, {"avx512f", "avx512_bf16"}):
        plan = plan_hardware(hardware, flags)
        assert plan.precision == "bf16-mixed" and plan.compute_dtype == "bf16"
        assert (flags & {"amx_bf16", "avx512_bf16"}).pop() in plan.precision_reason
    plan = plan_hardware(hardware, {"avx2", "avx512f"})
    assert plan.precision == "32-true" and "no native bf16" in plan.precision_reason
    assert (
        plan_hardware(dataclasses.replace(hardware, precision="32-true"), {"amx_bf16"}).precision == "32-true"
    )


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx512_bf16 amx_tile\nbugs\t\t: spectre\n")
    assert cpu_flags(cpuinfo) == {"fpu", "sse", "avx512_bf16", "amx_tile"}
    assert cpu_flags(tmp_path / "absent") == set()


@pytest.mark.parametrize(
    "option,overrides,dtype",
    [
        ("cpu", ["hardware.precision=32-true"], "fp32"),
        ("cpu", ["hardware.precision=bf16-mixed"], "bf16"),
        ("cpu", ["hardware.precision=16-mixed"], "bf16"),  # Lightning runs fp16 autocast as bf16 on a CPU
        ("cpu_bf16", [], "bf16"),
        ("fsdp_cpu", [], "fp32"),
        ("gpu", [], "tf32"),  # fp32 weights, TF32 matmuls
        ("gpu", ["hardware.float32_matmul_precision=highest"], "fp32"),
        ("bf16", [], "bf16"),
        ("fsdp", [], "bf16"),
        ("gpu", ["hardware.precision=16-mixed"], "fp16"),
    ],
)
def test_mfu_is_measured_against_the_peak_of_the_precision_the_run_computes_in(option, overrides, dtype):
    hardware = train_config(option, *overrides).hardware
    plan = plan_hardware(hardware)
    assert plan.compute_dtype == dtype
    assert plan.peak_flops == hardware.peak_flops[dtype]


def test_peak_figures_are_ordered_as_the_hardware_computes():
    cpu, gpu = train_config("cpu").hardware.peak_flops, train_config("gpu").hardware.peak_flops
    assert cpu["bf16"] > cpu["fp32"]  # AMX: bf16 runs several times faster
    assert gpu["bf16"] == 9.89e14  # H100 SXM, dense
    assert gpu["fp32"] < gpu["tf32"] < gpu["bf16"]


def test_a_precision_without_a_peak_figure_logs_no_mfu_instead_of_a_wrong_one():
    hardware = train_config("cpu", "hardware.precision=bf16-mixed", "~hardware.peak_flops.bf16").hardware
    assert plan_hardware(hardware).peak_flops is None


def test_gpu_fp32_runs_tf32_matmuls_in_every_process():
    (callback,) = hardware_callbacks(train_config("gpu").hardware)
    before = torch.get_float32_matmul_precision()
    try:
        callback.setup(None, None, "fit")  # Lightning calls it in each rank, spawned ones too
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)
    assert hardware_callbacks(train_config("cpu").hardware) == []


def test_fsdp_is_data_parallel_over_every_process_with_one_checkpoint_file():
    config = train_config("fsdp_cpu")
    strategy = trainer_kwargs(config, plan_hardware(config.hardware))["strategy"]
    assert isinstance(strategy, ShardedDataParallel)
    assert strategy._save_distributed_checkpoint is False


@pytest.fixture
def no_slurm(monkeypatch):
    for name in [key for key in os.environ if key.startswith("SLURM_")]:
        monkeypatch.delenv(name)


def test_ddp_inside_a_local_sweep_spawns_instead_of_relaunching_the_sweep(no_slurm, monkeypatch):
    config = train_config("ddp")
    plan = plan_hardware(config.hardware)
    assert trainer_kwargs(config, plan, multirun=True)["strategy"] == "ddp_spawn"
    assert trainer_kwargs(config, plan, multirun=False)["strategy"] == "ddp"
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_JOB_NAME", "sft")
    assert trainer_kwargs(config, plan, multirun=True)["strategy"] == "ddp"  # SLURM starts the processes


def test_fsdp_inside_a_local_sweep_is_refused(no_slurm):
    config = train_config("fsdp")
    with pytest.raises(HardwareError, match="re-run the sweep"):
        trainer_kwargs(config, plan_hardware(config.hardware), multirun=True)


def test_fsdp_shards_the_projects_decoder_layers_and_a_transformers_models_no_split_modules(tmp_path):
    tiny = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32}
    llama = build_model({**tiny, "num_hidden_layers": 2, "num_attention_heads": 2})
    assert shard_unit_classes(llama) == (DecoderLayer,)
    pytest.importorskip("transformers")
    from tests.helpers import make_model_dir

    hf = build_model({"name": "hf", "path": str(make_model_dir(tmp_path))})
    (layer_class,) = shard_unit_classes(hf)
    assert layer_class.__name__ in hf.base_model._no_split_modules
    assert sum(isinstance(module, layer_class) for module in hf.modules()) == hf.config.num_hidden_layers


@pytest.mark.parametrize(
    "accelerator, devices, expected",
    [
        ("cpu", 2, 2),
        ("cpu", 1, 1),
        ("gpu", [0, 3], 2),
        ("gpu", "0,1,2", 3),
        ("cpu", "2", 2),
        ("cpu", "auto", 1),
    ],
)
def test_local_processes_are_the_ranks_lightning_will_start_on_this_node(accelerator, devices, expected):
    assert local_processes(HardwareConfig(accelerator=accelerator, devices=devices)) == expected
