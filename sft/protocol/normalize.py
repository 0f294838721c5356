"""normalize_conversations: resolve role aliases and validate a conversation before it is rendered.

Content is never altered (not even whitespace) unless `strip_content` is set; an empty string is an
error unless the message carries tool calls or reasoning, whitespace-only content is kept as written.
Reasoning and tool calls belong to assistant messages; a tool result must follow an assistant message
that made a call (and answer one of its calls when both carry ids).
"""

from __future__ import annotations

import dataclasses

from sft.protocol.types import (
    ROLES,
    SURROGATE,
    Conversation,
    Message,
    ProtocolConfig,
    ProtocolError,
    message_strings,
)

ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "function_call": "assistant",
    "tool": "tool",
    "observation": "tool",
    "function": "tool",
    "ipython": "tool",
}

# Which role may follow which when a template requires alternation (None: the start, after any system).
_ALLOWED_NEXT = {
    None: ("user",),
    "user": ("assistant",),
    "assistant": ("user", "tool"),
    "tool": ("tool", "assistant"),
}


def normalize_conversations(
    conversation: Conversation, config: ProtocolConfig, *, requires_alternation: bool = False
) -> Conversation:
    """A new Conversation with canonical roles (ROLES), checked; the input is not mutated.

    `train` is kept on assistant messages and set True elsewhere (only assistant text is ever trained).
    With `merge_consecutive`, same-role neighbours become one message joined with "\\n"; a merged
    assistant message is trained only if all its parts were, so an explicit `train: false` is never
    overridden. Errors name the message by its 1-based position in the input; the caller adds
    `conversation.where`."""
    role_map = _role_map(config)
    numbered: list[tuple[int, Message]] = []
    surrogates = not conversation.surrogates_checked and _may_hold_surrogates(conversation.messages)
    for number, message in enumerate(conversation.messages, start=1):
        if not isinstance(message.content, str):
            raise ProtocolError(
                "wrong_type",
                f"message {number} content must be a string, got {type(message.content).__name__}",
            )
        if surrogates and any(SURROGATE.search(text) for text in message_strings(message)):
            raise ProtocolError(
                "invalid_text", f"message {number} holds a lone UTF-16 surrogate, which is not text"
            )
        role = role_map.get(message.role)
        if role is None:
            raise ProtocolError(
                "unknown_role",
                f"message {number} has role {message.role!r}, which is not one of {ROLES} or a "
                f"known alias; map it with protocol.role_map={{{message.role!r}: <one of {ROLES}>}}",
            )
        if role != "assistant" and (message.reasoning is not None or message.tool_calls):
            what = "reasoning" if message.reasoning is not None else "tool calls"
            raise ProtocolError(
                "misplaced_field", f"message {number} ({role}) has {what}; only assistants may"
            )
        content = message.content.strip() if config.strip_content else message.content
        if not content and not (message.tool_calls or message.reasoning):
            if config.strip_content:
                continue  # dropped, as documented for strip_content
            raise ProtocolError("empty_content", f"message {number} ({role}) has empty content")
        train = message.train if role == "assistant" else True
        if (role, content, train) != (message.role, message.content, message.train):
            message = _with_role(message, role, content, train)
        numbered.append((number, message))

    if config.merge_consecutive:
        numbered = _merge_consecutive(numbered)
    _check_structure(numbered, requires_alternation)
    tools = list(conversation.tools) if conversation.tools is not None else None
    return Conversation(  # dataclasses.replace without its generic path (a hot loop: see _with_role)
        [message for _, message in numbered],
        conversation.source,
        conversation.line,
        tools,
        conversation.in_array,
        conversation.duplicate_keys,
        dict(conversation.variables),
        conversation.surrogates_checked,
        conversation.source_text,
        conversation.index,
    )


def _with_role(message: Message, role: str, content: str, train: bool) -> Message:
    """`dataclasses.replace(message, role=, content=, train=)` without its generic path, which costs more
    than the rest of normalizing a message (tests check that it keeps every other field)."""
    return Message(
        role, content, train, message.reasoning, message.tool_calls, message.tool_call_id, message.name
    )


def _may_hold_surrogates(messages: list[Message]) -> bool:
    """Whether some string of the messages may hold a lone surrogate (a conversation built in memory may;
    one read from a file was checked by its reader): one search over them all, so that only then is each
    message checked on its own, for an error that names it."""
    try:
        return SURROGATE.search("".join(text for m in messages for text in message_strings(m))) is not None
    except TypeError:  # content that is not a string: the loop names that error
        return True


def _role_map(config: ProtocolConfig) -> dict[str, str]:
    """The builtin aliases extended and overridden by `protocol.role_map`."""
    if not config.role_map:
        return ROLE_ALIASES
    for alias, role in config.role_map.items():
        if role not in ROLES:
            raise ValueError(f"protocol.role_map[{alias!r}]={role!r}: expected one of {ROLES}")
    return {**ROLE_ALIASES, **config.role_map}


def _merge_consecutive(numbered: list[tuple[int, Message]]) -> list[tuple[int, Message]]:
    """Tool results stay apart (each answers its own call); an assistant's calls and reasoning join."""
    merged: list[tuple[int, Message]] = []
    for number, message in numbered:
        if merged and merged[-1][1].role == message.role != "tool":
            first_number, previous = merged[-1]
            reasonings = [r for r in (previous.reasoning, message.reasoning) if r is not None]
            merged[-1] = (
                first_number,
                dataclasses.replace(
                    previous,
                    content="\n".join(c for c in (previous.content, message.content) if c),
                    train=previous.train and message.train,
                    reasoning="\n".join(reasonings) if reasonings else None,
                    tool_calls=previous.tool_calls + message.tool_calls,
                ),
            )
        else:
            merged.append((number, message))
    return merged


def _check_structure(numbered: list[tuple[int, Message]], requires_alternation: bool) -> None:
    for position, (number, message) in enumerate(numbered):
        if message.role == "system" and position > 0:
            raise ProtocolError(
                "system_not_first", f"message {number} is a system message; only the first may be"
            )
    if not any(message.role == "assistant" for _, message in numbered):
        raise ProtocolError("no_assistant_turn", "no assistant message, so nothing to train on")
    _check_tool_results(numbered)
    if not requires_alternation:
        return
    previous_role = None
    for number, message in numbered:
        if message.role == "system":
            continue
        if message.role not in _ALLOWED_NEXT[previous_role]:
            after = f"after {previous_role!r}" if previous_role else "first (after any system message)"
            raise ProtocolError(
                "wrong_role_order",
                f"message {number} is {message.role!r} {after}; this template needs user and "
                "assistant turns alternating from user (tool turns only after an assistant turn); "
                "protocol.merge_consecutive=true merges repeated roles",
            )
        previous_role = message.role


def _check_tool_results(numbered: list[tuple[int, Message]]) -> None:
    """Each tool result follows (after other results) an assistant message; when that message made
    structured calls with ids and the result names one, it must be one of them."""
    caller: Message | None = None
    for number, message in numbered:
        if message.role == "assistant":
            caller = message
        elif message.role != "tool":
            caller = None
        elif caller is None:
            raise ProtocolError(
                "tool_without_call", f"message {number} is a tool result with no assistant call before it"
            )
        elif message.tool_call_id is not None and any(call.id for call in caller.tool_calls):
            if message.tool_call_id not in {call.id for call in caller.tool_calls}:
                raise ProtocolError(
                    "tool_without_call",
                    f"message {number} answers tool call {message.tool_call_id!r}, which the assistant "
                    "message before it did not make",
                )
