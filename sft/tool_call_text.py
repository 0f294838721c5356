"""Tool calls written in generated text, read back as `{"name": str, "arguments": dict}` (pure Python, no
torch): the one reader behind sft-eval's tool-call scores and sft-chat's reply history.

A builtin template's calls are read in its own pattern only (`BuiltinTemplate.tool_call`: chatml and
microlm `<tool_call>{json}</tool_call>`, llama3 a bare `{"name": …, "parameters": {…}}` object). For a Jinja
template, or none, every common format is read:
- `<tool_call>` blocks holding a JSON call (Hermes, Qwen2.5, Qwen3), `<function=NAME><parameter=KEY>value
  </parameter></function>` (Qwen3.5, Qwen3-Coder, Nemotron 3) or `NAME<arg_key>KEY</arg_key><arg_value>
  value</arg_value>` (GLM-4.5);
- GPT-OSS messages to `functions.NAME`, their text the arguments;
- Mistral's `[TOOL_CALLS]` followed by a JSON list of calls, or by `NAME[ARGS]{json}`;
- Llama 3.1's `<|python_tag|>` followed by a JSON call or a builtin tool's `NAME.call(key="value")`;
- Gemma 4's `<|tool_call>call:NAME{key:value,…}<tool_call|>` (bare keys, strings between `<|"|>`);
- DeepSeek-V3/R1's `<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME` then the arguments in a ```json fence,
  and V3.1's `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{json}`, each closed by `<｜tool▁call▁end｜>`;
- LFM2's `<|tool_call_start|>[NAME(key='value', …), …]<|tool_call_end|>` (Python literals);
- Muse Glimmer's `<atem:invoke name="NAME"><atem:parameter name="KEY">value</atem:parameter>…</atem:invoke>`;
- bare JSON objects with a name and arguments/parameters (Llama 3.1/3.2's custom tools).

A call's text that does not parse is still found (as None), so that a score can count it as broken.
The XML formats (`<parameter=…>`, `<arg_value>`, `<atem:parameter>`) write a string argument as it is and
any other value as JSON, so `2` is the string "2" or the number 2 alike: such a call keeps each argument's
text as written (`FoundCall.written`) for scores to compare as the template writes values, and its
arguments read as JSON where they parse.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from sft.protocol.templates.builtin import BuiltinTemplate

Call = dict[str, Any]
JSON_DECODER = json.JSONDecoder()

# One GPT-OSS message: its header (channel, recipient), then its text up to the marker that closes it
# (none for the last one: generation stopped at <|return|> or <|call|>, which are not part of the reply).
CHANNEL_MESSAGE = re.compile(r"(?P<header>.*?)<\|message\|>(?P<text>.*?)(?:<\|end\|><\|start\|>|\Z)", re.S)
CHANNEL = re.compile(r"<\|channel\|>\s*(\w+)")
RECIPIENT = re.compile(r"\bto=functions\.([^\s<]+)")
TAGGED_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
XML_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*)</function>\s*\Z", re.S)
XML_PARAMETER = re.compile(r"\s*<parameter=([^>\n]+)>\n?((?:(?!<parameter=).)*?)\n?</parameter>", re.S)
GLM_CALL = re.compile(r"([^\s<]+)\s*(.*)\Z", re.S)
GLM_ARGUMENT = re.compile(r"<arg_key>([^<]*)</arg_key>\s*<arg_value>((?:(?!<arg_key>).)*?)</arg_value>", re.S)
MISTRAL_CALLS = "[TOOL_CALLS]"
MISTRAL_NAMED_CALL = re.compile(r"\s*([^\s\[]+)(?:\[CALL_ID\][^\[]*)?\[ARGS\]")
PYTHON_TAG = "<|python_tag|>"
GEMMA_CALL = re.compile(r"<\|tool_call>call:([^{\s]+)(.*?)<tool_call\|>", re.S)
GEMMA_STRING = '<|"|>'
GEMMA_KEY = re.compile(r"([{,]\s*)([^\s:{},\[\]\"]+)\s*:")
# One DeepSeek call, with the list's markers next to it; one not closed runs to the next call or the end.
DEEPSEEK_CALL = re.compile(
    r"(?:<｜tool▁calls▁begin｜>\s*)?<｜tool▁call▁begin｜>(?P<body>(?:(?!<｜tool▁call▁begin｜>).)*?)"
    r"(?:(?P<closed><｜tool▁call▁end｜>)(?:\s*<｜tool▁calls▁end｜>)?|(?=<｜tool▁call▁begin｜>)|\Z)",
    re.S,
)
DEEPSEEK_SEP = "<｜tool▁sep｜>"
DEEPSEEK_FENCED = re.compile(r"\s*([^\s`]+)\s*```(?:json)?\s*(.*?)\s*```\s*\Z", re.S)
LFM_CALLS = re.compile(r"<\|tool_call_start\|>(.*?)(?:<\|tool_call_end\|>|\Z)", re.S)
ATEM_CALL = re.compile(  # one invoke, with the message header and function_calls markers next to it
    r"(?:(?:<\|start\|>assistant)?\s*to=\S+?<\|message\|>)?(?:<atem:function_calls>\s*)?"
    r'<atem:invoke name="([^"]*)">(.*?)'
    r"(?:(?P<closed></atem:invoke>)(?:\s*</atem:function_calls>(?:<\|eom\|>)?)?|\Z)",
    re.S,
)
ATEM_PARAMETER = re.compile(
    r'\s*<atem:parameter name="([^"]*)">((?:(?!<atem:parameter ).)*?)</atem:parameter>', re.S
)
JSON_NAMES = {"true": True, "false": False, "null": None}  # what tojson writes inside a Python literal
LITERAL_REFUSALS = (SyntaxError, ValueError, TypeError, MemoryError, RecursionError)  # ast's, literal_eval's
BARE_CALL_START = re.compile(r'\{\s*"name"\s*:')


@dataclass(frozen=True, slots=True)
class FoundCall:
    """A call's text at `text[start:end]`, read as a call (None: it does not parse); `written`: each
    argument's text, for the formats that write strings as they are and other values as JSON."""

    start: int
    end: int
    call: Call | None
    written: Mapping[str, str] | None = None


