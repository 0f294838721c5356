"""Inference-exact targets: what the model must generate for each assistant turn, and the rows to train it.

Call P_k = render(messages[:k], add_generation_prompt=True) and F_k = render(messages[:k+1]). Turn k's
target is what F_k adds after P_k, through its last end-of-turn marker (GPT-OSS closes an analysis
channel with <|end|> inside one turn). When F_k (hence P_k) is a prefix of the whole rendering for every
trained k, one row trains every turn; the pipeline then also checks the same in tokens (`boundaries`).
Otherwise the template renders history differently from a final turn (Qwen3 drops reasoning, GPT-OSS
ends earlier turns with <|end|>) and each trained turn becomes the final turn of its own row.

A template may also render the history *before* a final turn differently from P_k (GPT-OSS keeps a call's
reasoning while no answer follows it, so P_k holds it and F_k does not): then F_k does not extend P_k,
and turn k's row is P_k + T, T being what F_k renders for message k after the generation prompt. T is
located, not guessed (`_turn_after_other_history`), and such a turn always trains in a row of its own.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sft.protocol.types import Message, ProtocolError, RenderedChat, TemplateError

if TYPE_CHECKING:
    from sft.protocol.templates.jinja import JinjaTemplate

SET_EOT = (
    "set template.eot to the marker(s) this template ends assistant turns with, in Hydra quotes inside the "
    "shell's: \"template.eot='<|im_end|>'\""
)


# Two values for each of a message's strings that differ at their first character: where two renderings
# with them first differ is where the template starts printing that message's own text.
SENTINELS = ("a-sft-turn-sentinel", "b-sft-turn-sentinel")


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    """Turn k's row as inference gives it (F_k, or P_k + T when F_k renders the history otherwise), and
    the span [start, end) of it that the model generates."""

    text: str
    start: int
    end: int
    own_row: bool = False  # the row is P_k + T, not a prefix of F_k: never shared with other turns


def rendered_parts(message: Message) -> list[tuple[str, str]]:
    """(what, text) a template must show of a message: content, reasoning, each call's name. Whitespace
    at the ends does not count (templates trim), nor does escaping as a JSON string (GPT-OSS and Llama 3.1
    print a tool result with `tojson`)."""
    parts = [("content", message.content.strip()), ("reasoning", (message.reasoning or "").strip())]
    parts += [(f"tool call {call.name!r}", call.name) for call in message.tool_calls]
    return [(what, text) for what, text in parts if text]


def _lost(message: Message, index: int, rendered: str) -> ProtocolError | None:
    """The error for a template that does not show part of a message; `kind` says which kind of message
    (system, tool, reasoning) the template cannot render, for the start-up probe."""
    for what, text in rendered_parts(message):
        if text not in rendered and json.dumps(text, ensure_ascii=False)[1:-1] not in rendered:
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
    differ = _first_difference(prompt, text)
    lost = _lost(messages[k], k, text[differ:])  # what the turn adds (tools may repeat a call's name)
    if lost is not None:
        raise lost
    located = (
        _turn_after_other_history(template, messages, k, tools, variables) if differ < len(prompt) else None
    )
    if located is not None:
        start, end = located
        if template.has_generation_tags:
            _check_generation_block(name, k, text, blocks, start, end)
        return Target(prompt + text[start:end], len(prompt), len(prompt) + end - start, own_row=True)
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
    end = _last_marker_end(template, text, start)
    if end is None:
        raise TemplateError(f"{name}: assistant message {k + 1}: no end-of-turn marker follows it; {SET_EOT}")
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
        return [_own_row(t) for t in targets.values()]
    spans = [(t.start, t.end) for t in targets.values()]
    stable = all(not t.own_row and whole.startswith(t.text[: t.end]) for t in targets.values()) and all(
        previous[1] <= following[0] for previous, following in zip(spans, spans[1:])
    )
    if stable:
        boundaries = sorted({position for t in targets.values() for position in (t.start, t.end)})
        return [RenderedChat(whole, spans, tuple(boundaries))]
    if turns == "whole":
        k = next(k for k, t in targets.items() if t.own_row or not whole.startswith(t.text[: t.end]))
        raise TemplateError(unstable_message(template.origin, k, targets[k].text, whole))
    return [_own_row(t) for t in targets.values()]


def _own_row(target: Target) -> RenderedChat:
    """Turn k alone in its row, its prompt's end and its own end as boundaries: encoded, the row must
    begin with the prompt's tokens as inference encodes them (a BPE may merge across the boundary)."""
    return RenderedChat(target.text, [(target.start, target.end)], (target.start, target.end))


