"""sft-train: Hydra main over conf/train.yaml. With no arguments it trains the embedded default on CPU."""

from __future__ import annotations

import dataclasses
import json
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from sft.callbacks import (
    AtomicCheckpointIO,
    CheckpointOnInterrupt,
    ExactMatchCallback,
    LastCheckpoint,
    TrainingInterrupted,
    ValidateAtEnd,
)
from sft.checkpoint import CheckpointError, load_checkpoint, run_section
from sft.cli.entry import run_cli
from sft.cli.schemas import TrainConfig
from sft.console import ProgressLog, RunLog, StepProgressBar, model_line, quiet_lightning
from sft.data.build import EmptyDataError, prepare
from sft.data.datamodule import SFTDataModule
from sft.data.store import StoreError
from sft.evaluate import sample_eval_items
from sft.hardware import HardwareError, hardware_callbacks, local_processes, plan_hardware, trainer_kwargs
from sft.module import SFTModule
from sft.protocol.pipeline import DataError
from sft.redaction import redact_secrets
from sft.resume import SAVED_CONFIG, read_run_file, resume_arguments, write_run_file
from sft.schedule import command_line_keys, fit_schedule
from sft.wandb_logger import display_path, finish_wandb


def build_logger(config: TrainConfig, run_dir: Path, record: dict[str, Any], resume_step: int | None):
    """`record`: the config as written (interpolations unresolved, secrets redacted) for W&B."""
    name = config.logger.name
    if name == "csv":
        from sft.csv_logger import ResumableCSVLogger

        return ResumableCSVLogger(run_dir, resume_step)
    if name == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(save_dir=run_dir, name="", version="")
    from sft.wandb_logger import wandb_logger

    return wandb_logger(config.logger, run_dir, record, resumable=config.ckpt_path is not None)


def cluster_plugins() -> list:
    """Under SLURM, Lightning saves `hpc_ckpt_N.ckpt` in the run directory on SIGUSR1 (sent before the time
    limit, conf/hydra/launcher/slurm.yaml) and requeues the job, which resumes there (see resume_from)."""
    if not SLURMEnvironment.detect():
        return []
    return [SLURMEnvironment(auto_requeue=True, requeue_signal=signal.SIGUSR1)]


def resume_from(ckpt_path: str | None, run_dir: Path) -> str | None:
    """`last` also considers the checkpoint of a SLURM requeue (Lightning's "last" ignores it): the newest
    `hpc_ckpt_N.ckpt` when it is newer than every checkpoint in checkpoints/."""
    if ckpt_path != "last":
        return ckpt_path
    hpc = sorted(run_dir.glob("hpc_ckpt_*.ckpt"), key=lambda path: path.stat().st_mtime)
    saved = [path.stat().st_mtime for path in (run_dir / "checkpoints").glob("*.ckpt")]
    if hpc and hpc[-1].stat().st_mtime >= max(saved, default=0.0):
        return str(hpc[-1])
    return ckpt_path


def final_metrics(trainer: L.Trainer) -> dict[str, float]:
    return {key: float(value) for key, value in sorted(trainer.callback_metrics.items())}


def checkpoint_step(path: str | None) -> int | None:
    """The optimizer step a checkpoint was saved at (memory-mapped: the weights are not read)."""
    if path is None or not Path(path).is_file():
        return None
    return int(load_checkpoint(path, mmap=True)["global_step"])


def run_record(checkpoint_dir: Path) -> dict[str, Any]:
    """Checkpoints, steps and skipped steps read from the files: true in this process also when training ran
    in spawned ranks (`ddp_spawn`), whose trainer state does not come back."""
    last = checkpoint_dir / "last.ckpt"
    if not last.is_file():
        return {"checkpoint": None, "best_checkpoint": None, "steps": None, "skipped_steps": None}
    saved = load_checkpoint(last, mmap=True)
    best = sorted(checkpoint_dir.glob("best-step*.ckpt"))  # save_top_k=1: at most one
    return {
        "checkpoint": str(last),
        "best_checkpoint": str(best[0]) if best else None,
        "steps": saved["global_step"],
        "skipped_steps": saved["sft"]["skipped_steps"],
    }


