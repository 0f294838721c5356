"""Reading records: files → `RawRecord`s (with file:line provenance) → `Conversation`s.

Reading never raises on bad content: a line that cannot be a record becomes a `RawRecord` carrying a
`ProtocolError`, so the pipeline can raise or skip and count it. Error messages name the field at fault;
the caller prefixes the record's file:line (`RawRecord.where`, `Conversation.where`). Roles are kept as
written; aliases are resolved and conversations validated in `normalize_conversations`.

Record formats (detected per record, or forced with `fmt`):
- messages: `{"messages" | "conversations": [{"role", "content"}, ...]}` in the schema of today's APIs:
  content is a string, null (beside tool calls or reasoning) or a list of parts
  `{"type": "text" | "reasoning" | "tool_call", "text" | "value": str}`; an assistant message may carry
  `reasoning_content` (or `reasoning`, `thinking`) and `tool_calls`
  (`[{"type": "function", "id"?, "function": {"name", "arguments"}}]`, arguments an object or a JSON
  string of one; stored as an object); a tool message `tool_call_id` and `name`. A `tool_call` part holds
  `{"name", "arguments"}` JSON, as LLaMA-Factory writes it.
- sharegpt: `{"conversations": [{"from", "value"}, ...]}`; `function_call` turns hold `{"name",
  "arguments"}` JSON (or a list of them) and become an assistant message with those calls;
  `observation` turns become tool results.
Both read the same way: either message spelling, and a top-level `"system"` string as a first message.
- alpaca: `{"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}`.
- prompt_completion: `{"prompt", "completion"}`, each a string or a list of messages.
Any record may carry `tools` (a list, or a JSON string of one), and template variables: `enable_thinking`,
`reasoning_effort`, and any others in `chat_template_kwargs`. A message with `"train": false` or
`"weight": 0` is excluded from the loss.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sft.protocol.messages import parse_messages, require, wrong_type
from sft.protocol.types import (
    SURROGATE,
    Conversation,
    Message,
    ProtocolError,
    json_loads,
    location,
)

BLANK_LINE = "blank_line"  # the reason a blank line is skipped (counted, never an error)

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion")
TEMPLATE_VARIABLES = ("enable_thinking", "reasoning_effort")  # record keys passed to the template


@dataclass(frozen=True, slots=True)
class RawRecord:
    """One input record before parsing: exactly one of `data` and `error` is set.

    `line` is the 1-based JSONL line, or (`in_array`) the 1-based element index of a .json array.
    `duplicate_keys` lists keys some object of the record gave twice (JSON keeps the last value)."""

    source: str
    line: int
    data: dict[str, Any] | None = None
    error: ProtocolError | None = None
    in_array: bool = False
    duplicate_keys: tuple[str, ...] = ()
    text: str | None = field(default=None, repr=False, compare=False)  # its JSON text, where it has one

    @property
    def where(self) -> str:
        return location(self.source, self.line, self.in_array)


def iter_raw_records(path: str | Path) -> Iterator[RawRecord]:
    """Records of a `.json` file (an array of objects, or one object) or a JSON Lines file (any other
    name). JSONL is streamed line by line; a blank line is a record with the error BLANK_LINE, so that
    the accounting counts every line."""
    source = str(path)
    if Path(path).suffix == ".json":
        yield from _json_file_records(source, Path(path).read_bytes())
        return
    with open(path, "rb") as file:
        # Split on b"\n" only: str.splitlines would also break on U+2028 etc. inside JSON strings.
        for line_number, raw_line in enumerate(file, start=1):
            if not raw_line.strip():
                yield RawRecord(source, line_number, error=ProtocolError(BLANK_LINE, "a blank line"))
                continue
            try:
                text = _decode(raw_line)
                value, duplicates, _ = _parse(text)
            except ProtocolError as error:
                yield RawRecord(source, line_number, error=error)
                continue
            yield _as_record(value, source, line_number, duplicates, _may_hold_surrogates(text), text=text)


def _json_file_records(source: str, raw: bytes) -> Iterator[RawRecord]:
    """A .json file's records. An array is read element by element, so a truncated or broken array keeps
    the records before the fault, and the fault is located at the element where it starts."""
    hint = " (if it holds one object per line, name it .jsonl)"
    try:
        text = _decode(raw)
    except ProtocolError as error:
        yield RawRecord(source, 1, error=error)
        return
    surrogates = _may_hold_surrogates(text)
    position = _skip_whitespace(text, 0)
    if not text.startswith("[", position):
        try:
            value, duplicates, _ = _parse(text, hint=hint)
        except ProtocolError as error:
            yield RawRecord(source, 1, error=error)
            return
        if isinstance(value, dict):
            yield _as_record(value, source, 1, duplicates, surrogates, text=text)
        else:
            message = f"a .json file must hold an array of objects or one object, not {type(value).__name__}"
            yield RawRecord(source, 1, error=ProtocolError("not_an_object", message))
        return
    position = _skip_whitespace(text, position + 1)
    index = 0
    empty = text.startswith("]", position)
    while not empty:
        index += 1
        try:
            value, duplicates, end = _parse(text, position, whole=False)
        except ProtocolError as error:
            yield RawRecord(source, index, error=error, in_array=True)
            return
        yield _as_record(value, source, index, duplicates, surrogates, True, text[position:end])
        position = end
        position = _skip_whitespace(text, position)
        if text.startswith(",", position):
            position = _skip_whitespace(text, position + 1)
        elif text.startswith("]", position):
            break
        else:  # the array ends without "]" (a truncated file) or holds something that is not JSON
            error = _invalid_json(json.JSONDecodeError("Expecting ',' or ']'", text, position))
            yield RawRecord(source, index + 1, error=error, in_array=True)
            return
    end = _skip_whitespace(text, position + 1)
    if end < len(text):
        error = _invalid_json(json.JSONDecodeError("Extra data after the array", text, end))
        yield RawRecord(source, index + 1, error=error, in_array=True)


_WHITESPACE = re.compile(r"[ \t\n\r]*")  # what JSON allows between values
# A JSON escape of a UTF-16 surrogate (\uD800-\uDFFF); only these can put a surrogate into a parsed string.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _skip_whitespace(text: str, position: int) -> int:
    return _WHITESPACE.match(text, position).end()


def _may_hold_surrogates(text: str) -> bool:
    return _SURROGATE_ESCAPE.search(text) is not None


def _decode(raw: bytes) -> str:
    """UTF-8 bytes as text (a leading BOM is allowed), or ProtocolError."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ProtocolError("invalid_utf8", f"not UTF-8 ({error})") from None


