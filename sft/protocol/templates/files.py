"""Loading a template from the `template` config section: a builtin by name, or a Jinja chat template from
a .jinja file, a tokenizer_config.json, a model directory, or inline source; and back (what checkpoints
keep, so a checkpoint rebuilds its template without any file)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sft.protocol.templates.base import ChatTemplate
from sft.protocol.templates.builtin import BUILTINS
from sft.protocol.templates.jinja import DEFAULT_DATE, JinjaTemplate
from sft.protocol.types import TemplateError

_JINJA_ONLY = ("path", "source", "eot", "bos_token", "eos_token", "special_tokens", "kwargs", "stop", "date")


def load_template(cfg: Mapping[str, Any]) -> ChatTemplate:
    """The `template` config section (a plain mapping) → a template. `name` is chatml|llama3|microlm|jinja;
    jinja takes `path` (a .jinja file, a tokenizer_config.json, or a model directory) or `source`, and
    optionally `eot` (a marker or a list), `stop` (generation-stop tokens), `bos_token`, `eos_token`,
    `special_tokens`, `kwargs` (extra template variables) and `date` (what `strftime_now` prints)."""
    name = cfg.get("name")
    options = {key: value for key, value in cfg.items() if key in _JINJA_ONLY and value not in (None, [], {})}
    if name in BUILTINS:
        if options:
            raise ValueError(f"template={name}: {sorted(options)} are only used with template=jinja")
        return BUILTINS[name]
    if name != "jinja":
        raise ValueError(f"template.name={name!r}: expected one of {[*BUILTINS, 'jinja']}")
    path, source = cfg.get("path"), cfg.get("source")
    if (path is None) == (source is None):
        raise ValueError(
            "template=jinja needs exactly one of template.path (a file or model directory) or template.source"
        )
    tokens: dict[str, str | None] = {}
    if path is not None:
        source, tokens = _read_template_files(Path(path))
    eot = cfg.get("eot")
    return JinjaTemplate(
        source,
        eot=list(eot) if isinstance(eot, list | tuple) else eot,
        bos_token=cfg.get("bos_token") or tokens.get("bos_token"),
        eos_token=cfg.get("eos_token") or tokens.get("eos_token"),
        special_tokens=list(cfg.get("special_tokens") or []),
        template_kwargs=dict(cfg.get("kwargs") or {}),
        stop=list(cfg.get("stop") or []),
        date=cfg.get("date") or DEFAULT_DATE,
        origin=f"template.path={path}" if path is not None else "template.source",
    )


def _read_template_files(path: Path) -> tuple[str, dict[str, str | None]]:
    """Template source and bos/eos tokens from a .jinja file, a tokenizer_config.json, or a model directory
    (whose chat_template.jinja wins over its config's `chat_template`, as in transformers)."""
    if not path.exists():
        raise FileNotFoundError(f"template.path: nothing at {path}")
    if path.is_dir():
        config_path, jinja_path = path / "tokenizer_config.json", path / "chat_template.jinja"
    elif path.suffix == ".json":
        config_path, jinja_path = path, None
    else:
        config_path, jinja_path = None, path
    config = (
        json.loads(config_path.read_text(encoding="utf-8")) if config_path and config_path.is_file() else {}
    )
    tokens = {key: _token_text(config.get(key)) for key in ("bos_token", "eos_token")}
    if jinja_path is not None and jinja_path.is_file():
        return jinja_path.read_text(encoding="utf-8"), tokens
    source = config.get("chat_template")
    if isinstance(source, list):
        named = {entry.get("name"): entry.get("template") for entry in source}
        if "default" not in named:
            raise TemplateError(f"{config_path}: chat_template has no 'default' entry (has {sorted(named)})")
        source = named["default"]
    if not isinstance(source, str):
        raise TemplateError(
            f"template.path={path}: no chat template there (chat_template.jinja or chat_template)"
        )
    return source, tokens


def _token_text(token: Any) -> str | None:
    """tokenizer_config.json writes a token as a string or as a serialized AddedToken {"content": ...}."""
    return token.get("content") if isinstance(token, dict) else token


def standalone_config(template: ChatTemplate) -> dict[str, Any]:
    """A `template` config section that rebuilds this template without any file (what checkpoints keep)."""
    if not isinstance(template, JinjaTemplate):
        return {"name": template.name}
    return {
        "name": "jinja",
        "source": template.source,
        "eot": list(template.eot_markers),
        "stop": list(template.stop_tokens),
        "bos_token": template.bos_token,
        "eos_token": template.eos_token,
        "special_tokens": template.special_tokens,
        "kwargs": template.template_kwargs,
        "date": template.date.isoformat(),
    }
