"""Reading records: files → `RawRecord`s (with file:line provenance) → `Conversation`s.

Reading never raises on bad content: a line that cannot be a record becomes a `RawRecord` carrying a
`ProtocolError`, so the pipeline can raise or skip and count it. Error messages name the field at fault;
the caller prefixes the record's file:line (`RawRecord.where`, `Conversation.where`). Roles are kept as
written; aliases are resolved and conversations validated in `normalize_conversations`.

Record formats (detected per record, or forced with `fmt`):
- messages: `{"messages" | "conversations": [{"role", "content"}, ...]}`; content is a string or a list
  of parts `{"type": "text" | "reasoning" | "tool_call", "text" | "value": str}`.
- sharegpt: `{"conversations": [{"from", "value"}, ...]}`.
Both read the same way: either message spelling, and a top-level `"system"` string as a first message.
- alpaca: `{"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}`.
- prompt_completion: `{"prompt", "completion"}`, each a string or a list of messages.
Any record may carry `tools` (a list, or a JSON string of one). A message with `"train": false` or
`"weight": 0` is excluded from the loss.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from sft.protocol.types import Conversation, Message, ProtocolError

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion")
_fast_json = msgspec.json.Decoder().decode

# How each content part type is rendered into the message's text (prefix, suffix).
_PART_AFFIXES = {
    "text": ("", ""),
    "reasoning": ("<think>\n", "\n</think>\n\n"),
    "tool_call": ("<tool_call>\n", "\n</tool_call>"),
}


@dataclass(frozen=True, slots=True)
class RawRecord:
    """One input record before parsing: exactly one of `data` and `error` is set.

    `line` is the 1-based JSONL line or the 1-based element index of a JSON array; 0 means the whole
    file (a `.json` file that could not be read as a whole)."""

    source: str
    line: int
    data: dict[str, Any] | None = None
    error: ProtocolError | None = None

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def iter_raw_records(path: str | Path) -> Iterator[RawRecord]:
    """Records of a `.json` file (an array of objects, or one object) or a JSON Lines file (any other
    name). JSONL is streamed line by line; blank lines are not records and are skipped."""
    source = str(path)
    if Path(path).suffix == ".json":
        yield from _json_file_records(source, Path(path).read_bytes())
        return
    with open(path, "rb") as file:
        # Split on b"\n" only: str.splitlines would also break on U+2028 etc. inside JSON strings.
        for line_number, raw_line in enumerate(file, start=1):
            if not raw_line.strip():
                continue
            try:
                value = _load_json(raw_line)
            except ProtocolError as error:
                yield RawRecord(source, line_number, error=error)
                continue
            yield _as_record(value, source, line_number)


def _json_file_records(source: str, raw: bytes) -> Iterator[RawRecord]:
    try:
        value = _load_json(raw, hint=" (if it holds one object per line, name it .jsonl)")
    except ProtocolError as error:
        yield RawRecord(source, 0, error=error)
        return
    if isinstance(value, dict):
        yield RawRecord(source, 1, data=value)
    elif isinstance(value, list):
        for index, element in enumerate(value, start=1):
            yield _as_record(element, source, index)
    else:
        message = f"a .json file must hold an array of objects or one object, not {type(value).__name__}"
        yield RawRecord(source, 0, error=ProtocolError("not_an_object", message))


def _load_json(raw: bytes, hint: str = "") -> Any:
    """One JSON value from UTF-8 bytes (a leading BOM is allowed), or ProtocolError.

    msgspec parses the common case twice as fast as `json` and to the same values (big ints stay ints);
    what it refuses (a BOM, NaN, lone surrogate escapes, bad input) goes to `json`, which decides."""
    try:
        return _fast_json(raw)
    except (msgspec.DecodeError, RecursionError):
        pass
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ProtocolError("invalid_utf8", f"not UTF-8 ({error})") from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:  # ValueError: JSONDecodeError, and ints over 4300 digits
        raise ProtocolError("invalid_json", f"invalid JSON ({error}){hint}") from None


def _as_record(value: Any, source: str, line: int) -> RawRecord:
    if isinstance(value, dict):
        return RawRecord(source, line, data=value)
    message = f"expected a JSON object, got {type(value).__name__}"
    return RawRecord(source, line, error=ProtocolError("not_an_object", message))


def detect_format(data: dict[str, Any]) -> str | None:
    """The format of one record (one of FORMATS), or None when its keys match none."""
    for key in ("messages", "conversations"):
        if key in data:
            turns = data[key]
            first = turns[0] if isinstance(turns, list) and turns else None
            return "sharegpt" if isinstance(first, dict) and "from" in first else "messages"
    if "prompt" in data and "completion" in data:
        return "prompt_completion"
    if "instruction" in data and "output" in data:
        return "alpaca"
    return None


def record_to_conversation(
    record: RawRecord | dict[str, Any], fmt: str = "auto", source: str = "<memory>", line: int = 0
) -> Conversation:
    """Parse one record into a Conversation (roles as written). A RawRecord brings its own provenance
    and raises its reading error; `fmt` is "auto" or one of FORMATS."""
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown record format {fmt!r}: expected 'auto' or one of {FORMATS}")
    if isinstance(record, RawRecord):
        if record.error is not None:
            raise record.error
        data, source, line = record.data, record.source, record.line
    else:
        data = record
    if not isinstance(data, dict):
        raise ProtocolError("not_an_object", f"expected a JSON object, got {type(data).__name__}")
    record_format = detect_format(data) if fmt == "auto" else fmt
    if record_format is None:
        raise ProtocolError(
            "unknown_format",
            f"a record with keys {sorted(data)[:20]} matches no known format; expected one of: "
            'messages {"messages"|"conversations": [{"role", "content"}]}, '
            'sharegpt {"conversations": [{"from", "value"}]}, '
            'alpaca {"instruction", "output"}, prompt_completion {"prompt", "completion"}',
        )
    messages = _PARSERS[record_format](data)
    return Conversation(messages, source=source, line=line, tools=_parse_tools(data.get("tools")))


def _parse_chat(data: dict[str, Any]) -> list[Message]:
    """messages and sharegpt: a message list under "messages" or "conversations", each message
    {"role", "content"} or {"from", "value"}; a top-level "system" string becomes the first message."""
    key = "messages" if "messages" in data else "conversations"
    turns = _require(data, key, list)
    return _system_message(data) + _parse_messages(turns, key)


def _parse_alpaca(data: dict[str, Any]) -> list[Message]:
    instruction = _require(data, "instruction", str)
    extra_input = data.get("input")
    if extra_input is not None and not isinstance(extra_input, str):
        raise _wrong_type("'input'", "a string", extra_input)
    prompt = instruction + "\n\n" + extra_input if extra_input else instruction
    messages = _system_message(data)
    history = data.get("history") or []
    if not isinstance(history, list):
        raise _wrong_type("'history'", "a list of [user, assistant] pairs", history)
    for number, pair in enumerate(history, start=1):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(text, str) for text in pair)):
            raise _wrong_type(f"'history' item {number}", "a [user, assistant] pair of strings", pair)
        messages += [Message("user", pair[0]), Message("assistant", pair[1])]
    return messages + [Message("user", prompt), Message("assistant", _require(data, "output", str))]


def _parse_prompt_completion(data: dict[str, Any]) -> list[Message]:
    messages = []
    for key, role in (("prompt", "user"), ("completion", "assistant")):
        value = _require(data, key, (str, list))
        messages += [Message(role, value)] if isinstance(value, str) else _parse_messages(value, key)
    return messages


_PARSERS = {
    "messages": _parse_chat,
    "sharegpt": _parse_chat,
    "alpaca": _parse_alpaca,
    "prompt_completion": _parse_prompt_completion,
}


def _parse_messages(turns: list[Any], key: str) -> list[Message]:
    return [_parse_message(turn, f"'{key}' item {number}") for number, turn in enumerate(turns, start=1)]


def _parse_message(turn: Any, name: str) -> Message:
    if not isinstance(turn, dict):
        raise _wrong_type(name, "an object", turn)
    if "tool_calls" in turn:  # OpenAI's message-level calls: refuse rather than silently drop them
        raise ProtocolError(
            "unsupported_field",
            f"{name} has 'tool_calls'; write each call as a content part "
            '{"type": "tool_call", "value": "..."} instead',
        )
    role_key, content_key = ("role", "content") if "role" in turn else ("from", "value")
    role = _require(turn, role_key, str, name)
    content = _content_text(_require(turn, content_key, (str, list), name), name)
    return Message(role, content, train=_is_trained(turn, name))


def _content_text(content: str | list[Any], name: str) -> str:
    """A message's text: a string as is, or its parts joined in order (tool calls one per line)."""
    if isinstance(content, str):
        return content
    pieces = []
    previous_type = None
    for number, part in enumerate(content, start=1):
        part_name = f"{name} content part {number}"
        if not isinstance(part, dict):
            raise _wrong_type(part_name, "an object", part)
        part_type = part.get("type")
        if part_type not in _PART_AFFIXES:
            raise ProtocolError(
                "unknown_content_part",
                f"{part_name} has type {part_type!r}; known part types: {sorted(_PART_AFFIXES)}",
            )
        value = _require(part, "text" if "text" in part else "value", str, part_name)
        if part_type == previous_type == "tool_call":
            pieces.append("\n")
        prefix, suffix = _PART_AFFIXES[part_type]
        pieces.append(prefix + value + suffix)
        previous_type = part_type
    return "".join(pieces)