def _parse(
    text: str, position: int = 0, whole: bool = True, hint: str = ""
) -> tuple[Any, tuple[str, ...], int]:
    """The JSON value at `position`: (value, keys some object gave twice, end). `whole`: nothing but
    whitespace may follow it."""
    duplicates = _parsing.duplicates = []
    try:
        value, end = _DECODER.raw_decode(text, _skip_whitespace(text, position))
        if whole and _skip_whitespace(text, end) < len(text):
            raise json.JSONDecodeError("Extra data", text, _skip_whitespace(text, end))
    except (ValueError, RecursionError) as error:  # ValueError: JSONDecodeError, and ints over 4300 digits
        raise _invalid_json(error, hint) from None
    return value, tuple(dict.fromkeys(duplicates)), end


_parsing = threading.local()  # `duplicates`: the keys that the parse running in this thread saw twice


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        _parsing.duplicates.extend(key for key, _ in pairs if key in seen or seen.add(key))
    return value


# One decoder for every record (making one costs as much as parsing a short record).
_DECODER = json.JSONDecoder(object_pairs_hook=_object)


def _invalid_json(error: Exception, hint: str = "") -> ProtocolError:
    return ProtocolError("invalid_json", f"invalid JSON ({error}){hint}")


def _as_record(
    value: Any,
    source: str,
    line: int,
    duplicates: tuple[str, ...] = (),
    check_surrogates: bool = False,
    in_array: bool = False,
    text: str | None = None,
) -> RawRecord:
    if not isinstance(value, dict):
        message = f"expected a JSON object, got {type(value).__name__}"
        return RawRecord(source, line, error=ProtocolError("not_an_object", message), in_array=in_array)
    field_name = _surrogate_field(value) if check_surrogates else None
    if field_name is not None:
        message = f"{field_name} holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape), which is not text"
        return RawRecord(source, line, error=ProtocolError("invalid_text", message), in_array=in_array)
    return RawRecord(source, line, data=value, in_array=in_array, duplicate_keys=duplicates, text=text)