def config_record(cfg: DictConfig) -> dict[str, Any]:
    """The config as it may be written anywhere (W&B included): `${oc.env:...}` left unresolved, secret
    keys and credential values redacted."""
    return redact_secrets(OmegaConf.to_container(cfg, resolve=False))


def with_absolute_path(model_config: Any) -> Any:
    """`model.path` made absolute: the checkpoint keeps it to rebuild the base model, and sft-chat, sft-eval
    and sft-export may run from any directory."""
    path = getattr(model_config, "path", None)
    return dataclasses.replace(model_config, path=str(Path(path).resolve())) if path else model_config


def fit_to_run(config: TrainConfig, log: RunLog) -> tuple[TrainConfig, dict[str, Any]]:
    """The config with the default warmup and validation interval scaled to the run's length (each change
    printed), or a ConfigError naming the keys; and {key: the composed value} of what was changed."""
    hydra_config = HydraConfig.get()
    trainer = config.trainer
    fitted = fit_schedule(
        trainer.get("max_steps", -1),
        trainer.get("accumulate_grad_batches", 1),
        config.optim.warmup_steps,
        trainer.get("val_check_interval"),
        explicit=command_line_keys(list(hydra_config.overrides.task)),
        swept=set(hydra_config.sweeper.get("params") or {}),
    )
    for note in fitted.notes:
        log.record(f"note: {note}")
    for warning in fitted.warnings:
        log.record(f"warning: {warning}", stream=sys.stderr)
    changed = {}
    if fitted.warmup_steps != config.optim.warmup_steps:
        changed["optim.warmup_steps"] = config.optim.warmup_steps
    if "val_check_interval" in trainer and fitted.val_check_interval != trainer["val_check_interval"]:
        changed["trainer.val_check_interval"] = trainer["val_check_interval"]
    if "val_check_interval" in trainer:
        trainer = {**trainer, "val_check_interval": fitted.val_check_interval}
    optim = dataclasses.replace(config.optim, warmup_steps=fitted.warmup_steps)
    return dataclasses.replace(config, optim=optim, trainer=trainer), changed


def resume_command(run_dir: Path) -> str:
    """The command that continues this run: its config is read back from the run directory."""
    return f"sft-train ckpt_path=last hydra.run.dir={shlex.quote(display_path(run_dir))}"


def plain(config: TrainConfig) -> dict[str, Any]:
    """The typed config as plain containers (what the run file and the checkpoint section hold)."""
    return {field.name: to_plain(getattr(config, field.name)) for field in dataclasses.fields(config)}


