"""One typed loader for every CLI: the composed config becomes dataclasses, checked once, named by key.

Each section's dataclass lives next to what it configures (`ProtocolConfig` in sft/protocol/types.py,
`DataConfig` in sft/data/config.py, `OptimConfig` in sft/optim.py, ...) and holds the one default of each
key; the YAML under conf/ holds only what differs. `build` turns the resolved plain dict into those
dataclasses: unknown keys (with a "did you mean"), missing required keys, `Literal` choices, unions, lists
and dicts — what OmegaConf 2.3's structured configs cannot express. A dataclass checks its value ranges in
`__post_init__` (a ValueError naming the key). Every problem is reported at once, one line each.

`check_overrides` runs the same schema over the command line *before* Hydra composes (sft.cli.entry), so
`optim.lrr=1` says "did you mean optim.lr?" and nothing is written for a refused command line.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """The config does not fit its schema; the message names every offending key, one per line."""


class Invalid(Exception):
    """One value that does not fit; collected, not raised to the caller."""


# ---- the typed builder -------------------------------------------------------------------------------


def type_name(annotation: Any) -> str:
    if annotation is type(None):
        return "null"
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(arg) for arg in typing.get_args(annotation))
    if origin is Literal:
        return " or ".join(repr(arg) for arg in typing.get_args(annotation))
    if origin is not None:
        return str(annotation).replace("typing.", "")
    return getattr(annotation, "__name__", str(annotation))


def did_you_mean(key: str, known: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def schema_fields(schema: type) -> dict[str, Any]:
    """A dataclass's fields and their resolved annotations."""
    hints = typing.get_type_hints(schema)
    return {field.name: hints[field.name] for field in dataclasses.fields(schema) if field.init}


