"""sft-train: Hydra main over conf/train.yaml. With no arguments it trains the embedded default on CPU."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from sft.checkpoint import AtomicCheckpointIO
from sft.data.datamodule import SFTDataModule
from sft.evaluate import ExactMatchCallback, sample_eval_items
from sft.module import SFTModule


def build_logger(logger_config: dict[str, Any], run_dir: Path, config: dict[str, Any]):
    name = logger_config["name"]
    if name == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=run_dir, name="", version="")
    if name == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(save_dir=run_dir, name="", version="")
    if name == "wandb":
        from sft.loggers import wandb_logger

        return wandb_logger(logger_config, run_dir, config)
    raise ValueError(f"logger={name!r}: expected csv, tensorboard or wandb")


def trainer_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    hardware = config["hardware"]
    kwargs = {key: hardware[key] for key in ("accelerator", "devices", "num_nodes", "strategy", "precision")}
    # The datamodule shards every epoch itself (disjoint, resumable); Lightning must not re-wrap its samplers.
    return {**kwargs, "use_distributed_sampler": False, **config["trainer"]}


def final_metrics(trainer: L.Trainer) -> dict[str, float]:
    return {key: float(value) for key, value in sorted(trainer.callback_metrics.items())}


def train(cfg: DictConfig) -> dict[str, Any]:
    """Prepare data, build the model, fit, and write summary.json; returns the summary."""
    started = time.perf_counter()
    config = OmegaConf.to_container(cfg, resolve=True)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    L.seed_everything(config["seed"], workers=True)

    datamodule = SFTDataModule(config)
    tokenizer = datamodule.tokenizer  # prepared before the model: it fixes the vocabulary size
    print(datamodule.prepared.accounting.summary())
    model_config = {**config["model"], "vocab_size": tokenizer.get_vocab_size()}
    module = SFTModule(model_config, config["optim"], peak_flops=config["hardware"].get("peak_flops", 0.0))
    module.attach(tokenizer, config["template"])
    tokenizer.save(str(run_dir / "tokenizer.json"))
    (run_dir / "template.json").write_text(json.dumps(config["template"], indent=2))

    checkpoint_dir = run_dir / "checkpoints"
    callbacks: list[L.Callback] = [
        ModelCheckpoint(
            dirpath=checkpoint_dir,
            filename="best-step{step}",
            auto_insert_metric_name=False,
            monitor="val/loss",
            save_top_k=1,
            save_last=True,
            every_n_train_steps=config["checkpoint"]["every_n_train_steps"],
        )
    ]
    if config["data"]["name"] == "sample" and config["eval"]["exact_match"]:
        items = sample_eval_items(config["seed"], config["data"]["num_val"], config["eval"]["max_items"])
        callbacks.append(ExactMatchCallback(items, config["eval"]["max_new_tokens"]))
    trainer = L.Trainer(
        default_root_dir=run_dir,
        logger=build_logger(config["logger"], run_dir, config),
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        **trainer_kwargs(config),
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=config.get("ckpt_path"))

    summary = {
        "run_dir": str(run_dir),
        "checkpoint": trainer.checkpoint_callback.last_model_path,
        "best_checkpoint": trainer.checkpoint_callback.best_model_path,
        "metrics_csv": str(run_dir / "metrics.csv") if config["logger"]["name"] == "csv" else None,
        "metrics": final_metrics(trainer),
        "steps": trainer.global_step,
        "skipped_steps": module.skipped_steps,
        "packing_efficiency": datamodule.packing_efficiency,
        "data": datamodule.prepared.accounting.to_dict(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    if trainer.is_global_zero:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"run directory: {run_dir}\ncheckpoint:    {summary['checkpoint']}\nsummary:       {run_dir / 'summary.json'}")
        for key, value in summary["metrics"].items():
            print(f"  {key:28s} {value:.4f}")
        print(f"  {'seconds':28s} {summary['seconds']}")
    return summary


@hydra.main(version_base="1.3", config_path="pkg://sft.conf", config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
