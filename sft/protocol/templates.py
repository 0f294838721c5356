"""render_chat_prompt: messages → one linear text plus the character spans of the trained assistant turns.

Builtins (chatml, llama3, microlm) know their spans by construction. Any Hugging Face Jinja template
runs in a sandbox; its spans come from `{% generation %}` tags when it has them, otherwise from what the
model must generate at inference: the text after the generation prompt for the turns before, through the
end-of-turn marker. `check_template` renders a probe conversation at start-up and refuses a template
whose spans would be wrong, before any data is read.
"""

from __future__ import annotations

import hashlib
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from sft.protocol.types import Message, ProtocolError, RenderedChat, TemplateError


class ChatTemplate(ABC):
    """A conversation format: the text a model sees, and which of it the model learns to generate."""

    name: str
    special_tokens: list[str]  # control tokens that must be single ids in the vocabulary
    eot: str  # closes an assistant turn; generation stops at its token
    supports_tool_role: bool = True
    requires_alternation: bool = False  # user/assistant must alternate (normalize merges turns for it)

    @abstractmethod
    def render(
        self, messages: list[Message], tools: list[Any] | None = None, add_generation_prompt: bool = False
    ) -> RenderedChat:
        """The text, and one span per assistant message with `train=True` (its content through the eot)."""

    @property
    @abstractmethod
    def fingerprint(self) -> str:
        """Identifies the rendered format, for cache keys."""


def render_chat_prompt(
    messages: list[Message],
    template: ChatTemplate,
    tools: list[Any] | None = None,
    add_generation_prompt: bool = False,
) -> RenderedChat:
    """The protocol's render stage: see `ChatTemplate.render`."""
    return template.render(messages, tools=tools, add_generation_prompt=add_generation_prompt)


# ---- builtins ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltinTemplate(ChatTemplate):
    """A format where every message is `header(role) + content + footer`; the assistant footer is
    trained through its eot, so the span is exact by construction."""

    name: str
    special_tokens: list[str]
    eot: str
    header: str  # formatted with {role}
    footer: str
    assistant_footer: str  # must contain the eot; text after it is not trained
    bos: str = ""  # once at the start of the text
    role_names: tuple[tuple[str, str], ...] = ()  # our role → the role the format writes

    def render(
        self, messages: list[Message], tools: list[Any] | None = None, add_generation_prompt: bool = False
    ) -> RenderedChat:
        trained_footer = self.assistant_footer[: self.assistant_footer.index(self.eot) + len(self.eot)]
        role_names = dict(self.role_names)
        pieces, spans, length = [self.bos], [], len(self.bos)
        for message in messages:
            header = self.header.format(role=role_names.get(message.role, message.role))
            footer = self.assistant_footer if message.role == "assistant" else self.footer
            if message.role == "assistant" and message.train:
                start = length + len(header)
                spans.append((start, start + len(message.content) + len(trained_footer)))
            pieces += [header, message.content, footer]
            length += len(header) + len(message.content) + len(footer)
        if add_generation_prompt:
            pieces.append(self.header.format(role="assistant"))
        return RenderedChat("".join(pieces), spans)

    @property
    def fingerprint(self) -> str:
        return self.name