class ChannelMessage(NamedTuple):
    start: int
    channel: str
    function: str | None  # the function it calls (`to=functions.NAME`), or None
    text: str


def tool_call(value: Any) -> Call | None:
    """A call as {"name": str, "arguments": dict}, or None when `value` is not one. Reads OpenAI's shapes
    (arguments an object or a JSON string of one, `parameters` for Llama, optionally wrapped as
    `{"type": "function", "function": {...}}`) and a structured call (the protocol's ToolCall)."""
    if not isinstance(value, Mapping) and hasattr(value, "name") and hasattr(value, "arguments"):
        value = {"name": value.name, "arguments": value.arguments}
    if (
        isinstance(value, Mapping)
        and value.get("type") == "function"
        and isinstance(value.get("function"), Mapping)
    ):
        value = value["function"]
    if not isinstance(value, Mapping) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    return {"name": value["name"], "arguments": dict(arguments)} if isinstance(arguments, Mapping) else None


def channel_messages(reply: str) -> Iterator[ChannelMessage]:
    """Each GPT-OSS message of a reply."""
    for found in CHANNEL_MESSAGE.finditer(reply):
        channel, recipient = CHANNEL.search(found.group("header")), RECIPIENT.search(found.group("header"))
        yield ChannelMessage(
            found.start(),
            channel.group(1) if channel else "final",
            recipient.group(1) if recipient else None,
            found.group("text"),
        )


def channel_call(message: ChannelMessage) -> Call | None:
    """A GPT-OSS message to a function as a call (its text the JSON arguments)."""
    return tool_call({"name": message.function, "arguments": message.text})


def find_tool_calls(text: str, template: Any = None) -> list[FoundCall]:
    """Every call in `text`, in order: in a builtin template's own pattern, else in every common format
    (see the module docstring)."""
    if isinstance(template, BuiltinTemplate):
        return _pattern_calls(text, template.tool_call)
    found = _tagged_calls(text, "<tool_call>", "</tool_call>", _tagged_body)
    found += _channel_calls(text) + _mistral_calls(text) + _python_tag_calls(text) + _gemma_calls(text)
    found += _deepseek_calls(text) + _lfm_calls(text) + _atem_calls(text)
    kept: list[FoundCall] = []
    for call in sorted(found, key=lambda call: call.start):
        # A format inside another's call is that call's text; the calls of one list share its span.
        if not kept or call.start >= kept[-1].end or call.start == kept[-1].start:
            kept.append(call)
    return sorted(kept + _bare_json_calls(text, kept), key=lambda call: call.start)