def _is_trained(turn: dict[str, Any], name: str) -> bool:
    train = turn.get("train", True)
    if not isinstance(train, bool):
        raise _wrong_type(f"{name} 'train'", "true or false", train)
    weight = turn.get("weight", 1)
    if weight not in (0, 1):
        raise ProtocolError("invalid_weight", f"{name} has weight {weight!r}; only 0 and 1 are supported")
    return train and weight == 1


def _system_message(data: dict[str, Any]) -> list[Message]:
    """A top-level "system" string as a leading message; absent, null or "" means none."""
    system = data.get("system")
    if system is not None and not isinstance(system, str):
        raise _wrong_type("'system'", "a string", system)
    return [Message("system", system)] if system else []


def _parse_tools(tools: Any) -> list[Any] | None:
    """Tool schemas for templates: a list of objects, or a JSON string of one; absent, null, "" → None."""
    if tools is None or tools == "":
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except (ValueError, RecursionError) as error:
            raise ProtocolError(
                "invalid_tools", f"'tools' is a string but not valid JSON ({error})"
            ) from None
    if not (isinstance(tools, list) and all(isinstance(tool, dict) for tool in tools)):
        raise ProtocolError("invalid_tools", "'tools' must be a list of objects (or a JSON string of one)")
    return tools


def _require(data: dict[str, Any], key: str, kind: type | tuple[type, ...], name: str = "record") -> Any:
    if key not in data:
        raise ProtocolError("missing_field", f"{name} has no {key!r} (keys: {sorted(data)[:20]})")
    value = data[key]
    if not isinstance(value, kind):
        expected = " or ".join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))
        raise _wrong_type(f"{name} {key!r}", expected, value)
    return value


def _wrong_type(name: str, expected: str, value: Any) -> ProtocolError:
    return ProtocolError("wrong_type", f"{name} must be {expected}, got {type(value).__name__}")
