"""The one entry of every sft CLI: check the command line against the schema, then hand over to Hydra.

Hydra composes (and writes `.hydra/config.yaml`, `overrides.yaml`, `hydra.yaml`) before `main` runs, so a
typo would surface as Hydra's raw "Key 'lrr' is not in struct" and a refused credential would already be on
disk. `run_cli` first checks each override's key (`optim.lrr=1` → "did you mean optim.lr?"), refuses
credentials on the command line, then composes once in memory and builds the typed config (a wrong choice
or range is one line naming the key) — all before Hydra writes anything. Steps that must happen before
Hydra (e.g. resume handling) go into `PRE_HYDRA_CHECKS`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from sft.config import ConfigError, key_problem, load_config
from sft.redaction import is_secret_key, secret_values

# Flags after which Hydra takes a value; flags that only show information (nothing runs, nothing written).
VALUE_FLAGS = {"-cd", "--config-dir", "-cp", "--config-path", "-cn", "--config-name", "-p", "--package"}
INFO_FLAGS = {"-h", "--help", "--hydra-help", "-i", "--info", "-c", "--cfg", "--shell-completion", "-sc"}
MULTIRUN_FLAGS = {"-m", "--multirun"}


def split_command_line(argv: list[str]) -> tuple[list[str], dict[str, str | None]]:
    """(overrides, flags): Hydra's `key=value` arguments and its `--flag [value]` options."""
    overrides, flags = [], {}
    words = iter(argv)
    for word in words:
        if word.startswith("-"):
            name, _, value = word.partition("=")
            flags[name] = value or (next(words, None) if name in VALUE_FLAGS else None)
        else:
            overrides.append(word)
    return overrides, flags


def parse_overrides(overrides: list[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    try:
        return parser.parse_overrides(overrides)
    except OverrideParseException as error:
        hint = quoting_hint(parser, overrides)
        raise ConfigError(f"cannot parse the command line: {error}{hint}") from None


def quoting_hint(parser, overrides: list[str]) -> str:
    """For the first `key=value` Hydra cannot parse: the same value in Hydra's quotes inside the shell's."""
    from hydra.errors import OverrideParseException

    for override in overrides:
        key, separator, value = override.partition("=")
        try:
            parser.parse_overrides([override])
        except OverrideParseException:
            if separator and "'" not in value:
                return (
                    "\n  values with <|…|>, ?, [, ], commas or quotes need Hydra's quotes inside the "
                    f"shell's: \"{key}='{value}'\" (README: Hydra quoting)"
                )
    return ""


def config_groups() -> set[str]:
    """Config groups under conf/ (`model`, `hydra/launcher`, ...): `model=hf` selects an option."""
    from importlib.resources import files

    conf = Path(str(files("sft.conf")))
    return {
        str(path.relative_to(conf)) for path in conf.rglob("*") if path.is_dir() and any(path.glob("*.yaml"))
    }


def check_override_keys(overrides: list[str], schema: type) -> dict[str, list[str]]:
    """Every `key=value` names a schema key; no credential is given on the command line (its value would be
    written to `.hydra/overrides.yaml` and W&B's record of the command). Returns each refused override's
    problems."""
    groups, secrets, refused = config_groups(), secret_values(), {}
    for text, override in zip(overrides, parse_overrides(overrides), strict=True):
        problems: list[str] = []
        key = override.key_or_group
        if key.startswith("hydra.") or key == "hydra" or override.is_delete():
            continue
        text = override.input_line or ""
        if any(secret in text for secret in secrets):
            problems.append(
                f"{key}: holds the value of a credential environment variable; refer to it as "
                "${oc.env:NAME} (kept unresolved in every file the run writes)"
            )
        elif is_secret_key(key):
            problems.append(
                f"{key}: credentials are not taken as config values (they would be written to the run "
                "directory); set them in the environment (WANDB_API_KEY, HF_TOKEN)"
            )
        elif key in groups or "/" in key:
            continue  # a group option; Hydra names the options of an unknown one
        elif problem := key_problem(schema, key.split(".")):
            problems.append(problem)
        elif hasattr(schema, "override_problems") and not override.is_sweep_override():
            problems += schema.override_problems(key, override.value())
        if problems:
            refused[text] = problems
    return refused


def check_composed(config_name: str, overrides: list[str], schema: type) -> list[str]:
    """Compose in memory (nothing written) and build the typed config: the problems of choices, types and
    ranges."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_module("sft.conf", version_base="1.3"):
            cfg = compose(config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as error:
        return [" ".join(str(error).split())]
    try:
        load_config(cfg, schema)
    except ConfigError as error:
        return problem_lines(str(error))
    return []


def problem_lines(message: str) -> list[str]:
    lines = [line.strip() for line in message.splitlines()]
    return lines[1:] if len(lines) > 1 and lines[0].endswith("problems in the config:") else lines


# Checks run on (overrides, flags, config name, schema) before Hydra starts; extend here (e.g. resume).
PRE_HYDRA_CHECKS: list[Callable[[list[str], dict[str, str | None], str, type], None]] = []


def check_command_line(argv: list[str], config_name: str, schema: type) -> None:
    overrides, flags = split_command_line(argv)
    if flags.keys() & INFO_FLAGS or flags.keys() & {"-cn", "--config-name", "-cp", "--config-path"}:
        return  # Hydra only shows something, or another config than this schema's
    refused = check_override_keys(overrides, schema)
    problems = [problem for found in refused.values() for problem in found]
    for check in PRE_HYDRA_CHECKS:
        check(overrides, flags, config_name, schema)
    if not (flags.keys() & MULTIRUN_FLAGS or flags.keys() & {"-cd", "--config-dir"}):
        # sweeps (`optim.lr=1e-3,3e-3`) and user config dirs are built per job, after composition
        accepted = [override for override in overrides if override not in refused]
        problems += [p for p in check_composed(config_name, accepted, schema) if p not in problems]
    if problems:
        one_line = len(problems) == 1
        raise ConfigError(
            problems[0] if one_line else f"{len(problems)} problems:\n  " + "\n  ".join(problems)
        )


def run_cli(
    program: str,
    config_name: str,
    schema: type,
    run: Callable[[Any, DictConfig], Any],
    arguments: Callable[[list[str]], list[str]] | None = None,
) -> Any:
    """Check `sys.argv` against `schema`, then run `run(typed_config, composed_cfg)` under `hydra.main`.
    A config problem ends the program with one line per problem, never a traceback. `arguments` may
    rewrite the checked command line for Hydra (sft-train's resume, sft.resume); the program's own
    `sys.argv` is back in place while `run` runs (Lightning's DDP re-launches it)."""
    command_line = list(sys.argv)
    try:
        check_command_line(sys.argv[1:], config_name, schema)
        if arguments is not None:
            sys.argv = [sys.argv[0], *arguments(sys.argv[1:])]
    except ConfigError as error:
        sys.exit(f"{program}: {error}")

    @hydra.main(version_base="1.3", config_path="pkg://sft.conf", config_name=config_name)
    def hydra_entry(cfg: DictConfig) -> Any:
        sys.argv = command_line
        try:
            config = load_config(cfg, schema)
        except ConfigError as error:
            sys.exit(f"{program}: {error}")
        return run(config, cfg)

    return hydra_entry()