def _pattern_calls(text: str, pattern: str) -> list[FoundCall]:
    """Calls in a builtin's pattern `OPEN{"name": "{name}", "…": {arguments}}CLOSE`: the JSON object
    between the markers (whitespace around it free), or bare JSON objects when there are none."""
    opening, closing = pattern[: pattern.index("{")].strip(), pattern[pattern.rindex("}") + 1 :].strip()
    if opening:
        return _tagged_calls(text, opening, closing, _json_call)
    return _bare_json_calls(text, [])


def _tagged_calls(
    text: str, opening: str, closing: str, read: Callable[[str], Call | None | Written]
) -> list[FoundCall]:
    blocks = re.finditer(re.escape(opening) + r"\s*(.*?)\s*" + re.escape(closing), text, re.S)
    return [_found(block.start(), block.end(), read(block.group(1))) for block in blocks]


class Written(NamedTuple):
    """A call in a format that writes its arguments as text, and those texts."""

    name: str
    texts: dict[str, str]


def _found(start: int, end: int, read: Call | None | Written) -> FoundCall:
    if isinstance(read, Written):
        call = {
            "name": read.name,
            "arguments": {key: _written_value(text) for key, text in read.texts.items()},
        }
        return FoundCall(start, end, call, read.texts)
    return FoundCall(start, end, read)


def _json_call(body: str) -> Call | None:
    try:
        return tool_call(json.loads(body))
    except ValueError:
        return None


def _tagged_body(body: str) -> Call | None | Written:
    """A `<tool_call>` block's body: JSON, Qwen3.5's `<function=…>` XML or GLM's `NAME<arg_key>…`."""
    if body.startswith("{"):
        return _json_call(body)
    if function := XML_FUNCTION.match(body):
        return _written(function.group(1), function.group(2), XML_PARAMETER)
    if glm := GLM_CALL.match(body):
        return _written(glm.group(1), glm.group(2), GLM_ARGUMENT)
    return None


def _written(name: str, body: str, argument: re.Pattern[str]) -> Written | None:
    """A call whose `body` is nothing but `argument` matches (key, text); None when other text is there."""
    if argument.sub("", body).strip():
        return None
    return Written(name, dict(argument.findall(body)))


def _written_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _channel_calls(text: str) -> list[FoundCall]:
    if "<|message|>" not in text:
        return []
    messages = list(channel_messages(text))
    ends = [message.start for message in messages[1:]] + [len(text)]
    return [
        FoundCall(message.start, end, channel_call(message))
        for message, end in zip(messages, ends, strict=True)
        if message.function
    ]


def _mistral_calls(text: str) -> list[FoundCall]:
    """`[TOOL_CALLS]` then a JSON list of calls (each found with the list's span), or `NAME[ARGS]{json}`
    (Mistral Small 3.2, Magistral), one call each."""
    found, start = [], text.find(MISTRAL_CALLS)
    while start != -1:
        position = start + len(MISTRAL_CALLS)
        named = MISTRAL_NAMED_CALL.match(text, position)
        value, end = _json_at(text, named.end() if named else position)
        if named and end:
            found.append(FoundCall(start, end, tool_call({"name": named.group(1), "arguments": value})))
        elif isinstance(value, list) and value and not named:
            found += [FoundCall(start, end, tool_call(item)) for item in value]
        else:  # a broken call: its text runs to the next [TOOL_CALLS] or the end
            end = text.find(MISTRAL_CALLS, position) % (len(text) + 1)
            found.append(FoundCall(start, end, None))
        start = text.find(MISTRAL_CALLS, end)
    return found


def _python_tag_calls(text: str) -> list[FoundCall]:
    """`<|python_tag|>` then a JSON call, or a builtin tool's `NAME.call(key="value", …)` to the next tag or
    the end."""
    pieces = text.split(PYTHON_TAG)
    found, start = [], len(pieces[0])
    for piece in pieces[1:]:
        end = start + len(PYTHON_TAG) + len(piece)
        value, _ = _json_at(piece, 0)
        call = tool_call(value) if value is not None else _python_call(piece.strip())
        found.append(FoundCall(start, end, call))
        start = end
    return found


def _python_call(source: str) -> Call | None:
    try:
        return _call_node(ast.parse(source, mode="eval").body, method="call")
    except LITERAL_REFUSALS:
        return None


