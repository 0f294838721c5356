"""Weights & Biases for sft-train (`logger=wandb`).

The run is named after its run directory and grouped by its sweep directory (every job of one `-m` sweep
shares a group); it records the resolved config with secrets redacted, every metric, the model's parameter
count, and after each validation a table of generations on held-out examples. With no credentials, or
`WANDB_MODE=offline`, it logs offline and says where the run was written. `wandb` is imported only here.
"""

from __future__ import annotations

import csv
import hashlib
import netrc
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import lightning as L
import numpy as np
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment

from sft.config import redact_secrets
from sft.model.generate import generate
from sft.protocol.labels import IGNORE_INDEX

if TYPE_CHECKING:
    from sft.cli.schemas import WandbLoggerConfig


def has_credentials() -> bool:
    """An API key in the environment or in the netrc that `wandb login` writes (no network)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def offline_reason(offline: bool | None) -> str | None:
    """Why this run logs offline (None: online). `logger.offline=null` decides from the environment."""
    if offline is not None:
        return "logger.offline=true" if offline else None
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "dryrun"):
        return f"WANDB_MODE={mode}"
    if mode != "disabled" and not has_credentials():
        return "no W&B credentials (set WANDB_API_KEY or run `wandb login`)"
    return None


def display_path(path: str | os.PathLike) -> str:
    path = Path(path).absolute()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def run_identity(run_dir: Path, resumable: bool) -> dict[str, str | None]:
    """W&B name, group and id from the Hydra job: the name is the run directory, the group the sweep
    directory of a `-m` run; a resumable run (`ckpt_path` set) gets an id derived from its directory, so a
    resumed or requeued job continues the same W&B run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra = HydraConfig.get()
    multirun = hydra.mode == RunMode.MULTIRUN
    run_id = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16] if resumable else None
    return {
        "name": display_path(run_dir),
        "group": display_path(hydra.sweep.dir) if multirun else None,
        "id": run_id,
    }


def wandb_logger(logger_config: WandbLoggerConfig, run_dir: Path, record: dict[str, Any], resumable: bool):
    """A Lightning WandbLogger for the `logger=wandb` section (conf/logger/wandb.yaml). `record` is the
    config as written (interpolations unresolved, secrets redacted); free text such as the notes is
    redacted too, so no credential's value reaches W&B (the recorded command line holds none: sft.cli.entry
    refuses credentials there)."""
    from lightning.pytorch.loggers import WandbLogger

    reason = offline_reason(logger_config.offline)
    log_model = logger_config.log_model
    if reason:
        print(f"wandb: logging offline: {reason}")
        if log_model:
            print("wandb: logger.log_model ignored offline (checkpoints stay in the run directory)")
            log_model = False
    # An explicit save_dir would override WANDB_DIR, so give one only when the user set one or nothing else
    # says where runs go; the default keeps the W&B files inside the run directory.
    save_dir = logger_config.save_dir or (None if os.environ.get("WANDB_DIR") else str(run_dir))
    identity = run_identity(run_dir, resumable=resumable)
    return WandbLogger(
        name=redact_secrets(logger_config.run_name or identity["name"]),
        group=redact_secrets(logger_config.group or identity["group"]),
        id=logger_config.id or identity["id"],
        project=logger_config.project or os.environ.get("WANDB_PROJECT") or "sft",
        entity=logger_config.entity,
        tags=redact_secrets(logger_config.tags),
        notes=redact_secrets(logger_config.notes),
        save_dir=save_dir,
        offline=bool(reason),
        log_model=log_model,
        config=redact_secrets(record),
    )


def finish_wandb(failed: bool = False) -> None:
    """End this process's W&B run, if there is one. Jobs of a `-m` sweep share a process, and wandb hands
    an open run to the next job's logger, so every job must end its own; offline runs say where they are."""
    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None)
    if run is None:
        return
    offline = run.settings.mode in ("offline", "dryrun")
    directory = run.settings.sync_dir
    wandb.finish(exit_code=1 if failed else 0)
    if offline:
        print(f"wandb: offline run written to {directory}\nwandb: upload it with: wandb sync {directory}")


