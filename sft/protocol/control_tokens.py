"""Control tokens typed into data: the texts `encode` would turn into control ids, and the checks that find
them in every string a template may render (messages, reasoning, tool calls, tools, template variables).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from tokenizers import Tokenizer

from sft.protocol.types import JSON_TEXT, Conversation, message_strings


def control_token_texts(tokenizer: Tokenizer, control_tokens: Iterable[str] = ()) -> set[str]:
    """The literal text of every special added token and of the template's control tokens: `encode`
    would turn any of them into a control id if a user typed it."""
    specials = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    return specials | set(control_tokens)


def special_token_pattern(tokenizer: Tokenizer, control_tokens: Iterable[str] = ()) -> re.Pattern | None:
    """A regex matching any of `control_token_texts`; None when there are none."""
    specials = control_token_texts(tokenizer, control_tokens)
    return literal_pattern(specials) if specials else None


def literal_pattern(texts: Iterable[str]) -> re.Pattern:
    """A regex matching any of `texts`, the longest first."""
    return re.compile("|".join(re.escape(text) for text in sorted(texts, key=len, reverse=True)))


def data_strings(conversation: Conversation) -> Iterator[tuple[str, str]]:
    """(where, text) for every string of a conversation that a template may render: each message's
    content, reasoning and tool calls, the record's tools and template variables."""
    for number, message in enumerate(conversation.messages, start=1):
        for text in message_strings(message):
            yield f"message {number} ({message.role})", text
    for name, value in (("tools", conversation.tools), ("template variables", conversation.variables)):
        for text in _strings(value):
            yield f"the record's {name}", text


class ControlTokenScan:
    """Whether a conversation's strings may hold a control token, in one regex search; a match sends the
    caller to the exact per-string check, which names the string (or finds nothing).

    When no control token holds a character that JSON escapes (`"`, `\\`, controls), JSON text holds each
    of its strings verbatim, unless a `\\uXXXX` or `\\/` escape spells one of their characters (the `/` of
    `</s>`). So:
    - a record read from JSON text without such escapes is searched as that text;
    - otherwise its strings are joined with a character no control token holds, so no match spans two of
      them; the record's tools and template variables go in as their JSON text (one C call, not a walk
      over every nested string), or string by string when a control token holds such a character."""

    def __init__(self, texts: set[str]):
        self.pattern = literal_pattern(texts)
        self.joiner = next(chr(code) for code in range(0x110000) if all(chr(code) not in t for t in texts))
        self.json_verbatim = not any(char in '"\\' or char < " " for text in texts for char in text)

    def maybe_found(self, conversation: Conversation) -> bool:
        source = conversation.source_text
        if source is not None and self.json_verbatim and not _HIDING_ESCAPE.search(source):
            return self.pattern.search(source) is not None
        texts = [text for message in conversation.messages for text in message_strings(message)]
        for value in (conversation.tools, conversation.variables):
            texts += self._texts(value)
        return self.pattern.search(self.joiner.join(texts)) is not None

    def _texts(self, value: object) -> list[str]:
        if not value:
            return []
        if self.json_verbatim:
            try:
                return [JSON_TEXT.encode(value)]
            except (TypeError, ValueError):  # not JSON (a set, a cycle): walk it
                pass
        return list(_strings(value))


_HIDING_ESCAPE = re.compile(r"\\[u/]")  # a JSON escape that can spell a control token's character


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)