def _call_node(node: ast.expr, method: str | None = None) -> Call | None:
    """`NAME(key=literal, …)` (or `NAME.method(…)`) as a call; JSON's true/false/null read as literals
    too, as LFM2 writes an object argument as JSON. Raises what literal_eval raises on other values."""
    if not isinstance(node, ast.Call) or node.args:
        return None
    function = node.func
    if method is not None:
        is_method = isinstance(function, ast.Attribute) and function.attr == method
        function = function.value if is_method else None
    if not isinstance(function, ast.Name):
        return None
    arguments = {k.arg: ast.literal_eval(JsonNames().visit(k.value)) for k in node.keywords if k.arg}
    return {"name": function.id, "arguments": arguments}


class JsonNames(ast.NodeTransformer):
    """JSON's true/false/null as the constants they name."""

    def visit_Name(self, node: ast.Name) -> ast.expr:
        return ast.Constant(JSON_NAMES[node.id]) if node.id in JSON_NAMES else node


def _gemma_calls(text: str) -> list[FoundCall]:
    """Gemma 4's calls: the arguments become JSON once each `<|"|>…<|"|>` string is a JSON string and each
    bare key is quoted."""
    found = []
    for block in GEMMA_CALL.finditer(text):
        pieces = block.group(2).split(GEMMA_STRING)  # outside, inside, outside, … a string
        arguments = "".join(
            json.dumps(piece) if index % 2 else GEMMA_KEY.sub(r'\1"\2":', piece)
            for index, piece in enumerate(pieces)
        )
        closed = len(pieces) % 2 == 1
        call = (
            _json_call(f'{{"name": {json.dumps(block.group(1))}, "arguments": {arguments}}}')
            if closed
            else None
        )
        found.append(FoundCall(block.start(), block.end(), call))
    return found


def _deepseek_calls(text: str) -> list[FoundCall]:
    """DeepSeek's calls: `TYPE<｜tool▁sep｜>NAME` and a fenced JSON object (V3, R1), or
    `NAME<｜tool▁sep｜>{json}` (V3.1); a call without its end marker is broken."""
    found = []
    for block in DEEPSEEK_CALL.finditer(text):
        head, separator, tail = block.group("body").partition(DEEPSEEK_SEP)
        call = None
        if separator and block.group("closed"):
            fenced = DEEPSEEK_FENCED.match(tail)
            name, arguments = fenced.groups() if fenced else (head.strip(), tail.strip())
            call = tool_call({"name": name, "arguments": arguments})
        found.append(FoundCall(block.start(), block.end(), call))
    return found


def _lfm_calls(text: str) -> list[FoundCall]:
    """LFM2's `<|tool_call_start|>[NAME(key=value, …), …]<|tool_call_end|>`: the list's calls share its
    span; a list that does not parse (or is not closed) is one broken call."""
    found = []
    for block in LFM_CALLS.finditer(text):
        calls: list[Call | None] = [None]
        if block.group().endswith("<|tool_call_end|>"):
            try:
                listed = ast.parse(block.group(1).strip(), mode="eval").body
                if isinstance(listed, ast.List) and listed.elts:
                    calls = [_call_node(node) for node in listed.elts]
            except LITERAL_REFUSALS:
                pass
        found += [FoundCall(block.start(), block.end(), call) for call in calls]
    return found


def _atem_calls(text: str) -> list[FoundCall]:
    """Muse Glimmer's `<atem:invoke name="NAME">` blocks of `<atem:parameter name="KEY">` texts."""
    return [
        _found(
            block.start(), block.end(), block.group("closed") and _written(*block.group(1, 2), ATEM_PARAMETER)
        )
        for block in ATEM_CALL.finditer(text)
    ]


def _bare_json_calls(text: str, taken: list[FoundCall]) -> list[FoundCall]:
    """JSON objects with a string name and arguments or parameters, outside the calls already `taken`; an
    object that opens with a name and does not parse is a broken call."""
    for call in taken:  # blank them out, keeping positions
        text = text[: call.start] + " " * (call.end - call.start) + text[call.end :]
    found, position = [], text.find("{")
    while position != -1:
        value, end = _json_at(text, position)
        if (
            isinstance(value, dict)
            and isinstance(value.get("name"), str)
            and ("arguments" in value or "parameters" in value)
        ):
            found.append(FoundCall(position, end, tool_call(value)))
        elif not end and BARE_CALL_START.match(text, position):
            found.append(FoundCall(position, position + 1, None))
        position = text.find("{", end or position + 1)
    return found


def _json_at(text: str, position: int) -> tuple[Any, int]:
    """(the JSON value at `position`, whitespace before it skipped, and where it ends), or (None, 0)."""
    start = len(text) - len(text[position:].lstrip())
    try:
        return JSON_DECODER.raw_decode(text, start)
    except ValueError:
        return None, 0