BUILTINS: dict[str, BuiltinTemplate] = {
    "chatml": BuiltinTemplate(
        name="chatml",
        special_tokens=["<|im_start|>", "<|im_end|>"],
        eot="<|im_end|>",
        header="<|im_start|>{role}\n",
        footer="<|im_end|>\n",
        assistant_footer="<|im_end|>\n",
    ),
    "llama3": BuiltinTemplate(
        name="llama3",
        special_tokens=["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        eot="<|eot_id|>",
        header="<|start_header_id|>{role}<|end_header_id|>\n\n",
        footer="<|eot_id|>",
        assistant_footer="<|eot_id|>",
        bos="<|begin_of_text|>",
        role_names=(("tool", "ipython"),),  # as Meta's template writes tool results
    ),
    "microlm": BuiltinTemplate(
        name="microlm",
        special_tokens=["<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|endoftext|>"],
        eot="<|endoftext|>",
        header="<|{role}|>\n",
        footer="\n",
        assistant_footer="\n<|endoftext|>\n",
    ),
}


# ---- Jinja ---------------------------------------------------------------------------------------------

# Unicode noncharacters, reserved for a program's internal use: they bracket the output of each
# `{% generation %}` block so its position survives macros, `set` blocks and filters, then are removed.
_OPEN, _CLOSE = "\ufdd0", "\ufdd1"
_MARKERS = re.compile(f"[{_OPEN}{_CLOSE}]")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: marks the text the model generates (transformers' tag)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

    def _mark(self, caller: jinja2.runtime.Macro) -> str:
        return _OPEN + caller() + _CLOSE


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson HTML-escapes; chat templates expect plain JSON (as transformers renders it).
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _environment() -> ImmutableSandboxedEnvironment:
    """The environment transformers renders chat templates in, so the same template gives the same text."""
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return environment


_ENVIRONMENT = _environment()


def _split_markers(marked: str) -> tuple[str, list[tuple[int, int]]]:
    """Remove generation markers; return the clean text and the spans they bracketed."""
    pieces, spans, previous, length, start = [], [], 0, 0, None
    for found in _MARKERS.finditer(marked):
        pieces.append(marked[previous : found.start()])
        length += found.start() - previous
        previous = found.end()
        if (found.group() == _OPEN) != (start is None):
            raise TemplateError("chat template nests {% generation %} blocks or leaves one unclosed")
        if found.group() == _OPEN:
            start = length
        else:
            spans.append((start, length))
            start = None
    pieces.append(marked[previous:])
    return "".join(pieces), spans


class JinjaTemplate(ChatTemplate):
    """Any Hugging Face chat template, rendered in a sandbox with the variables transformers passes."""

    name = "jinja"

    def __init__(
        self,
        source: str,
        eot: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        special_tokens: list[str] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ):
        self.source = source
        self.eot = eot or eos_token or ""
        if not self.eot:
            raise TemplateError(f"template=jinja needs an end-of-turn marker: {_SET_EOT} (or eos_token)")
        self.bos_token, self.eos_token = bos_token, eos_token
        listed = [bos_token, eos_token, self.eot, *(special_tokens or [])]
        self.special_tokens = list(dict.fromkeys(token for token in listed if token))
        self.template_kwargs = dict(template_kwargs or {})
        try:
            parsed = _ENVIRONMENT.parse(source)
            self._compiled = _ENVIRONMENT.from_string(parsed)
        except jinja2.TemplateSyntaxError as error:
            raise TemplateError(
                f"chat template does not parse: line {error.lineno}: {error.message}"
            ) from error
        self.has_generation_tags = any(
            isinstance(block.call.node, nodes.ExtensionAttribute)
            for block in parsed.find_all(nodes.CallBlock)
        )

    @property
    def fingerprint(self) -> str:
        identity = [
            self.source,
            self.eot,
            self.bos_token,
            self.eos_token,
            self.special_tokens,
            self.template_kwargs,
        ]
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]

    @cached_property
    def supports_tool_role(self) -> bool:
        """False for templates that refuse a tool turn (e.g. strict user/assistant alternation)."""
        return self._renders(["user", "assistant", "tool", "assistant"])

    @cached_property
    def requires_alternation(self) -> bool:
        return not self._renders(["user", "user", "assistant"])

    def _renders(self, roles: list[str]) -> bool:
        try:
            self._render_text([Message(role, f"{role} {i}") for i, role in enumerate(roles)], None, False)
        except ProtocolError:
            return False
        return True

    def render(
        self, messages: list[Message], tools: list[Any] | None = None, add_generation_prompt: bool = False
    ) -> RenderedChat:
        text, blocks = self._render_text(messages, tools, add_generation_prompt)
        if not self.has_generation_tags:
            return RenderedChat(text, self._inferred_spans(messages, tools, text))
        assistants = [m for m in messages if m.role == "assistant"]
        if len(blocks) != len(assistants):
            raise TemplateError(
                f"chat template rendered {len(blocks)} {{% generation %}} blocks for {len(assistants)} "
                "assistant messages; it must wrap each assistant turn (content through end-of-turn) in one"
            )
        return RenderedChat(text, [span for span, m in zip(blocks, assistants, strict=True) if m.train])

    def _render_text(
        self, messages: list[Message], tools: list[Any] | None, add_generation_prompt: bool
    ) -> tuple[str, list[tuple[int, int]]]:
        """The template's text and its generation blocks. A template that refuses a conversation
        (raise_exception, a missing field) is a problem of that record: ProtocolError."""
        if self.has_generation_tags and any(_MARKERS.search(m.content) for m in messages):
            raise ProtocolError(
                "reserved_character", "a message contains the Unicode noncharacter U+FDD0 or U+FDD1"
            )
        tokens = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        try:
            text = self._compiled.render(
                messages=[{"role": m.role, "content": m.content} for m in messages],
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                **{key: value for key, value in tokens.items() if value is not None},
                **self.template_kwargs,
            )
        except jinja2.exceptions.SecurityError as error:
            raise TemplateError(f"chat template did something the sandbox forbids: {error}") from error
        except jinja2.TemplateError as error:
            raise ProtocolError(
                "template_rejected", f"the chat template refused this conversation: {error}"
            ) from error
        return _split_markers(text) if self.has_generation_tags else (text, [])

    def _inferred_spans(
        self, messages: list[Message], tools: list[Any] | None, text: str
    ) -> list[tuple[int, int]]:
        """Assistant message i's span is what a model generates after the generation prompt for
        messages[:i], through the first eot: exactly the inference-time task, or an error."""
        spans: list[tuple[int, int]] = []
        previous_index = None
        for index, message in enumerate(messages):
            if message.role != "assistant" or not message.train:
                continue
            prompt, _ = self._render_text(messages[:index], tools, True)
            if not text.startswith(prompt):
                raise TemplateError(_instability(index, prompt, text))
            start = len(prompt)
            end = text.find(self.eot, start)
            if end < 0:
                raise TemplateError(
                    f"assistant message {index}: no end-of-turn {self.eot!r} follows it; {_SET_EOT}"
                )
            if spans and start < spans[-1][1]:
                raise TemplateError(
                    f"assistant message {previous_index}: no end-of-turn {self.eot!r} closes it before "
                    f"assistant message {index}; {_SET_EOT}"
                )
            spans.append((start, end + len(self.eot)))
            previous_index = index
        return spans


_SET_EOT = (
    "set template.eot to the marker that this template ends assistant turns with, in Hydra quotes inside "
    "the shell's: \"template.eot='<|im_end|>'\""
)


def _instability(index: int, prompt: str, text: str) -> str:
    differ = next((i for i, (a, b) in enumerate(zip(prompt, text)) if a != b), min(len(prompt), len(text)))
    window = slice(max(0, differ - 30), differ + 30)
    return (
        f"chat template is not prefix-stable at message {index} (assistant): rendering messages[:{index}] "
        f"with add_generation_prompt=True gives {prompt[window]!r} around char {differ}, but the whole "
        f"conversation has {text[window]!r}. What the model would generate there is ambiguous; add "
        "{% generation %} tags around each assistant turn (content through end-of-turn) or use a template "
        "that renders earlier turns the same way whatever follows."
    )


# ---- loading -------------------------------------------------------------------------------------------


def load_template(cfg: Mapping[str, Any]) -> ChatTemplate:
    """The `template` config section (a plain mapping) → a template. `name` is chatml|llama3|microlm|jinja;
    jinja takes `path` (a .jinja file, a tokenizer_config.json, or a model directory) or `source`, and
    optionally `eot`, `bos_token`, `eos_token`, `special_tokens`, `kwargs` (extra template variables)."""
    name = cfg.get("name")
    options = {key: value for key, value in cfg.items() if key != "name" and value not in (None, [], {})}
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
    return JinjaTemplate(
        source,
        eot=cfg.get("eot"),
        bos_token=cfg.get("bos_token") or tokens.get("bos_token"),
        eos_token=cfg.get("eos_token") or tokens.get("eos_token"),
        special_tokens=list(cfg.get("special_tokens") or []),
        template_kwargs=dict(cfg.get("kwargs") or {}),
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


# ---- start-up probe ------------------------------------------------------------------------------------

_PROBE = [
    Message("system", "probe-system-7f3a"),
    Message("user", "probe-user-1-2b9c"),
    Message("assistant", "probe-assistant-1-5e1d"),
    Message("user", "probe-user-2-9a07"),
    Message("assistant", "probe-assistant-2-c3f8", train=False),
    Message("user", "probe-user-3-41e6"),
    Message("assistant", "probe-assistant-3-d852"),
]
_PROBE_TOOL_TURN = [Message("tool", "probe-tool-1-8b3e"), Message("assistant", "probe-assistant-4-06fa")]


def probe_messages(template: ChatTemplate) -> list[Message]:
    """The start-up probe conversation: a distinct sentinel in every message, one assistant turn untrained,
    and a tool turn when the template accepts one."""
    return _PROBE + (_PROBE_TOOL_TURN if template.supports_tool_role else [])


def check_template(template: ChatTemplate) -> None:
    """Render a probe conversation with a distinct sentinel in every message and raise TemplateError, naming
    the message, unless each trained assistant span holds exactly its own content and ends with the eot,
    no other text is trained, and each span starts where the generation prompt for the turns before ends."""
    messages = probe_messages(template)
    try:
        rendered = template.render(messages)
    except ProtocolError as error:
        raise TemplateError(
            f"template {template.name!r} cannot render the probe conversation: {error}"
        ) from error
    text, spans = rendered.text, rendered.assistant_spans
    trained = [i for i, m in enumerate(messages) if m.role == "assistant" and m.train]

    def fail(index: int, problem: str) -> TemplateError:
        message = messages[index]
        return TemplateError(
            f"template {template.name!r} fails the start-up probe at message {index} ({message.role}, "
            f"content {message.content!r}): {problem}. Rendered probe: {text!r}"
        )

    for index, message in enumerate(messages):
        count = text.count(message.content)
        if count != 1:
            raise fail(index, "missing from the rendered text" if count == 0 else f"rendered {count} times")
    if len(spans) != len(trained):
        raise fail(trained[0], f"{len(spans)} assistant spans for {len(trained)} trained assistant messages")
    previous_end = 0
    for index, (start, end) in zip(trained, spans, strict=True):
        span_text = text[start:end]
        if start < previous_end or end <= start:
            raise fail(
                index, f"its span [{start}, {end}) is empty, overlaps the one before or is out of order"
            )
        inside = [m.content for m in messages if m.content in span_text]
        if inside != [messages[index].content]:
            raise fail(
                index, f"its trained span {span_text!r} holds the contents {inside}, not exactly its own"
            )
        if not span_text.endswith(template.eot):
            raise fail(
                index, f"its trained span {span_text!r} does not end with the end-of-turn {template.eot!r}"
            )
        _check_generation_prompt(template, messages, index, text, start, fail)
        previous_end = end


def _check_generation_prompt(
    template: ChatTemplate,
    messages: list[Message],
    index: int,
    text: str,
    start: int,
    fail: Callable[[int, str], TemplateError],
) -> None:
    """The model is trained to produce the span after exactly the prompt it is given at inference."""
    prompt = template.render(messages[:index], add_generation_prompt=True).text
    if not text.startswith(prompt):
        if isinstance(template, JinjaTemplate) and template.has_generation_tags:
            return  # tags define the spans of templates that render history differently
        raise TemplateError(_instability(index, prompt, text))
    if start != len(prompt):
        raise fail(
            index,
            f"its trained span starts at char {start} but the generation prompt ends at char {len(prompt)} "
            f"(span begins {text[start : start + 40]!r}); the span must be exactly what the model generates",
        )


def standalone_config(template: ChatTemplate) -> dict[str, Any]:
    """A `template` config section that rebuilds this template without any file (what checkpoints keep)."""
    if not isinstance(template, JinjaTemplate):
        return {"name": template.name}
    return {
        "name": "jinja",
        "source": template.source,
        "eot": template.eot,
        "bos_token": template.bos_token,
        "eos_token": template.eos_token,
        "special_tokens": template.special_tokens,
        "kwargs": template.template_kwargs,
    }
