"""Weights & Biases for sft-train (`logger=wandb`).

The run is named after its run directory and grouped by its sweep directory (every job of one `-m` sweep
shares a group); it records the resolved config with secrets redacted and every metric (the parameter count
and the generations table come from sft.wandb_generations). With no credentials, or `WANDB_MODE=offline`,
it logs offline and says where the run was written. `wandb` is imported only here.
"""

from __future__ import annotations

import hashlib
import netrc
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from sft.redaction import redact_secrets

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
