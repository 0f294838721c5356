"""The start-up probe: render a conversation with a distinct sentinel in every message (system prompt,
several turns, an untrained turn, reasoning, a tool call and its result, tools) and refuse a template
whose trained text would be wrong, before any data is read.

A template may not render some kinds of message at all (Gemma 1/2 refuse a system role, Phi-3.5 drops tool
messages, Llama 3 has no reasoning): conversations holding one are refused one by one while preparing
(counted), so the probe drops that kind and tries again; `check_template` returns the kinds dropped.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from sft.protocol.templates.base import ChatTemplate
from sft.protocol.types import Message, ProtocolError, RenderedChat, TemplateError, ToolCall

PROBE_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "probe_lookup_5a4c",
            "description": "probe-tool-description-e2d1",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}},
                "required": ["query"],
            },
        },
    }
]
_SYSTEM = [Message("system", "probe-system-7f3a")]
_TURNS = [
    Message("user", "probe-user-1-2b9c"),
    Message("assistant", "probe-assistant-1-5e1d"),
    Message("user", "probe-user-2-9a07"),
    Message("assistant", "probe-assistant-2-c3f8", train=False),
    Message("user", "probe-user-3-41e6"),
]
_CALL = ToolCall("probe_lookup_5a4c", {"query": "probe-argument-77b0"}, id="call_probe_1")
_TOOL_RESULT = Message("tool", "probe-tool-1-8b3e", tool_call_id="call_probe_1", name="probe_lookup_5a4c")

# The kinds of message the probe includes, dropped in this order while the template refuses them.
KINDS = ("system", "tool", "reasoning")


def _probe(kinds: list[str], call_reasoning: bool) -> list[Message]:
    def reasoning(text: str) -> str | None:
        return text if "reasoning" in kinds else None

    turns = [
        replace(m, reasoning=reasoning(f"probe-reasoning-{i}-3b1f")) if m.role == "assistant" else m
        for i, m in enumerate(_TURNS)
    ]
    messages = (_SYSTEM if "system" in kinds else []) + turns
    if "tool" in kinds:
        call_thought = reasoning("probe-reasoning-call-a9e3") if call_reasoning else None
        messages += [Message("assistant", "", reasoning=call_thought, tool_calls=(_CALL,)), _TOOL_RESULT]
    return messages + [
        Message("assistant", "probe-assistant-3-d852", reasoning=reasoning("probe-reasoning-2-4c70"))
    ]


def template_label(template: ChatTemplate) -> str:
    return getattr(template, "origin", template.name)


def probe_conversation(template: ChatTemplate) -> tuple[list[Message], list[Any] | None, list[str]]:
    """(messages, tools, kinds the template does not render): the richest probe the template accepts. A
    kind is dropped when the template loses it, or (a template that raises) in the order of KINDS. A call
    is tried with reasoning and without: thinking templates such as Nemotron's need it on every turn, and
    others may not render a call's reasoning at all."""
    kinds, dropped = list(KINDS), []
    while True:
        tools = PROBE_TOOLS if "tool" in kinds else None
        error = None
        for call_reasoning in (True, False):
            messages = _probe(kinds, call_reasoning)
            try:
                if "tool" in kinds and not template.supports_tool_role:
                    error = ProtocolError("template_rejected", "the template refuses a tool turn")
                    error.kind = "tool"
                    break
                template.render_rows(messages, tools)
                return messages, tools, dropped
            except ProtocolError as refused:
                error = refused
        kind = getattr(error, "kind", None)
        if kind is None and error.reason != "no_inference_target":  # raised by the template: guess
            kind = kinds[0] if kinds else None
        if kind not in kinds:
            raise TemplateError(
                f"template {template_label(template)} cannot train even the start-up probe exactly: {error}"
            ) from error
        dropped.append(kind)
        kinds.remove(kind)


def probe_messages(template: ChatTemplate) -> list[Message]:
    return probe_conversation(template)[0]


def check_template(template: ChatTemplate) -> list[str]:
    """Render the probe and raise TemplateError, naming the message, unless in every row each trained span
    holds exactly its own message (content, reasoning, calls) and ends with an end-of-turn marker, and no
    message is shown twice. Returns the kinds of message the template does not render."""
    messages, tools, dropped = probe_conversation(template)
    rows = template.render_rows(messages, tools)
    trained = [i for i, m in enumerate(messages) if m.role == "assistant" and m.train]
    span_count = sum(len(row.assistant_spans) for row in rows)
    if span_count != len(trained):
        raise TemplateError(
            f"template {template_label(template)}: {span_count} trained spans for {len(trained)} trained "
            "assistant messages of the probe"
        )
    spans = [(row, span) for row in rows for span in row.assistant_spans]
    for index, (row, (start, end)) in zip(trained, spans, strict=True):
        _check_row(template, messages, index, row, start, end)
    return dropped


def _sentinels(message: Message) -> list[str]:
    return [text for text in (message.content, message.reasoning) if text]


def _check_row(
    template: ChatTemplate, messages: list[Message], index: int, row: RenderedChat, start: int, end: int
) -> None:
    text, span_text = row.text, row.text[start:end]

    def fail(at: int, problem: str) -> TemplateError:
        message = messages[at]
        return TemplateError(
            f"template {template_label(template)} fails the start-up probe at message {at} ({message.role}, "
            f"content {message.content!r}): {problem}. Rendered probe: {text!r}"
        )

    for at, message in enumerate(messages):
        count = text.count(message.content) if message.content else 0
        if count > 1:
            raise fail(at, f"rendered {count} times")
    inside = [s for m in messages for s in _sentinels(m) if s in span_text]
    if inside != _sentinels(messages[index]):
        raise fail(index, f"its trained span {span_text!r} holds {inside}, not exactly its own message")
    if not any(span_text.endswith(marker) for marker in template.eot_markers):
        raise fail(index, f"its trained span {span_text!r} does not end with an end-of-turn marker")
