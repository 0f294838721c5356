"""A generated reply as an assistant message of the records' schema (content, reasoning, tool calls), so
that the next turn renders it through the template the way training renders history (Qwen3 and GPT-OSS
drop reasoning there), and so that the terminal shows the reasoning apart from the answer.

Formats read: GPT-OSS's channels (`<|channel|>analysis<|message|>…<|end|><|start|>assistant<|channel|>
final<|message|>…`, calls `<|start|>assistant to=functions.NAME<|channel|>commentary json<|message|>{…}`,
the stop token already cut); `<think>…</think>` (Qwen, Nemotron, the builtins) and tool calls as the
template writes them (sft.tool_call_text: the builtins' own pattern, the common Jinja formats). Text that
does not parse stays in the content.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sft.protocol.templates.builtin import BuiltinTemplate
from sft.protocol.types import ToolCall
from sft.tool_call_text import channel_call, channel_messages, find_tool_calls


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


def parse_reply(reply: str, template: Any = None) -> Reply:
    """The reply's reasoning, content and calls (see the module docstring); `template` is the one the
    reply was generated with (its call format), None for every common format."""
    if "<|channel|>" in reply and "<|message|>" in reply:
        return _parse_channels(reply)
    reasoning, answer = split_reasoning(reply)
    if isinstance(template, BuiltinTemplate):  # text a builtin writes between the body and its eot
        answer = answer.removesuffix(
            template.assistant_footer[: template.assistant_footer.index(template.eot)]
        )
    content, calls = _calls(answer, template)
    return Reply(content, reasoning, calls, shown=reply)


def split_reasoning(reply: str) -> tuple[str | None, str]:
    """(reasoning, answer) of a generated reply that thinks in <think>…</think> (Qwen, Nemotron, the
    builtins), as those templates split a reply themselves; (None, reply) otherwise."""
    if "</think>" not in reply:
        return None, reply
    thinking, answer = reply.split("</think>", 1)
    return thinking.split("<think>")[-1].strip("\n"), answer.lstrip("\n")


def _parse_channels(reply: str) -> Reply:
    """GPT-OSS: analysis → reasoning, a message to functions.NAME → a call (its text a JSON object), any
    other channel (final, commentary) → content. Shown as one `[channel] text` line per message."""
    reasoning, content, calls, shown = [], [], [], []
    for message in channel_messages(reply):
        call = channel_call(message) if message.function else None
        if call is not None:
            calls.append(ToolCall(call["name"], call["arguments"]))
            shown.append(f"[call {message.function}] {message.text}")
            continue
        (reasoning if message.channel == "analysis" else content).append(message.text)
        shown.append(f"[{message.channel}] {message.text}")
    return Reply(
        "\n".join(content), "\n".join(reasoning) if reasoning else None, tuple(calls), shown="\n".join(shown)
    )


def _calls(answer: str, template: Any) -> tuple[str, tuple[ToolCall, ...]]:
    """(content, calls): the text around the calls (before them in most templates, after them in
    Gemma 4's), and the calls, when every call parses; else the whole answer as content."""
    found = find_tool_calls(answer, template)
    if not found or any(f.call is None for f in found):
        return answer, ()
    calls = tuple(ToolCall(f.call["name"], f.call["arguments"]) for f in found)
    starts, ends = [f.start for f in found] + [len(answer)], [0] + [f.end for f in found]
    pieces = (answer[end:start].strip("\n") for end, start in zip(ends, starts, strict=True) if start > end)
    return "\n".join(piece for piece in pieces if piece.strip()), calls
