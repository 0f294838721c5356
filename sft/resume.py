"""Resume that reuses the run: `sft-train ckpt_path=last hydra.run.dir=DIR` continues DIR with the config
it was trained with, and a resume that would change the model or the data is refused before any file in DIR
is written.

sft-train writes the resolved config to DIR/RUN_FILE when a run starts. Hydra rewrites DIR/.hydra/*.yaml
before the program's main runs, so this check happens earlier, on the command line (`resume_arguments`):
when `ckpt_path` is set and DIR/RUN_FILE exists, every key the command line sets must be one of RESUMABLE
or give the value the run already has (a requeued job repeats its whole command line). Hydra then composes
the saved config (registered in memory as SAVED_CONFIG) with those overrides and writes no .hydra/ files.
litgpt's `resume="auto"` is the model: resume when there is a run to resume, start fresh otherwise.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import yaml

from sft.atomic import atomic_file
from sft.checkpoint import absolute_paths
from sft.config import ConfigError

RUN_FILE = "resolved_config.yaml"
SAVED_CONFIG = "sft_resumed_run"
# Keys a resume may change: none of them changes the model, the data or what a step computes.
RESUMABLE = (
    "ckpt_path",
    "trainer.max_steps",  # reshapes the cosine schedule from here on: warned about
    "trainer.log_every_n_steps",
    "trainer.enable_progress_bar",
    "trainer.val_check_interval",
    "checkpoint.every_n_train_steps",
)
MULTIRUN_FLAGS = ("-m", "--multirun")
CONFIG_FLAGS = ("-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir")


def write_run_file(run_dir: Path, config: dict[str, Any], fitted: dict[str, Any]) -> Path:
    """The config a run trains with (`config`, paths absolute) and the values sft-train fitted to the
    run's length (`fitted`: key -> the composed value it replaced), as `resume_arguments` reads them."""
    path = Path(run_dir) / RUN_FILE
    record = {"config": absolute_paths(config), "fitted": fitted}
    with atomic_file(path, "w", encoding="utf-8") as handle:
        handle.write("# Written by sft-train: the run's resolved config; ckpt_path=last resumes with it\n")
        yaml.safe_dump(record, handle, sort_keys=False, allow_unicode=True)
    return path


def read_run_file(run_dir: Path) -> dict[str, Any]:
    """{"config": the run's config, "fitted": the values fitted to its length} (write_run_file)."""
    return yaml.safe_load((Path(run_dir) / RUN_FILE).read_text(encoding="utf-8"))


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """{"trainer.max_steps": 700, ...}: the leaves of a nested config."""
    if not isinstance(config, dict) or not config:
        return {prefix: config}
    leaves = {}
    for key, value in config.items():
        leaves.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return leaves


def compose_train(overrides: list[str]) -> dict[str, Any]:
    """sft-train's config for these overrides, composed in memory and resolved (nothing written)."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    import sft.cli.schemas  # noqa: F401  (registers the defaults train.yaml composes first)

    with initialize_config_module("sft.conf", version_base="1.3"):
        return OmegaConf.to_container(compose("train", overrides=overrides), resolve=True)


def same(given: Any, saved: Any) -> bool:
    if isinstance(given, float) and isinstance(saved, (int, float)):
        return math.isclose(given, saved, rel_tol=1e-12)
    return given == saved


def changed_keys(overrides: list[str], saved: dict[str, Any]) -> list[str]:
    """The config keys these overrides set to a value other than the run's own (`saved`: the run file),
    outside RESUMABLE. Group choices (`model=gpt-small`, `experiment=...`) count by the keys they change;
    a key fitted to the run's length also accepts the value it was composed with (a repeated command)."""
    kept = [o for o in overrides if key_of(o) not in RESUMABLE]
    if not kept:
        return []
    default = flatten(absolute_paths(compose_train([])))
    given = flatten(absolute_paths(compose_train(kept)))
    named = {key_of(o) for o in kept}
    touched = {key for key in given if key in named or given[key] != default.get(key, given[key])}
    touched |= {key for key in default if key not in given}  # removed with ~key
    trained, fitted = flatten(saved["config"]), saved.get("fitted") or {}
    return sorted(
        key
        for key in touched
        if not key.startswith(RESUMABLE)
        and key in trained  # a key the typed config does not keep (a preset's label) changes nothing
        and not same(given.get(key), trained.get(key))
        and not (key in fitted and same(given.get(key), fitted[key]))
    )


def key_of(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def resume_arguments(argv: list[str]) -> list[str]:
    """The arguments for Hydra. A new run's are unchanged; a resume's compose the run's saved config
    (SAVED_CONFIG) with the command line's resumable keys, write no .hydra/ files, and any other change is
    refused (ConfigError) naming the keys."""
    if any(word in MULTIRUN_FLAGS or word.split("=")[0] in CONFIG_FLAGS for word in argv):
        return argv  # a sweep composes per job; another config is not a run of this one
    overrides = [word for word in argv if not word.startswith("-")]
    values = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in overrides if "=" in o}
    run_dir = values.get("hydra.run.dir")
    if not values.get("ckpt_path") or values["ckpt_path"] == "null" or not run_dir:
        return argv
    run_file = Path(run_dir) / RUN_FILE
    if not run_file.is_file():
        return argv  # nothing to resume: a fresh run (that writes its run file)
    saved = read_run_file(Path(run_dir))
    training = [o for o in overrides if not key_of(o).startswith("hydra")]
    problems = changed_keys(training, saved)
    if problems:
        run_values = flatten(saved["config"])
        raise ConfigError(
            f"resuming {run_dir} with its own config ({run_file}); these keys would change the model, the "
            "data or the training, which a resume cannot: "
            + ", ".join(f"{key} (the run has {run_values.get(key)!r})" for key in problems)
            + ". Keys a resume may set: "
            + ", ".join(RESUMABLE)
            + ". To train with other settings, start a new run in another hydra.run.dir."
        )
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SAVED_CONFIG, node=saved["config"])
    resumable = [o for o in training if key_of(o) in RESUMABLE]
    for override in resumable:
        if key_of(override) == "trainer.max_steps" and (warning := max_steps_change(saved, override)):
            print(f"warning: {warning}", file=sys.stderr)
    hydra_args = [o for o in overrides if key_of(o).startswith("hydra")]
    return ["--config-name", SAVED_CONFIG, *resumable, *hydra_args, "hydra.output_subdir=null"]


def max_steps_change(saved: dict[str, Any], override: str) -> str | None:
    """The warning for a resume that changes trainer.max_steps (the cosine runs to the new end from here)."""
    before, after = saved["config"].get("trainer", {}).get("max_steps"), override.split("=", 1)[1]
    if str(before) == after:
        return None
    return (
        f"trainer.max_steps: {before} -> {after} on resume: the learning-rate schedule is reshaped from "
        "here on (the cosine now ends at the new last step)"
    )