def union_members(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def build(annotation: Any, value: Any, key: str, problems: list[str]) -> Any:
    """`value` (resolved, plain) as `annotation`; a problem naming `key` is appended when it does not fit.
    Raises Invalid after recording, so the caller skips constructing the enclosing dataclass."""
    if annotation is Any or annotation is object:
        return value
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        return build_dataclass(annotation, value, key, problems)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for member in args:
            if member is type(None):
                continue
            trial: list[str] = []
            try:
                return build(member, value, key, trial)
            except Invalid:
                if dataclasses.is_dataclass(member) and isinstance(value, Mapping):
                    problems.extend(trial)  # a mapping meant for this section: its own problems say more
                    raise
    elif origin is Literal:
        if value in args:
            return value
        problems.append(f"{key}={value!r}: expected one of {', '.join(map(str, args))}")
        raise Invalid
    elif origin in (list, tuple) or annotation in (list, tuple):
        if isinstance(value, (list, tuple)):
            item = args[0] if args else Any
            return [build(item, element, f"{key}[{i}]", problems) for i, element in enumerate(value)]
    elif origin is dict or annotation is dict:
        if isinstance(value, Mapping):
            item = args[1] if len(args) == 2 else Any
            return {name: build(item, element, f"{key}.{name}", problems) for name, element in value.items()}
    elif annotation is bool or annotation is str:
        if isinstance(value, annotation):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is type(None) or annotation is None:
        if value is None:
            return None
    elif isinstance(annotation, type) and isinstance(value, annotation):
        return value
    problems.append(f"{key}={value!r}: expected {type_name(annotation)}")
    raise Invalid


def build_dataclass(schema: type, value: Any, key: str, problems: list[str]) -> Any:
    """A section: every key known, every required key given, each value built, then `__post_init__`'s range
    checks. A schema may pick a field's dataclass from the value (`resolve_section`, e.g. `logger.name`)
    and check a field further (`field_problems`)."""
    prefix = f"{key}." if key else ""
    if not isinstance(value, Mapping):
        problems.append(f"{key or 'config'}: expected a mapping of keys, got {value!r}")
        raise Invalid
    fields = schema_fields(schema)
    before = len(problems)
    values: dict[str, Any] = {}
    for name, item in value.items():
        if name not in fields:
            hint = did_you_mean(str(name), list(fields), prefix)
            problems.append(
                f"{prefix}{name}: unknown key{hint} ({key or 'the config'} takes: {', '.join(fields)})"
            )
            continue
        annotation = fields[name]
        resolve = getattr(schema, "resolve_section", None)
        if resolve is not None and isinstance(item, Mapping):
            annotation, item = resolve(name, item, annotation)
        try:
            values[name] = build(annotation, item, f"{prefix}{name}", problems)
        except Invalid:
            continue
        if hasattr(schema, "field_problems"):  # checks a type cannot state (trainer.* against Lightning)
            problems.extend(schema.field_problems(name, values[name]))
    for field in dataclasses.fields(schema):
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        if field.init and required and field.name not in value:
            problems.append(f"{prefix}{field.name}: missing (required)")
    if len(problems) > before:
        raise Invalid
    try:
        return schema(**values)
    except (ValueError, TypeError) as error:  # __post_init__'s range checks name their key
        problems.append(str(error))
        raise Invalid from error


def resolved_container(cfg: DictConfig) -> dict[str, Any]:
    """The config as plain containers with interpolations resolved, or a ConfigError naming an unset key."""
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigError(
                "config values not set (???): " + ", ".join(missing) + "; give each on the command line, "
                "e.g. " + " ".join(f"{key}=..." for key in missing)
            )
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as error:  # e.g. tokenizer.path: ${model.path} with model.path=???
        unset = re.search(r"Missing mandatory value: (\S+)", str(error))
        where = getattr(error, "full_key", "") or "config"
        if unset:
            raise ConfigError(
                f"config value not set (???): {unset.group(1)} (needed by {where}); give it on the command "
                f"line, e.g. {unset.group(1)}=..."
            ) from error
        raise ConfigError(f"{where}: {getattr(error, 'msg', error)}") from error


T = typing.TypeVar("T")


def load_config(cfg: DictConfig | Mapping[str, Any], schema: type[T]) -> T:
    """The composed config as `schema` (a dataclass of sections), or a ConfigError listing every problem."""
    config = resolved_container(cfg) if isinstance(cfg, DictConfig) else dict(cfg)
    config.pop("hydra", None)
    problems: list[str] = []
    try:
        return build_dataclass(schema, config, "", problems)
    except Invalid:
        raise ConfigError(describe_problems(problems)) from None


def describe_problems(problems: list[str]) -> str:
    """One line per problem (a dataclass may report several in one message, one per line)."""
    lines = [line.strip() for problem in problems for line in problem.splitlines() if line.strip()]
    if len(lines) == 1:
        return lines[0]
    return f"{len(lines)} problems in the config:\n  " + "\n  ".join(lines)


def defaults_node(schema: type, skip: type | None = None) -> dict[str, Any]:
    """The dataclass defaults as a plain config node ("???" where a key is required), minus `skip`'s
    fields. Registered with Hydra (`register_defaults`), it gives the composed config every key, so
    `optim.lr=1` works without `+` while the YAML holds only what differs from these defaults."""
    skipped = {field.name for field in dataclasses.fields(skip)} if skip else set()
    node: dict[str, Any] = {}
    for field in dataclasses.fields(schema):
        if not field.init or field.name in skipped:
            continue
        if field.default is not dataclasses.MISSING:
            value = field.default
        elif field.default_factory is not dataclasses.MISSING:
            value = field.default_factory()
        else:
            value = "???"
        node[field.name] = defaults_node(type(value)) if dataclasses.is_dataclass(value) else value
    return node


def register_defaults(name: str, schema: type, skip: type | None = None) -> None:
    """Store `schema`'s defaults in Hydra's ConfigStore as `name` (a config YAMLs list in `defaults`)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=name, node=defaults_node(schema, skip))


def to_dict(config: Any) -> Any:
    """Plain containers (for checkpoints: `weights_only=True` loads no dataclass)."""
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config


# ---- the command line, before Hydra ------------------------------------------------------------------


def key_problem(schema: Any, path: list[str]) -> str | None:
    """Why the dotted key `path` is not in `schema`, or None. A union of sections (model, logger) takes a
    key any member has (the check after composition names the chosen one's); a free mapping
    (`trainer`, `dict[str, Any]`) is checked after composition. A schema's `command_line_schema(name)`
    gives the sections its fields only pick at build time (`model`)."""
    top = schema
    for depth, part in enumerate(path):
        members = [member for member in union_members(schema) if dataclasses.is_dataclass(member)]
        if not members:
            return None
        known: dict[str, Any] = {}
        for member in members:
            for name, annotation in schema_fields(member).items():
                known.setdefault(name, annotation)
        if part not in known:
            prefix = ".".join(path[:depth]) + "." if depth else ""
            return f"{'.'.join(path)}: unknown key{did_you_mean(part, list(known), prefix)}"
        schema = known[part]
        if depth == 0 and hasattr(top, "command_line_schema"):
            schema = top.command_line_schema(part, schema)
    return None
