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

SET_EOT = (
    "set template.eot to the marker(s) this template ends assistant turns with, in Hydra quotes inside the "
    "shell's: \"template.eot='<|im_end|>'\""
)


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
    """Turn k's inference target, checked: F_k extends P_k, an eot closes it, it shows the message.
    ProtocolError when this conversation cannot be trained as written (the template drops part of the
    message, or this turn's text does not extend its generation prompt); TemplateError when no
    conversation can be (no end-of-turn marker, tags around the wrong text)."""
    prompt, _ = template.render_blocks(messages[:k], tools, True, variables)
    text, blocks = template.render_blocks(messages[: k + 1], tools, False, variables)
    name = f"chat template {template.origin}"
    differ = next((i for i, (a, b) in enumerate(zip(prompt, text)) if a != b), min(len(prompt), len(text)))
    lost = _lost(messages[k], k, text[differ:])  # what the turn adds (tools may repeat a call's name)
    if lost is not None:
        raise lost
    if differ < len(prompt):
        error = ProtocolError(
            "no_inference_target",
            f"{name}: assistant message {k + 1} has no inference-exact target: the conversation through it "
            f"renders {text[max(0, differ - 30) : differ + 30]!r} where the generation prompt has "
            f"{prompt[max(0, differ - 30) : differ + 30]!r} (char {differ}), so the text it would be trained "
            "on is not what the model generates after that prompt (e.g. a template that prefills <think> "
            "and renders the turn without it, or prefills an empty reasoning block and renders reasoning)",
        )
        error.kind = "reasoning" if messages[k].reasoning is not None else None
        raise error
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
    """Tags must cover the final turn's target: the span is the target whatever else they wrap (TRL's
    *_training.jinja also wrap the newline after the marker, or the header and a prefilled <think>, which
    inference gives the model rather than it generating them); a block that cuts the target short means
    the template expects something else to be generated, and is refused."""
    if not any(block_start <= start and end <= block_end for block_start, block_end in blocks):
        shown = [text[block_start:block_end] for block_start, block_end in blocks[-2:]]
        raise TemplateError(
            f"{name}: assistant message {k + 1}: no {{% generation %}} block covers what the model "
            f"generates after the generation prompt ({text[start:end]!r}; the last blocks hold {shown}); "
            "tags must wrap the assistant's text through its end-of-turn marker"
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
    stable = all(whole.startswith(t.text[: t.end]) for t in targets.values()) and all(
        previous[1] <= following[0] for previous, following in zip(spans, spans[1:])
    )
    if stable:
        boundaries = sorted({position for t in targets.values() for position in (t.start, t.end)})
        return [RenderedChat(whole, spans, tuple(boundaries))]
    if turns == "whole":
        k = next(k for k, t in targets.items() if not whole.startswith(t.text[: t.end]))
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
