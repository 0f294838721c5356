"""Inference-exact targets: what the model must generate for each assistant turn, and the rows to train it.

Call P_k = render(messages[:k], add_generation_prompt=True) and F_k = render(messages[:k+1]). Turn k's
target is what F_k adds after P_k, through its last end-of-turn marker (GPT-OSS closes an analysis
channel with <|end|> inside one turn). When F_k (hence P_k) is a prefix of the whole rendering for every
trained k, one row trains every turn; the pipeline then also checks the same in tokens (`boundaries`).
Otherwise the template renders history differently from a final turn (Qwen3 drops reasoning, GPT-OSS
ends earlier turns with <|end|>) and each trained turn becomes the final turn of its own row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sft.protocol.types import Message, ProtocolError, RenderedChat, TemplateError

if TYPE_CHECKING:
    from sft.protocol.templates.jinja import JinjaTemplate

SET_EOT = "set template.eot to the marker(s) this template ends assistant turns with"


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    """Turn k as the final turn: F_k, and the span [start, end) of F_k that the model generates."""

    text: str
    start: int
    end: int


def rendered_parts(message: Message) -> list[tuple[str, str]]:
    """(what, text) a template must show of a message: content, reasoning, each call's name. Whitespace
    at the ends does not count (templates trim)."""
    parts = [("content", message.content.strip()), ("reasoning", (message.reasoning or "").strip())]
    parts += [(f"tool call {call.name!r}", call.name) for call in message.tool_calls]
    return [(what, text) for what, text in parts if text]


def _lost(message: Message, index: int, rendered: str) -> ProtocolError | None:
    """The error for a template that does not show part of a message; `kind` says which kind of message
    (system, tool, reasoning) the template cannot render, for the start-up probe."""
    for what, text in rendered_parts(message):
        if text not in rendered:
            error = ProtocolError(
                "template_drops_message",
                f"the chat template does not render message {index + 1} ({message.role})'s {what}, so "
                "this conversation cannot be trained as written",
            )
            tool = message.role == "tool" or what.startswith("tool call")
            error.kind = "reasoning" if what == "reasoning" else "tool" if tool else message.role
            return error
    return None


def final_turn_target(
    template: JinjaTemplate,
    messages: list[Message],
    k: int,
    tools: list[Any] | None,
    variables: Mapping[str, Any] | None,
) -> Target:
    """Turn k's inference target, checked: F_k extends P_k, an eot closes it, it shows the message."""
    prompt, _ = template.render_blocks(messages[:k], tools, True, variables)
    text, blocks = template.render_blocks(messages[: k + 1], tools, False, variables)
    name = f"chat template {template.origin}"
    differ = next((i for i, (a, b) in enumerate(zip(prompt, text)) if a != b), min(len(prompt), len(text)))
    lost = _lost(messages[k], k, text[differ:])  # what the turn adds (tools may repeat a call's name)
    if lost is not None:
        raise lost
    if differ < len(prompt):
        raise TemplateError(
            f"{name}: assistant message {k + 1} has no inference-exact target: the conversation through it "
            f"renders {text[max(0, differ - 30) : differ + 30]!r} where the generation prompt has "
            f"{prompt[max(0, differ - 30) : differ + 30]!r} (char {differ}), so the text it would be trained "
            "on is not what the model generates after that prompt (e.g. a template that prefills <think> "
            "and then renders the final turn without its reasoning)"
        )
    start = len(prompt)
    ends = [
        text.rfind(marker, start) + len(marker) for marker in template.eot_markers if marker in text[start:]
    ]
    if not ends:
        raise TemplateError(f"{name}: assistant message {k + 1}: no end-of-turn marker follows it; {SET_EOT}")
    end = max(ends)
    lost = _lost(messages[k], k, text[start:end])  # shown, but in the prompt rather than the target
    if lost is not None:
        raise lost
    if template.has_generation_tags:
        _check_generation_block(name, k, text, blocks, start, end)
    return Target(text, start, end)


def _check_generation_block(
    name: str, k: int, text: str, blocks: list[tuple[int, int]], start: int, end: int
) -> None:
    """The final turn's {% generation %} block must be the target, optionally followed by whitespace (TRL's
    *_training.jinja wrap the newline after the marker; the span ends at the marker)."""
    block = blocks[-1] if blocks else None
    if block is None or block[0] != start or block[1] < end or text[end : block[1]].strip():
        shown = "none" if block is None else repr(text[block[0] : block[1]])
        raise TemplateError(
            f"{name}: assistant message {k + 1}: its {{% generation %}} block ({shown}) is not what the "
            f"model generates after the generation prompt ({text[start:end]!r}); tags must wrap exactly "
            "the assistant's text through its end-of-turn marker"
        )


def inference_rows(
    template: JinjaTemplate,
    messages: list[Message],
    tools: list[Any] | None,
    variables: Mapping[str, Any] | None,
    turns: str,
) -> list[RenderedChat]:
    """The rows of one conversation (see the module docstring); ProtocolError when the template loses a
    message, TemplateError when a turn has no inference-exact target or `turns=whole` cannot hold."""
    whole, _ = template.render_blocks(messages, tools, False, variables)
    trained = [k for k, m in enumerate(messages) if m.role == "assistant" and m.train]
    targets = {k: final_turn_target(template, messages, k, tools, variables) for k in trained}
    for index, message in enumerate(messages):
        if index not in targets and _lost(message, index, whole) is not None:
            lost = _lost(
                message, index, template.render_blocks(messages[: index + 1], tools, False, variables)[0]
            )
            if lost is not None:
                raise lost
    if turns == "per_turn":
        return [RenderedChat(t.text, [(t.start, t.end)]) for t in targets.values()]
    spans = [(t.start, t.end) for t in targets.values()]
    stable = all(whole.startswith(t.text) for t in targets.values()) and all(
        previous[1] <= following[0] for previous, following in zip(spans, spans[1:])
    )
    if stable:
        boundaries = sorted({position for t in targets.values() for position in (t.start, len(t.text))})
        return [RenderedChat(whole, spans, tuple(boundaries))]
    if turns == "whole":
        k = next(k for k, t in targets.items() if not whole.startswith(t.text))
        raise TemplateError(unstable_message(template.origin, k, targets[k].text, whole))
    return [RenderedChat(t.text, [(t.start, t.end)]) for t in targets.values()]


def unstable_message(origin: str, k: int, final: str, whole: str) -> str:
    differ = next((i for i, (a, b) in enumerate(zip(final, whole)) if a != b), min(len(final), len(whole)))
    window = slice(max(0, differ - 30), differ + 30)
    return (
        f"chat template {origin} is not prefix-stable at message {k + 1} (assistant): as the final turn it "
        f"renders {final[window]!r} around char {differ}, but inside the whole conversation "
        f"{whole[window]!r}. protocol.turns=whole refuses to split; protocol.turns=auto trains each turn "
        "in its own row, exactly as inference renders it"
    )
