"""A generated reply as an assistant message of the records' schema (content, reasoning, tool calls), so
that the next turn renders it through the template the way training renders history (Qwen3 and GPT-OSS
drop reasoning there), and so that the terminal shows the reasoning apart from the answer.

Formats read: GPT-OSS's channels (`<|channel|>analysis<|message|>…<|end|><|start|>assistant<|channel|>
final<|message|>…`, calls `<|start|>assistant to=functions.NAME<|channel|>commentary json<|message|>{…}`,
the stop token already cut); `<think>…</think>` (Qwen, Nemotron, the builtins) and `<tool_call>{"name",
"arguments"}</tool_call>` (Qwen, the builtin chatml). Text that does not parse stays in the content.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sft.protocol.types import ToolCall

# One GPT-OSS message: its header (channel, recipient), then its text up to the marker that closes it
# (none for the last one: generation stopped at <|return|> or <|call|>, which are not part of the reply).
CHANNEL_MESSAGE = re.compile(r"(?P<header>.*?)<\|message\|>(?P<text>.*?)(?:<\|end\|><\|start\|>|\Z)", re.S)
CHANNEL = re.compile(r"<\|channel\|>\s*(\w+)")
RECIPIENT = re.compile(r"\bto=functions\.([^\s<]+)")
QWEN_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


@dataclass(frozen=True, slots=True)
class Reply:
    """What a reply holds; `shown` is the text the terminal prints for it."""

    content: str
    reasoning: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    shown: str = ""

    def message(self) -> dict[str, Any]:
        """The assistant message for the history, as a record would hold it."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning is not None:
            message["reasoning"] = self.reasoning
        if self.tool_calls:
            message["tool_calls"] = [
                {"type": "function", "function": {"name": call.name, "arguments": call.arguments}}
                for call in self.tool_calls
            ]
        return message


def parse_reply(reply: str) -> Reply:
    """The reply's reasoning, content and calls (see the module docstring)."""
    if "<|channel|>" in reply and "<|message|>" in reply:
        return _parse_channels(reply)
    reasoning, answer = split_reasoning(reply)
    content, calls = _qwen_calls(answer)
    return Reply(content, reasoning, calls, shown=reply)


def split_reasoning(reply: str) -> tuple[str | None, str]:
    """(reasoning, answer) of a generated reply that thinks in <think>…</think> (Qwen, Nemotron, the
    builtins), as those templates split a reply themselves; (None, reply) otherwise."""
    if "</think>" not in reply:
        return None, reply
    thinking, answer = reply.split("</think>", 1)
    return thinking.split("<think>")[-1].strip("\n"), answer.lstrip("\n")


def channel_messages(reply: str) -> Iterator[tuple[str, str | None, str]]:
    """(channel, the function it calls or None, text) of each GPT-OSS message of a reply."""
    for found in CHANNEL_MESSAGE.finditer(reply):
        channel, recipient = CHANNEL.search(found.group("header")), RECIPIENT.search(found.group("header"))
        yield (
            channel.group(1) if channel else "final",
            recipient.group(1) if recipient else None,
            found.group("text"),
        )


def _parse_channels(reply: str) -> Reply:
    """GPT-OSS: analysis → reasoning, a message to functions.NAME → a call (its text a JSON object), any
    other channel (final, commentary) → content. Shown as one `[channel] text` line per message."""
    reasoning, content, calls, shown = [], [], [], []
    for channel, function, text in channel_messages(reply):
        arguments = _json_object(text) if function else None
        if arguments is not None:
            calls.append(ToolCall(function, arguments))
            shown.append(f"[call {function}] {text}")
            continue
        (reasoning if channel == "analysis" else content).append(text)
        shown.append(f"[{channel}] {text}")
    return Reply(
        "\n".join(content), "\n".join(reasoning) if reasoning else None, tuple(calls), shown="\n".join(shown)
    )


def _qwen_calls(answer: str) -> tuple[str, tuple[ToolCall, ...]]:
    """(content, calls): each `<tool_call>` holding a JSON object with a name and object arguments is a
    call, and the content is the text before the first of them."""
    calls = []
    for found in QWEN_CALL.finditer(answer):
        call = _json_object(found.group(1))
        if (
            call is None
            or not isinstance(call.get("name"), str)
            or not isinstance(call.get("arguments"), dict)
        ):
            return answer, ()
        calls.append(ToolCall(call["name"], call["arguments"]))
    if not calls:
        return answer, ()
    return answer[: answer.index("<tool_call>")].rstrip("\n"), tuple(calls)


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