def to_plain(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def train(config: TrainConfig, record: dict[str, Any] | None = None) -> dict[str, Any]:
    """Prepare data, build the model, fit, and write summary.json; returns the summary."""
    started = time.perf_counter()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    log = RunLog(run_dir / "train.log")
    if HydraConfig.get().job.config_name == SAVED_CONFIG:  # a resume: the run's own, fitted config
        fitted = read_run_file(run_dir)["fitted"]
    else:
        config, fitted = fit_to_run(config, log)
    config = dataclasses.replace(config, model=with_absolute_path(config.model))
    write_run_file(run_dir, redact_secrets(plain(config)), fitted)  # what a resume reads back
    L.seed_everything(config.seed, workers=True)

    # Before the model (the tokenizer fixes the vocabulary size), by as many processes as the run's ranks.
    prepared = prepare(config, local_ranks=local_processes(config.hardware))
    log.record(prepared.accounting.summary())
    datamodule = SFTDataModule(config, prepared)
    tokenizer = prepared.tokenizer
    model_config = dataclasses.replace(config.model, vocab_size=tokenizer.get_vocab_size())
    hardware = plan_hardware(config.hardware)
    log.record(hardware.describe())
    module = SFTModule(model_config, config.optim, peak_flops=hardware.peak_flops or 0.0)
    section = run_section(redact_secrets(plain(config)), hardware.precision)
    module.attach(tokenizer, dataclasses.asdict(config.template), section)
    log.record(model_line(module))
    tokenizer.save(str(run_dir / "tokenizer.json"))
    (run_dir / "template.json").write_text(json.dumps(dataclasses.asdict(config.template), indent=2))

    checkpoint_dir = run_dir / "checkpoints"
    callbacks: list[L.Callback] = [
        LastCheckpoint(checkpoint_dir, config.checkpoint.every_n_train_steps),  # the resume point
        ModelCheckpoint(  # saved when a validation ends, so it is scored with its own val/loss
            dirpath=checkpoint_dir,
            filename="best-step{step}",
            auto_insert_metric_name=False,
            monitor="val/loss",
            save_top_k=1,
        ),
        ValidateAtEnd(),
        CheckpointOnInterrupt(checkpoint_dir / "last.ckpt"),
        ProgressLog(log, config.trainer.get("log_every_n_steps", 50)),
    ]
    if config.trainer.get("enable_progress_bar", True):
        callbacks.append(StepProgressBar(config.trainer.get("log_every_n_steps", 50)))
    if config.data.name == "sample" and config.eval.exact_match:
        items = sample_eval_items(config.seed, config.data.num_val, config.eval.max_items)
        callbacks.append(ExactMatchCallback(items, config.eval.sample_max_new_tokens, config.eval.batch_size))
    if config.eval.generate_every_n_steps:
        from sft.generation_callback import GenerationEvalCallback

        callbacks.append(GenerationEvalCallback(config))
    if config.logger.name == "wandb":
        from sft.wandb_generations import WandbExtras

        callbacks.append(
            WandbExtras(config.logger.generations, config.eval.sample_max_new_tokens, config.eval.batch_size)
        )
    ckpt_path = resume_from(config.ckpt_path, run_dir)
    if ckpt_path == "last":
        ckpt_path = str(checkpoint_dir / "last.ckpt") if (checkpoint_dir / "last.ckpt").is_file() else None
    with quiet_lightning(resuming=ckpt_path is not None):
        trainer = L.Trainer(
            default_root_dir=run_dir,
            logger=build_logger(config, run_dir, record or {}, checkpoint_step(ckpt_path)),
            callbacks=[*callbacks, *hardware_callbacks(config.hardware)],
            plugins=[AtomicCheckpointIO(), *cluster_plugins()],
            **trainer_kwargs(config, hardware, multirun=HydraConfig.get().mode == RunMode.MULTIRUN),
        )
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        except TrainingInterrupted as stop:
            log.record(f"{stop}\nresume with: {resume_command(run_dir)}")
            raise SystemExit(stop.exit_code) from None
        finally:
            finish_wandb(failed=sys.exc_info()[0] is not None)  # -m jobs share a process: end their runs

    summary = {
        "run_dir": str(run_dir),
        **run_record(checkpoint_dir),
        "metrics_csv": str(run_dir / "metrics.csv") if config.logger.name == "csv" else None,
        "metrics": final_metrics(trainer),
        "packing_efficiency": datamodule.packing_efficiency,
        "hardware": hardware.record(),
        "data": prepared.accounting.to_dict(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    if trainer.is_global_zero and getattr(config.model, "lora", None) and summary["checkpoint"]:
        # The LoRA adapter on its own, from the last checkpoint (right under ddp_spawn too).
        from sft.checkpoint import load_for_inference

        adapter = load_for_inference(summary["checkpoint"]).model.save_adapter(run_dir / "adapter")
        summary["adapter"] = str(adapter)
    if trainer.is_global_zero:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        lines = [
            f"run directory: {run_dir}",
            f"checkpoint:    {summary['checkpoint']}",
            f"metrics:       {summary['metrics_csv'] or config.logger.name}",
            f"summary:       {run_dir / 'summary.json'}",
            *(f"  {key:28s} {value:.4f}" for key, value in summary["metrics"].items()),
            f"  {'seconds':28s} {summary['seconds']}",
        ]
        log.record("\n".join(lines))
    return summary


def run(config: TrainConfig, cfg: DictConfig) -> float | None:
    """Returns the final val/loss: the objective a Hydra sweeper (hydra/sweeper=optuna_lr) minimises."""
    try:
        return train(config, config_record(cfg))["metrics"].get("val/loss")
    except (CheckpointError, DataError, EmptyDataError, HardwareError, StoreError) as error:
        sys.exit(f"sft-train: {error}")  # the user's data or file, not a crash: no traceback


def main() -> float | None:
    return run_cli("sft-train", "train", TrainConfig, run, arguments=resume_arguments)


if __name__ == "__main__":
    main()
