"""One message of a record, in the schema of today's APIs: role, content (a string or parts), reasoning
(`reasoning_content`, `reasoning`, `thinking`), `tool_calls` (arguments an object or a JSON string of one,
stored as an object), a tool message's `tool_call_id` and `name`, and LLaMA-Factory's ShareGPT
`function_call` turns. Errors are ProtocolErrors naming the field; the caller adds the record's file:line.
"""

from __future__ import annotations

from typing import Any

from sft.protocol.types import Message, ProtocolError, ToolCall, json_loads

PART_TYPES = ("text", "reasoning", "tool_call")
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")  # the first present wins, as in transformers


def parse_messages(turns: list[Any], key: str) -> list[Message]:
    return [_parse_message(turn, f"'{key}' item {number}") for number, turn in enumerate(turns, start=1)]


def _parse_message(turn: Any, name: str) -> Message:
    if not isinstance(turn, dict):
        raise wrong_type(name, "an object", turn)
    if len(turn) == 2:  # most messages are a role and a string content: what the full parse would give
        role, content = (
            (turn["role"], turn.get("content")) if "role" in turn else (turn.get("from"), turn.get("value"))
        )
        if type(role) is str and type(content) is str and role != "function_call":
            return Message(role, content)
    role_key, content_key = ("role", "content") if "role" in turn else ("from", "value")
    role = require(turn, role_key, str, name)
    if role == "function_call":  # LLaMA-Factory's ShareGPT: the value holds the call(s) as JSON
        calls = _parse_call_json(require(turn, content_key, str, name), name)
        return Message("assistant", "", train=is_trained(turn, name), tool_calls=calls)
    content = turn.get(content_key)
    if content is not None or not (turn.get("tool_calls") or _reasoning(turn, name) is not None):
        require(turn, content_key, (str, list), name)  # null or absent only beside calls or reasoning
    text, part_reasoning, part_calls = _content_parts(content or "", name)
    reasoning = _reasoning(turn, name)
    if reasoning is not None and part_reasoning is not None:
        raise ProtocolError(
            "duplicate_reasoning", f"{name} has reasoning both as a field and as a content part"
        )
    return Message(
        role,
        text,
        train=is_trained(turn, name),
        reasoning=reasoning if reasoning is not None else part_reasoning,
        tool_calls=_parse_tool_calls(turn.get("tool_calls"), name) + part_calls,
        tool_call_id=_optional_string(turn, "tool_call_id", name),
        name=_optional_string(turn, "name", name),
    )


def _reasoning(turn: dict[str, Any], name: str) -> str | None:
    for key in REASONING_KEYS:
        if turn.get(key) is not None:
            return require(turn, key, str, name)
    return None


def _optional_string(turn: dict[str, Any], key: str, name: str) -> str | None:
    return None if turn.get(key) is None else require(turn, key, str, name)


def _content_parts(content: str | list[Any], name: str) -> tuple[str, str | None, tuple[ToolCall, ...]]:
    """(text, reasoning, calls) of a message's content: a string as is, or its parts: text parts joined
    in order, reasoning parts joined, `tool_call` parts as calls."""
    if isinstance(content, str):
        return content, None, ()
    texts, reasoning, calls = [], [], []
    for number, part in enumerate(content, start=1):
        part_name = f"{name} content part {number}"
        if not isinstance(part, dict):
            raise wrong_type(part_name, "an object", part)
        part_type = part.get("type")
        if part_type not in PART_TYPES:
            raise ProtocolError(
                "unknown_content_part",
                f"{part_name} has type {part_type!r}; known part types: {sorted(PART_TYPES)}",
            )
        value = require(part, "text" if "text" in part else "value", str, part_name)
        if part_type == "tool_call":
            calls += _parse_call_json(value, part_name)
        else:
            (texts if part_type == "text" else reasoning).append(value)
    return "".join(texts), "\n".join(reasoning) if reasoning else None, tuple(calls)


def _parse_call_json(value: str, name: str) -> tuple[ToolCall, ...]:
    """`{"name", "arguments"}` JSON, or a list of such objects (LLaMA-Factory's function_call value)."""
    try:
        parsed = json_loads(value)
    except (ValueError, RecursionError) as error:
        raise ProtocolError("invalid_tool_call", f"{name} is not JSON of a call ({error})") from None
    return _parse_tool_calls(parsed if isinstance(parsed, list) else [parsed], name)


def _parse_tool_calls(calls: Any, name: str) -> tuple[ToolCall, ...]:
    """OpenAI's `tool_calls` (`{"function": {"name", "arguments"}}`) or flat `{"name", "arguments"}`
    items; arguments an object, a JSON string of one, or absent (no arguments)."""
    if calls is None:
        return ()
    if not isinstance(calls, list):
        raise wrong_type(f"{name} 'tool_calls'", "a list", calls)
    parsed = []
    for number, call in enumerate(calls, start=1):
        call_name = f"{name} tool call {number}"
        if not isinstance(call, dict):
            raise wrong_type(call_name, "an object", call)
        function = call.get("function", call)
        if (
            not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
            or not function["name"]
        ):
            raise ProtocolError("invalid_tool_call", f"{call_name} has no function name")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json_loads(arguments) if arguments.strip() else {}
            except (ValueError, RecursionError) as error:
                raise ProtocolError(
                    "invalid_tool_call", f"{call_name} ({function['name']}): arguments are not JSON ({error})"
                ) from None
        if not isinstance(arguments, dict):
            raise ProtocolError(
                "invalid_tool_call",
                f"{call_name} ({function['name']}): arguments must be a JSON object, got "
                f"{type(arguments).__name__}",
            )
        call_id = call.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise wrong_type(f"{call_name} 'id'", "a string", call_id)
        parsed.append(ToolCall(function["name"], arguments, call_id))
    return tuple(parsed)


def is_trained(turn: dict[str, Any], name: str) -> bool:
    train = turn.get("train", True)
    if not isinstance(train, bool):
        raise wrong_type(f"{name} 'train'", "true or false", train)
    weight = turn.get("weight", 1)
    if weight not in (0, 1):
        raise ProtocolError("invalid_weight", f"{name} has weight {weight!r}; only 0 and 1 are supported")
    return train and weight == 1


def require(data: dict[str, Any], key: str, kind: type | tuple[type, ...], name: str = "record") -> Any:
    if key not in data:
        raise ProtocolError("missing_field", f"{name} has no {key!r} (keys: {sorted(data)[:20]})")
    value = data[key]
    if not isinstance(value, kind):
        expected = " or ".join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))
        raise wrong_type(f"{name} {key!r}", expected, value)
    return value


def wrong_type(name: str, expected: str, value: Any) -> ProtocolError:
    return ProtocolError("wrong_type", f"{name} must be {expected}, got {type(value).__name__}")
