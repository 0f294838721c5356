"""normalize_conversations: resolve role aliases and validate a conversation before it is rendered.

Content is never altered (not even whitespace) unless `strip_content` is set; an empty string is an
error, whitespace-only content is kept as written.
"""

from __future__ import annotations

import dataclasses

from sft.protocol.types import ROLES, SURROGATE, Conversation, Message, ProtocolConfig, ProtocolError

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
    for number, message in enumerate(conversation.messages, start=1):
        if not isinstance(message.content, str):
            raise ProtocolError(
                "wrong_type",
                f"message {number} content must be a string, got {type(message.content).__name__}",
            )
        if SURROGATE.search(message.content):  # records from files are checked when read; these from memory
            raise ProtocolError(
                "invalid_text", f"message {number} content holds a lone UTF-16 surrogate, which is not text"
            )
        role = role_map.get(message.role)
        if role is None:
            raise ProtocolError(
                "unknown_role",
                f"message {number} has role {message.role!r}, which is not one of {ROLES} or a "
                f"known alias; map it with protocol.role_map={{{message.role!r}: <one of {ROLES}>}}",
            )
        content = message.content.strip() if config.strip_content else message.content
        if not content:
            if config.strip_content:
                continue  # dropped, as documented for strip_content
            raise ProtocolError("empty_content", f"message {number} ({role}) has empty content")
        numbered.append((number, Message(role, content, message.train if role == "assistant" else True)))

    if config.merge_consecutive:
        numbered = _merge_consecutive(numbered)
    _check_structure(numbered, requires_alternation)
    tools = list(conversation.tools) if conversation.tools is not None else None
    return dataclasses.replace(conversation, messages=[message for _, message in numbered], tools=tools)


def _role_map(config: ProtocolConfig) -> dict[str, str]:
    """The builtin aliases extended and overridden by `protocol.role_map`."""
    for alias, role in config.role_map.items():
        if role not in ROLES:
            raise ValueError(f"protocol.role_map[{alias!r}]={role!r}: expected one of {ROLES}")
    return {**ROLE_ALIASES, **config.role_map}


def _merge_consecutive(numbered: list[tuple[int, Message]]) -> list[tuple[int, Message]]:
    merged: list[tuple[int, Message]] = []
    for number, message in numbered:
        if merged and merged[-1][1].role == message.role:
            first_number, previous = merged[-1]
            content = previous.content + "\n" + message.content
            merged[-1] = (first_number, Message(message.role, content, previous.train and message.train))
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
