"""Values that cross the protocol's stages: messages, conversations, rendered text, examples, errors."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

ROLES = ("system", "user", "assistant", "tool")
# A lone UTF-16 surrogate (valid in JSON as "\\ud800") cannot be encoded as UTF-8, so no tokenizer takes it.
SURROGATE = re.compile(r"[\ud800-\udfff]")


def location(source: str, line: int, in_array: bool = False) -> str:
    """Where a record is: `file:line` in JSON Lines, `file record N` for element N of a .json array."""
    return f"{source} record {line}" if in_array else f"{source}:{line}"


class ProtocolError(ValueError):
    """A record that cannot become a training example; `reason` is a short, stable category
    (used to count skips), the message says what is wrong in the user's words."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class TemplateError(ValueError):
    """A chat template that cannot give exact assistant spans (found at start-up, before any data)."""


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One function call of an assistant message (OpenAI's `tool_calls` item)."""

    name: str
    arguments: dict[str, Any]  # an object, as transformers' templates expect (never a JSON string)
    id: str | None = None
    _arguments_json: str | None = field(default=None, init=False, repr=False, compare=False)

    def arguments_json(self) -> str:
        """The arguments as JSON text (`json.dumps(..., ensure_ascii=False)`), encoded once: the checks
        and the builtin templates all read it."""
        if self._arguments_json is None:
            object.__setattr__(self, "_arguments_json", JSON_TEXT.encode(self.arguments))
        return self._arguments_json


@dataclass(frozen=True, slots=True, init=False)
class Message:
    role: str  # one of ROLES after normalization
    content: str
    train: bool = True  # False excludes this (assistant) message from the loss
    reasoning: str | None = None  # an assistant's reasoning (`reasoning_content`, `thinking`)
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant's function calls
    tool_call_id: str | None = None  # a tool message: the call it answers
    name: str | None = None  # a tool message: the function that produced it

    def __init__(
        self,
        role: str,
        content: str,
        train: bool = True,
        reasoning: str | None = None,
        tool_calls: tuple[ToolCall, ...] = (),
        tool_call_id: str | None = None,
        name: str | None = None,
    ):
        """The generated frozen __init__ looks `object.__setattr__` up once per field; readers make a
        Message per input message and normalize another, so this one looks it up once (3% of the
        pipeline's own work). Every field must be set here (tests build a Message from every field)."""
        set_field = object.__setattr__
        set_field(self, "role", role)
        set_field(self, "content", content)
        set_field(self, "train", train)
        set_field(self, "reasoning", reasoning)
        set_field(self, "tool_calls", tool_calls)
        set_field(self, "tool_call_id", tool_call_id)
        set_field(self, "name", name)


def message_strings(message: Message) -> list[str]:
    """Every string of a message that a template may print (for the control-token checks)."""
    strings = [message.content, message.reasoning or "", message.tool_call_id or "", message.name or ""]
    for call in message.tool_calls:
        strings += [call.name, call.arguments_json(), call.id or ""]
    return strings


JSON_TEXT = json.JSONEncoder(ensure_ascii=False)  # json.dumps(..., ensure_ascii=False) without its set-up


def json_loads(text: str) -> Any:
    """`json.loads(text)`, parsed by msgspec where it can: it refuses NaN and lone surrogates, which go
    to the standard library for its value or error, and gives the same value for everything else."""
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError:
        return json.loads(text)


@dataclass(slots=True)
class Conversation:
    """One record after reading: its messages plus where it came from (for errors and accounting)."""

    messages: list[Message]
    source: str = "<memory>"  # file name
    line: int = 0  # 1-based line (JSONL) or element index + 1 (JSON array, then `in_array`)
    tools: list[Any] | None = None  # reaches templates as `tools`
    in_array: bool = False
    duplicate_keys: tuple[str, ...] = ()  # keys the record's JSON gave twice (the last value was kept)
    variables: dict[str, Any] = field(default_factory=dict)  # per-record template variables
    # Read from a file, whose reader already refused lone surrogates (records.py): normalize need not look.
    surrogates_checked: bool = False
    # The record's JSON text as read (None when it was not read from JSON): every string of the record
    # is in it, so the control-token check can search it instead of every string (control_tokens.py).
    source_text: str | None = field(default=None, repr=False, compare=False)
    index: int = 0  # its place in its entry's input, set by ConversationEncoder.prepare: the draw's index

    @property
    def where(self) -> str:
        return location(self.source, self.line, self.in_array)


@dataclass(frozen=True, slots=True)
class RenderedChat:
    """The linear text of a conversation and the character spans [start, end) whose tokens are trained."""

    text: str
    assistant_spans: list[tuple[int, int]]  # sorted, disjoint; one per trained assistant message
    # Character positions where the text as rendered at inference ends (generation prompts, final turns):
    # their encodings must be prefixes of the row's encoding, or the row is split (see protocol.turns);
    # a row of one turn that still fails has no exact tokens and is dropped (tokens_cross_turn_boundary).
    boundaries: tuple[int, ...] = field(default=(), compare=False)


@dataclass
class TemplateConfig:
    """The `template` section (conf/template/): a builtin by name, or `jinja` with a `path` or `source`
    (sft.protocol.templates.load_template checks the combination)."""

    name: str = "chatml"  # chatml | llama3 | microlm | jinja
    path: str | None = None
    source: str | None = None
    eot: str | list[str] | None = None  # an end-of-turn marker or several (GPT-OSS); defaults to eos_token
    stop: list[str] = field(default_factory=list)  # tokens generation stops at; default: every eot marker
    date: str | None = None  # what strftime_now prints; default: sft.protocol.templates.jinja.DEFAULT_DATE
    bos_token: str | None = None  # default: from the path's tokenizer_config.json
    eos_token: str | None = None
    special_tokens: list[str] = field(default_factory=list)  # extra control tokens that must be single ids
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra template variables


@dataclass(slots=True)
class ProtocolConfig:
    """The `protocol` config section; everything here is part of the store's cache key."""

    system_prompt: str | list[str] | None = None
    system_prompt_prob: float = 1.0
    role_map: dict[str, str] = field(default_factory=dict)
    merge_consecutive: bool = False
    strip_content: bool = False
    # all_tokens trains on every token (ablations)
    mask: Literal["all_assistant", "last_turn", "all_tokens"] = "all_assistant"
    special_in_content: Literal["reject", "allow"] = "reject"
    max_seq_len: int = 2048  # tokens per example and packed row; the accounting says what a cut costs
    truncation: Literal["right", "drop", "turns"] = "right"
    # auto: one row when every trained turn renders as at inference, else one per trained turn
    turns: Literal["auto", "whole", "per_turn"] = "auto"
    on_error: Literal["raise", "skip"] = "raise"
    seed: int = 0

    def __post_init__(self) -> None:
        choices = {
            "mask": ("all_assistant", "last_turn", "all_tokens"),
            "special_in_content": ("reject", "allow"),
            "truncation": ("right", "drop", "turns"),
            "turns": ("auto", "whole", "per_turn"),
            "on_error": ("raise", "skip"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"protocol.{key}={getattr(self, key)!r}: expected one of {allowed}")
        if not 0.0 <= self.system_prompt_prob <= 1.0:
            raise ValueError(f"protocol.system_prompt_prob={self.system_prompt_prob}: expected 0..1")
        if self.max_seq_len < 2:
            raise ValueError(f"protocol.max_seq_len={self.max_seq_len}: expected >= 2")