def held_out_items(dataset, count: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reference ids) for the last trained span of the first `count` held-out examples: the
    prompt is everything the model saw before its last answer, rendered exactly as in training."""
    items = []
    for example_id in dataset.example_ids[:count]:
        ids, labels = dataset.index[int(example_id)]
        trained = np.flatnonzero(labels != IGNORE_INDEX)
        if len(trained) == 0 or trained[0] == 0:
            continue
        breaks = np.flatnonzero(np.diff(trained) > 1)
        start = int(trained[breaks[-1] + 1] if len(breaks) else trained[0])
        items.append((ids[:start].tolist(), ids[start : int(trained[-1]) + 1].tolist()))
    return items


class WandbExtras(L.Callback):
    """The model's parameter count at the start of fit, and after each validation a `wandb.Table` of
    (step, prompt, expected, generated) on up to `count` held-out examples, greedy, on rank 0."""

    def __init__(self, count: int, max_new_tokens: int):
        self.count = count
        self.max_new_tokens = max_new_tokens
        self._items: list[tuple[list[int], list[int]]] | None = None

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        parameters = sum(p.numel() for p in module.model.parameters())
        trainer.logger.log_hyperparams({"model/parameters": parameters})
        if trainer.is_global_zero:
            trainer.logger.experiment.summary["model/parameters"] = parameters

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        if trainer.sanity_checking or not trainer.is_global_zero or self.count <= 0:
            return
        if isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy)):
            return  # a sharded model generates only with every rank taking part
        dataset = getattr(trainer.datamodule, "val_dataset", None)
        if dataset is None:
            return
        if self._items is None:
            self._items = held_out_items(dataset, self.count)
        tokenizer = module.tokenizer
        eot_id = tokenizer.token_to_id(module.template.eot)
        rows = []
        was_training = module.model.training
        module.model.eval()
        for prompt, reference in self._items:
            generated = generate(module.model, prompt, self.max_new_tokens, {eot_id})
            rows.append(
                [
                    trainer.global_step,
                    tokenizer.decode(prompt, skip_special_tokens=False),
                    tokenizer.decode([i for i in reference if i != eot_id], skip_special_tokens=False),
                    tokenizer.decode([i for i in generated if i != eot_id], skip_special_tokens=False),
                ]
            )
        module.model.train(was_training)
        columns = ["step", "prompt", "expected", "generated"]
        trainer.logger.log_table("eval/generations", columns=columns, data=rows, step=trainer.global_step)


class ResumableCSVLogger(CSVLogger):
    """`metrics.csv` in the run directory. Lightning's CSV writer deletes an existing file when it starts;
    a resumed run keeps the rows logged before its checkpoint (steps below `resume_step`) instead, so the
    file holds one run's whole history."""

    def __init__(self, save_dir: Path, resume_step: int | None = None):
        super().__init__(save_dir=save_dir, name="", version="")
        self.resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is not None:
            return self._experiment
        path = Path(self.log_dir) / "metrics.csv"
        kept, header = [], []
        if self.resume_step is not None and path.is_file():
            with open(path, newline="") as handle:
                reader = csv.DictReader(handle)
                header = list(reader.fieldnames or [])
                kept = [row for row in reader if int(row["step"]) < self.resume_step]
        with warnings.catch_warnings():  # its "previous log files will be deleted" is handled right below
            warnings.filterwarnings("ignore", message="Experiment logs directory")
            writer = super().experiment  # creates the writer, which removes the old file
        if kept:
            with open(path, "w", newline="") as handle:
                csv_writer = csv.DictWriter(handle, fieldnames=header)
                csv_writer.writeheader()
                csv_writer.writerows(kept)
            writer.metrics_keys = sorted(header)
        return writer
