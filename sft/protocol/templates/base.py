"""The template interface: the text a model sees, and which of it the model learns to generate."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

from sft.protocol.types import Message, RenderedChat

TURNS = ("auto", "whole", "per_turn")  # protocol.turns: how a conversation becomes rows


class ChatTemplate(ABC):
    """A conversation format. `render` gives one row with exact assistant spans (or raises);
    `render_rows` gives the rows that train every turn exactly as inference renders it."""

    name: str
    special_tokens: list[str]  # control tokens that must be single ids in the vocabulary
    eot: str  # the first end-of-turn marker: what export declares as the tokenizer's eos
    supports_tool_role: bool = True
    requires_alternation: bool = False  # user/assistant must alternate (normalize merges turns for it)

    @property
    def eot_markers(self) -> tuple[str, ...]:
        """Every marker that can end an assistant turn's text (GPT-OSS: <|return|>, <|end|>, <|call|>)."""
        return (self.eot,)

    @property
    def stop_tokens(self) -> tuple[str, ...]:
        """The tokens at which generation stops (chat, eval, export); by default every eot marker."""
        return self.eot_markers

    @abstractmethod
    def render_text(
        self,
        messages: list[Message],
        tools: list[Any] | None = None,
        add_generation_prompt: bool = False,
        variables: Mapping[str, Any] | None = None,
    ) -> str:
        """The template's text for `messages`, as inference renders it."""

    @abstractmethod
    def render(
        self,
        messages: list[Message],
        tools: list[Any] | None = None,
        add_generation_prompt: bool = False,
        variables: Mapping[str, Any] | None = None,
    ) -> RenderedChat:
        """The text, and one span per assistant message with `train=True` (its text through the eot).
        Raises TemplateError when one row cannot train every turn as inference renders it."""

    @abstractmethod
    def render_rows(
        self,
        messages: list[Message],
        tools: list[Any] | None = None,
        variables: Mapping[str, Any] | None = None,
        turns: str = "auto",
    ) -> list[RenderedChat]:
        """The rows that train every trained turn in exactly its inference context: one row when the
        template renders each turn inside the whole as it does as the final turn, else (`turns=auto`)
        one row per trained turn; `whole` refuses to split, `per_turn` always splits."""

    @property
    @abstractmethod
    def fingerprint(self) -> str:
        """Identifies the rendered format, for cache keys."""


def render_chat_prompt(
    messages: list[Message],
    template: ChatTemplate,
    tools: list[Any] | None = None,
    add_generation_prompt: bool = False,
    variables: Mapping[str, Any] | None = None,
) -> RenderedChat:
    """The protocol's render stage: see `ChatTemplate.render`."""
    return template.render(messages, tools, add_generation_prompt, variables)
