"""Any Hugging Face chat template, rendered in the bounded sandbox with the variables transformers passes.

Messages reach the template in transformers' schema: `role`, `content`, an assistant's reasoning as both
`reasoning_content` (Qwen, Nemotron) and `thinking` (GPT-OSS), `tool_calls` as
`[{"type": "function", "id"?, "function": {"name", "arguments": {...}}}]` (arguments an object that a
template may also join to a string with `+`: `CallArguments`), and a tool message's `tool_call_id` and
`name`. Which text is trained is decided in `turns.py`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import datetime
from functools import cached_property
from typing import Any

import jinja2
from jinja2 import nodes

from sft.protocol.templates import sandbox
from sft.protocol.templates.base import ChatTemplate
from sft.protocol.templates.turns import SET_EOT, inference_rows
from sft.protocol.types import Message, ProtocolError, RenderedChat, TemplateError, ToolCall, message_strings

DEFAULT_DATE = "2026-01-01"  # what `strftime_now` returns unless template.date says otherwise


class CallArguments(dict):
    """A call's arguments as templates read them: the object transformers' templates expect (`tojson`,
    `is mapping`, `.items()`, printed with `{{ }}`, `~` or `|string` as the Python repr of a dict, as
    transformers prints one), which `+` also joins to a string as its JSON text (`ToolCall.arguments_json`).

    DeepSeek's templates (`'```json' + '\\n' + tool['function']['arguments']`) were written for OpenAI's
    JSON-string arguments: a plain dict makes them raise, and with this they render what transformers
    renders given the arguments as that string. Only `+` gains behaviour (it raised for every template
    before): `__str__` is left alone, so a template that prints the object renders what it renders in
    transformers given the object. The call is held under an underscore name the sandbox refuses."""

    __slots__ = ("_call",)

    def __init__(self, call: ToolCall):
        super().__init__(call.arguments)
        self._call = call  # its JSON text is encoded once, when first needed

    def __add__(self, other: Any) -> str:
        return self._call.arguments_json() + other if isinstance(other, str) else NotImplemented

    def __radd__(self, other: Any) -> str:
        return other + self._call.arguments_json() if isinstance(other, str) else NotImplemented


def jinja_message(message: Message) -> dict[str, Any]:
    """A message as transformers' templates read it."""
    fields: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.reasoning is not None:
        fields["reasoning_content"] = fields["thinking"] = message.reasoning
    if message.tool_calls:
        fields["tool_calls"] = [
            {
                "type": "function",
                **({"id": call.id} if call.id is not None else {}),
                "function": {"name": call.name, "arguments": CallArguments(call)},
            }
            for call in message.tool_calls
        ]
    if message.tool_call_id is not None:
        fields["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        fields["name"] = message.name
    return fields


class JinjaTemplate(ChatTemplate):
    """A Jinja chat template. `eot` is one marker or a list (the first is the tokenizer's eos for export);
    `stop` the tokens generation stops at (default: every eot marker); `date` what `strftime_now` prints,
    so that stores do not change from one day to the next."""

    name = "jinja"

    def __init__(
        self,
        source: str,
        eot: str | list[str] | tuple[str, ...] | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        special_tokens: list[str] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
        stop: list[str] | tuple[str, ...] | None = None,
        date: str = DEFAULT_DATE,
        origin: str = "template.source",
        time_limit_s: float = sandbox.TIME_LIMIT_S,
        output_limit: int = sandbox.OUTPUT_LIMIT,
    ):
        self.source = source
        markers = [eot] if isinstance(eot, str) else list(eot or [])
        markers = markers or ([eos_token] if eos_token else [])
        if not markers or not all(isinstance(marker, str) and marker for marker in markers):
            raise TemplateError(f"template=jinja needs an end-of-turn marker: {SET_EOT} (or eos_token)")
        self._eot_markers = tuple(dict.fromkeys(markers))
        self.eot = self._eot_markers[0]
        self._stop_tokens = tuple(stop) if stop else self._eot_markers
        self.bos_token, self.eos_token = bos_token, eos_token
        listed = [bos_token, eos_token, *self._eot_markers, *self._stop_tokens, *(special_tokens or [])]
        self.special_tokens = list(dict.fromkeys(token for token in listed if token))
        self.template_kwargs = dict(template_kwargs or {})
        self.date = datetime.fromisoformat(date)
        self.origin = origin
        self.time_limit_s, self.output_limit = time_limit_s, output_limit
        try:
            parsed = sandbox.ENVIRONMENT.parse(source)
        except jinja2.TemplateSyntaxError as error:
            raise TemplateError(
                f"chat template {origin} does not parse: line {error.lineno}: {error.message}"
            ) from error
        statement = sandbox.forbidden_statement(parsed)
        if statement is not None:
            raise TemplateError(
                f"chat template {origin} uses {{% {statement} %}}, which reads other template files; "
                "a chat template must be self-contained"
            )
        self._compiled = sandbox.ENVIRONMENT.from_string(parsed)
        self.has_generation_tags = any(
            isinstance(block.call.node, nodes.ExtensionAttribute)
            for block in parsed.find_all(nodes.CallBlock)
        )

    @property
    def eot_markers(self) -> tuple[str, ...]:
        return self._eot_markers

    @property
    def stop_tokens(self) -> tuple[str, ...]:
        return self._stop_tokens

    @property
    def fingerprint(self) -> str:
        identity = [
            self.source,
            self._eot_markers,
            self._stop_tokens,
            self.bos_token,
            self.eos_token,
            self.special_tokens,
            self.template_kwargs,
            self.date.isoformat(),
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
        """Whether the template renders these roles (an assistant before a tool message makes a call)."""
        call = (ToolCall("check", {}, id="call_check"),)
        messages = [
            Message(role, f"{role} {i}", tool_calls=call if roles[i + 1 : i + 2] == ["tool"] else ())
            if role == "assistant"
            else Message(role, f"{role} {i}", tool_call_id="call_check" if role == "tool" else None)
            for i, role in enumerate(roles)
        ]
        try:
            self.render_blocks(messages)
        except ProtocolError:
            return False
        return True

    def render(
        self,
        messages: list[Message],
        tools: list[Any] | None = None,
        add_generation_prompt: bool = False,
        variables: Mapping[str, Any] | None = None,
    ) -> RenderedChat:
        if add_generation_prompt:
            return RenderedChat(self.render_text(messages, tools, True, variables), [])
        return inference_rows(self, messages, tools, variables, "whole")[0]

    def render_rows(
        self,
        messages: list[Message],
        tools: list[Any] | None = None,
        variables: Mapping[str, Any] | None = None,
        turns: str = "auto",
    ) -> list[RenderedChat]:
        return inference_rows(self, messages, tools, variables, turns)

    def render_text(
        self,
        messages: list[Message],
        tools: list[Any] | None = None,
        add_generation_prompt: bool = False,
        variables: Mapping[str, Any] | None = None,
    ) -> str:
        return self.render_blocks(messages, tools, add_generation_prompt, variables)[0]

    def render_blocks(
        self,
        messages: list[Message],
        tools: list[Any] | None = None,
        add_generation_prompt: bool = False,
        variables: Mapping[str, Any] | None = None,
    ) -> tuple[str, list[tuple[int, int]]]:
        """The template's text and its `{% generation %}` blocks. A template that refuses a conversation
        (raise_exception, a missing field) is a problem of that record: ProtocolError. One that goes past
        the sandbox's bounds or rules is refused: TemplateError."""
        if self.has_generation_tags and any(
            sandbox.MARKERS.search(text) for m in messages for text in message_strings(m)
        ):
            raise ProtocolError(
                "reserved_character", "a message contains the Unicode noncharacter U+FDD0 or U+FDD1"
            )
        tokens = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        try:
            text = sandbox.bounded_render(
                self._compiled,
                self.time_limit_s,
                self.output_limit,
                messages=[jinja_message(m) for m in messages],
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                strftime_now=self.date.strftime,
                **{key: value for key, value in tokens.items() if value is not None},
                **self.template_kwargs,
                **(variables or {}),
            )
        except (jinja2.exceptions.SecurityError, RecursionError, MemoryError, OverflowError) as error:
            reason = "is past its bounds" if isinstance(error, sandbox.RenderLimit) else "was stopped"
            raise TemplateError(
                f"chat template {self.origin} {reason} ({type(error).__name__}: {error}); "
                "it is refused (the sandbox bounds time, size, ranges and attribute access)"
            ) from error
        except (
            jinja2.TemplateError,
            TypeError,
            ValueError,
            LookupError,
            AttributeError,
            ArithmeticError,
        ) as error:
            # raise_exception, or a template that cannot handle this conversation's values (e.g. it joins
            # a call's arguments as a string): a problem of this record
            raise ProtocolError(
                "template_rejected", f"the chat template refused this conversation: {error}"
            ) from error
        return _split_markers(text) if self.has_generation_tags else (text, [])


def _split_markers(marked: str) -> tuple[str, list[tuple[int, int]]]:
    """Remove generation markers; return the clean text and the spans they bracketed."""
    pieces, spans, previous, length, start = [], [], 0, 0, None
    for found in sandbox.MARKERS.finditer(marked):
        pieces.append(marked[previous : found.start()])
        length += found.start() - previous
        previous = found.end()
        if (found.group() == sandbox.OPEN) != (start is None):
            raise TemplateError("chat template nests {% generation %} blocks or leaves one unclosed")
        if found.group() == sandbox.OPEN:
            start = length
        else:
            spans.append((start, length))
            start = None
    pieces.append(marked[previous:])
    return "".join(pieces), spans