def _surrogate_field(record: dict[str, Any]) -> str | None:
    """The first string (value or key) of a record holding a lone surrogate, named like `messages[1].content`;
    None when there is none. Iterative: a record may nest as deep as the JSON parser allows."""
    stack: list[tuple[str, Any]] = [("", record)]
    while stack:
        name, value = stack.pop()
        if isinstance(value, str):
            if SURROGATE.search(value):
                return f"'{name}'" if name else "a key"
        elif isinstance(value, dict):
            for key, item in reversed(value.items()):
                if SURROGATE.search(key):
                    return f"a key of '{name}'" if name else "a key"
                stack.append((f"{name}.{key}" if name else key, item))
        elif isinstance(value, list):
            stack.extend((f"{name}[{index}]", item) for index, item in reversed(list(enumerate(value))))
    return None


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
        data, source, line, text = record.data, record.source, record.line, record.text
        in_array, duplicate_keys = record.in_array, record.duplicate_keys
    else:
        data, in_array, duplicate_keys, text = record, False, (), None
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
    tools = _parse_tools(data.get("tools"))
    return Conversation(
        messages,
        source,
        line,
        tools,
        in_array=in_array,
        duplicate_keys=duplicate_keys,
        variables=_variables(data),
        surrogates_checked=isinstance(record, RawRecord),
        source_text=text,
    )


def _variables(data: dict[str, Any]) -> dict[str, Any]:
    """Per-record template variables: `chat_template_kwargs` (vLLM's name) and the keys of
    TEMPLATE_VARIABLES given at the top level."""
    variables = data.get("chat_template_kwargs") or {}
    if not isinstance(variables, dict):
        raise wrong_type("'chat_template_kwargs'", "an object", variables)
    return {**variables, **{key: data[key] for key in TEMPLATE_VARIABLES if data.get(key) is not None}}


def _parse_chat(data: dict[str, Any]) -> list[Message]:
    """messages and sharegpt: a message list under "messages" or "conversations", each message
    {"role", "content"} or {"from", "value"}; a top-level "system" string becomes the first message."""
    key = "messages" if "messages" in data else "conversations"
    turns = require(data, key, list)
    return _system_message(data) + parse_messages(turns, key)


def _parse_alpaca(data: dict[str, Any]) -> list[Message]:
    instruction = require(data, "instruction", str)
    extra_input = data.get("input")
    if extra_input is not None and not isinstance(extra_input, str):
        raise wrong_type("'input'", "a string", extra_input)
    prompt = instruction + "\n\n" + extra_input if extra_input else instruction
    messages = _system_message(data)
    history = data.get("history") or []
    if not isinstance(history, list):
        raise wrong_type("'history'", "a list of [user, assistant] pairs", history)
    for number, pair in enumerate(history, start=1):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(text, str) for text in pair)):
            raise wrong_type(f"'history' item {number}", "a [user, assistant] pair of strings", pair)
        messages += [Message("user", pair[0]), Message("assistant", pair[1])]
    return messages + [Message("user", prompt), Message("assistant", require(data, "output", str))]


def _parse_prompt_completion(data: dict[str, Any]) -> list[Message]:
    messages = []
    for key, role in (("prompt", "user"), ("completion", "assistant")):
        value = require(data, key, (str, list))
        messages += [Message(role, value)] if isinstance(value, str) else parse_messages(value, key)
    return messages


_PARSERS = {
    "messages": _parse_chat,
    "sharegpt": _parse_chat,
    "alpaca": _parse_alpaca,
    "prompt_completion": _parse_prompt_completion,
}


def _system_message(data: dict[str, Any]) -> list[Message]:
    """A top-level "system" string as a leading message; absent, null or "" means none."""
    system = data.get("system")
    if system is not None and not isinstance(system, str):
        raise wrong_type("'system'", "a string", system)
    return [Message("system", system)] if system else []


def _parse_tools(tools: Any) -> list[Any] | None:
    """Tool schemas for templates: a list of objects, or a JSON string of one; absent, null, "" → None."""
    if tools is None or tools == "":
        return None
    if isinstance(tools, str):
        try:
            tools = json_loads(tools)
        except (ValueError, RecursionError) as error:
            raise ProtocolError(
                "invalid_tools", f"'tools' is a string but not valid JSON ({error})"
            ) from None
    if not (isinstance(tools, list) and all(isinstance(tool, dict) for tool in tools)):
        raise ProtocolError("invalid_tools", "'tools' must be a list of objects (or a JSON string of one)")
    return tools