def unstable_message(origin: str, k: int, final: str, whole: str) -> str:
    differ = _first_difference(final, whole)
    window = slice(max(0, differ - 30), differ + 30)
    return (
        f"chat template {origin} is not prefix-stable at message {k + 1} (assistant): as the final turn it "
        f"renders {final[window]!r} around char {differ}, but inside the whole conversation "
        f"{whole[window]!r}. protocol.turns=whole refuses to split; protocol.turns=auto trains each turn "
        "in its own row, exactly as inference renders it"
    )


def _last_marker_end(template: JinjaTemplate, text: str, start: int) -> int | None:
    """Where the last end-of-turn marker at or after `start` ends; None when there is none."""
    ends = [
        text.rfind(marker, start) + len(marker) for marker in template.eot_markers if marker in text[start:]
    ]
    return max(ends, default=None)


def _first_difference(first: str, second: str) -> int:
    """The first index where the two strings differ (the shorter one's length when one extends the other)."""
    return next((i for i, (a, b) in enumerate(zip(first, second)) if a != b), min(len(first), len(second)))


def _with_sentinels(message: Message, tag: str) -> Message:
    """The message with every non-empty string it carries (content, reasoning, call arguments) replaced
    by a `tag` sentinel: the same shape, other text."""
    return dataclasses.replace(
        message,
        content=f"{tag}-content" if message.content else message.content,
        reasoning=f"{tag}-reasoning" if message.reasoning else message.reasoning,
        tool_calls=tuple(
            dataclasses.replace(call, arguments={key: f"{tag}-argument-{key}" for key in call.arguments})
            for call in message.tool_calls
        ),
    )


def _turn_after_other_history(
    template: JinjaTemplate,
    messages: list[Message],
    k: int,
    tools: list[Any] | None,
    variables: Mapping[str, Any] | None,
) -> tuple[int, int] | None:
    """Where F_k holds message k's own turn T ([start, end) of F_k) when F_k renders the history before it
    differently from P_k; None unless every check holds. P_k must be render(messages[:k]) + G (G the
    generation prompt); message k's text starts where two sentinel versions of it first render apart;
    T follows the last G before that and ends at the last end-of-turn marker; T shows all of message k
    and is the same after a history of sentinels (so it is the turn's own text, none of the history's)."""
    located = _locate_turn(template, messages, k, tools, variables)
    other_history = [_with_sentinels(m, f"history-{i}") for i, m in enumerate(messages[:k])]
    moved = _locate_turn(template, other_history + messages[k : k + 1], k, tools, variables)
    if located is None or moved is None or located[2] != moved[2]:
        return None
    return located[0], located[1]


def _locate_turn(
    template: JinjaTemplate,
    messages: list[Message],
    k: int,
    tools: list[Any] | None,
    variables: Mapping[str, Any] | None,
) -> tuple[int, int, str] | None:
    """(start, end, T): turn k's own text T = F_k[start:end], for `_turn_after_other_history`."""
    try:
        history = template.render_text(messages[:k], tools, False, variables)
        prompt = template.render_text(messages[:k], tools, True, variables)
        text = template.render_text(messages[: k + 1], tools, False, variables)
        first, second = (
            template.render_text(messages[:k] + [_with_sentinels(messages[k], tag)], tools, False, variables)
            for tag in SENTINELS
        )
    except ProtocolError:
        return None
    generation_prompt = prompt[len(history) :]
    own_text = _first_difference(first, second)  # where the template prints message k's own strings
    if not generation_prompt or not prompt.startswith(history) or not text.startswith(first[:own_text]):
        return None
    cut = text.rfind(generation_prompt, 0, own_text)
    if cut < 0 or _first_difference(prompt, text) >= cut:  # only the history may render differently
        return None
    start = cut + len(generation_prompt)
    end = _last_marker_end(template, text, start)
    if end is None or _lost(messages[k], k, text[start:end]) is not None:
        return None
    return start, end, text[start:end]
