"""Reading files into records and records into conversations: every format, every bad-input kind."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sft.protocol.messages import parse_messages
from sft.protocol.records import (
    BLANK_LINE,
    RawRecord,
    detect_format,
    iter_raw_records,
    record_to_conversation,
)
from sft.protocol.types import ProtocolError, ToolCall


def roles_and_contents(conversation):
    return [(message.role, message.content) for message in conversation.messages]


def parse_error(record, **kwargs) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        record_to_conversation(record, **kwargs)
    return caught.value


def write_jsonl(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


# --- formats -------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["messages", "conversations"])
def test_messages_with_string_content(key):
    record = {key: [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    assert detect_format(record) == "messages"
    assert roles_and_contents(record_to_conversation(record)) == [("user", "hi"), ("assistant", "hello")]


def test_text_parts_are_joined_in_order_with_either_key():
    content = [{"type": "text", "text": "a "}, {"type": "text", "value": "b"}, {"type": "text", "text": ""}]
    record = {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "x"}]}
    assert record_to_conversation(record).messages[0].content == "a b"


def test_reasoning_and_tool_call_parts():
    content = [
        {"type": "reasoning", "value": "think"},
        {"type": "text", "value": "Calling."},
        {"type": "tool_call", "value": '{"name": "f"}'},
        {"type": "tool_call", "value": '{"name": "g", "arguments": {"x": 1}}'},
    ]
    record = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": content}]}
    message = record_to_conversation(record).messages[1]
    assert (message.content, message.reasoning) == ("Calling.", "think")
    assert message.tool_calls == (ToolCall("f", {}), ToolCall("g", {"x": 1}))


def test_the_schema_of_todays_apis():
    record = {
        "messages": [
            {"role": "user", "content": "Weather in Bern?"},
            {
                "role": "assistant",
                "content": None,
                "reasoning_content": "Call the tool.",
                "tool_calls": [
                    {
                        "type": "function",
                        "id": "c1",
                        "function": {"name": "weather", "arguments": '{"city": "Bern"}'},
                    },
                    {"type": "function", "function": {"name": "time", "arguments": {"tz": "CET"}}},
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "name": "weather", "content": "21 C"},
            {"role": "assistant", "thinking": "Answer.", "content": "21 °C."},
            {"role": "assistant", "reasoning": "Alias.", "content": "x"},
        ],
        "tools": [{"type": "function", "function": {"name": "weather"}}],
        "enable_thinking": False,
        "chat_template_kwargs": {"reasoning_effort": "low"},
    }
    conversation = record_to_conversation(record)
    calling, result, answer, aliased = conversation.messages[1:]
    assert (calling.content, calling.reasoning) == ("", "Call the tool.")
    assert calling.tool_calls == (
        ToolCall("weather", {"city": "Bern"}, "c1"),
        ToolCall("time", {"tz": "CET"}),
    )
    assert (result.role, result.tool_call_id, result.name) == ("tool", "c1", "weather")
    assert (answer.reasoning, aliased.reasoning) == ("Answer.", "Alias.")
    assert conversation.variables == {"enable_thinking": False, "reasoning_effort": "low"}


def test_sharegpt_function_call_and_observation_turns():
    record = {
        "conversations": [
            {"from": "human", "value": "Invoice?"},
            {"from": "function_call", "value": '{"name": "invoice", "arguments": {"items": [1, 2]}}'},
            {"from": "observation", "value": '{"id": "INV1"}'},
            {"from": "gpt", "value": "Done."},
        ],
        "tools": '[{"name": "invoice"}]',
    }
    conversation = record_to_conversation(record)
    call = conversation.messages[1]
    assert (call.role, call.content, call.tool_calls) == (
        "assistant",
        "",
        (ToolCall("invoice", {"items": [1, 2]}),),
    )
    assert [m.role for m in conversation.messages] == ["human", "assistant", "observation", "gpt"]
    assert conversation.tools == [{"name": "invoice"}]


@pytest.mark.parametrize(
    ("message", "found"),
    [
        ({"tool_calls": [{"function": {"name": "f", "arguments": "{not json"}}]}, "arguments are not JSON"),
        ({"tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}, "must be a JSON object"),
        ({"tool_calls": [{"type": "function", "function": {"arguments": "{}"}}]}, "has no function name"),
        ({"tool_calls": {"name": "f"}}, "must be a list"),
        ({"content": [{"type": "tool_call", "value": "f(x)"}]}, "is not JSON of a call"),
    ],
)
def test_bad_tool_calls_are_per_record_errors(message, found):
    record = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", **message}]}
    error = parse_error(record)
    assert error.reason in ("invalid_tool_call", "wrong_type") and found in str(error)


def test_sharegpt_with_top_level_system_and_raw_roles():
    record = {
        "system": "Be brief.",
        "conversations": [
            {"from": "human", "value": "q"},
            {"from": "function_call", "value": '{"name": "f"}'},
            {"from": "observation", "value": "r"},
            {"from": "gpt", "value": "a"},
        ],
    }
    assert detect_format(record) == "sharegpt"
    assert roles_and_contents(record_to_conversation(record)) == [
        ("system", "Be brief."),
        ("human", "q"),
        ("assistant", ""),  # the call, as a structured tool call
        ("observation", "r"),
        ("gpt", "a"),
    ]


def test_empty_top_level_system_adds_nothing():
    record = {"system": "", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    assert [message.role for message in record_to_conversation(record).messages] == ["human", "gpt"]


def test_alpaca_with_input_history_and_system():
    record = {
        "system": "S",
        "history": [["u1", "a1"], ["u2", "a2"]],
        "instruction": "Do it",
        "input": "with this",
        "output": "done",
    }
    assert detect_format(record) == "alpaca"
    assert roles_and_contents(record_to_conversation(record)) == [
        ("system", "S"),
        ("user", "u1"),
        ("assistant", "a1"),
        ("user", "u2"),
        ("assistant", "a2"),
        ("user", "Do it\n\nwith this"),
        ("assistant", "done"),
    ]


@pytest.mark.parametrize("extra", [{}, {"input": ""}, {"input": None}])
def test_alpaca_without_input(extra):
    record = {"instruction": "Do it", "output": "done", **extra}
    assert roles_and_contents(record_to_conversation(record)) == [("user", "Do it"), ("assistant", "done")]


def test_prompt_completion_strings():
    record = {"prompt": "2+2?", "completion": "4"}
    assert detect_format(record) == "prompt_completion"
    assert roles_and_contents(record_to_conversation(record)) == [("user", "2+2?"), ("assistant", "4")]


def test_prompt_completion_message_lists():
    record = {
        "prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}],
        "completion": [{"role": "assistant", "content": "a"}],
    }
    assert roles_and_contents(record_to_conversation(record)) == [
        ("system", "S"),
        ("user", "q"),
        ("assistant", "a"),
    ]


def test_train_false_and_weight_zero_exclude_a_message():
    record = {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a", "train": False},
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "b", "weight": 0},
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "c", "weight": 1},
        ]
    }
    assert [message.train for message in record_to_conversation(record).messages[1::2]] == [
        False,
        False,
        True,
    ]


def test_forced_format_overrides_detection():
    record = {"prompt": "p", "completion": "c", "instruction": "i", "output": "o"}
    assert record_to_conversation(record, fmt="alpaca").messages[0].content == "i"
    assert record_to_conversation(record).messages[0].content == "p"


def test_unknown_fmt_is_a_config_error():
    with pytest.raises(ValueError, match="'auto' or one of"):
        record_to_conversation({"prompt": "p", "completion": "c"}, fmt="chatml")


# --- tools ---------------------------------------------------------------------------------------

TOOLS = [{"name": "f", "parameters": {"type": "object"}}]
CHAT = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]


@pytest.mark.parametrize("tools", [TOOLS, json.dumps(TOOLS)])
def test_tools_as_list_or_json_string(tools):
    assert record_to_conversation({"conversations": CHAT, "tools": tools}).tools == TOOLS


@pytest.mark.parametrize("tools", [None, ""])
def test_absent_tools(tools):
    assert record_to_conversation({"conversations": CHAT, "tools": tools}).tools is None


@pytest.mark.parametrize("tools", ["[{not json", '{"name": "f"}', [1, 2], 7])
def test_invalid_tools(tools):
    error = parse_error({"conversations": CHAT, "tools": tools})
    assert error.reason == "invalid_tools" and "'tools'" in str(error)


# --- bad records ---------------------------------------------------------------------------------


def test_unknown_format_lists_keys_and_formats():
    error = parse_error({"question": "q", "answer": "a"})
    assert error.reason == "unknown_format"
    for expected in (
        "answer",
        "question",
        "messages",
        "sharegpt",
        "alpaca",
        "prompt_completion",
    ):
        assert expected in str(error)


@pytest.mark.parametrize(
    ("record", "named"),
    [
        ({"messages": "hi"}, "'messages'"),
        ({"messages": ["hi"]}, "'messages' item 1"),
        ({"messages": [{"role": "user", "content": 5}]}, "'messages' item 1 'content'"),
        ({"messages": [{"role": "user", "content": None}]}, "'content'"),
        ({"messages": [{"role": 1, "content": "x"}]}, "'role'"),
        ({"messages": [{"role": "user", "content": ["x"]}]}, "content part 1"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]}, "'text'"),
        ({"messages": [{"role": "user", "content": "x", "train": "no"}]}, "'train'"),
        ({"instruction": "i", "output": ["o"]}, "'output'"),
        ({"instruction": "i", "output": "o", "input": 1}, "'input'"),
        ({"instruction": "i", "output": "o", "history": [["u"]]}, "'history' item 1"),
        ({"instruction": "i", "output": "o", "history": "u"}, "'history'"),
        ({"conversations": CHAT, "system": ["s"]}, "'system'"),
    ],
)
def test_wrong_type_names_the_field(record, named):
    error = parse_error(record)
    assert error.reason == "wrong_type" and named in str(error)


def test_missing_field():
    error = parse_error({"messages": [{"role": "user"}]})
    assert error.reason == "missing_field" and "'content'" in str(error)
    error = parse_error({"prompt": "p", "completion": "c"}, fmt="alpaca")
    assert error.reason == "missing_field" and "'instruction'" in str(error)


def test_unknown_content_part():
    record = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}
    error = parse_error(record)
    assert error.reason == "unknown_content_part"
    assert "'image_url'" in str(error) and "tool_call" in str(error)


def test_invalid_weight():
    error = parse_error({"messages": [{"role": "assistant", "content": "a", "weight": 0.5}]})
    assert error.reason == "invalid_weight" and "0.5" in str(error)


# --- reading files -------------------------------------------------------------------------------


def test_jsonl_records_carry_line_numbers_and_blank_lines_are_records_to_count(tmp_path):
    good = json.dumps({"prompt": "p", "completion": "c"}).encode()
    path = write_jsonl(tmp_path / "d.jsonl", [good, b"", b"  \t", good])
    records = list(iter_raw_records(path))
    assert [(record.source, record.line) for record in records] == [(str(path), n) for n in (1, 2, 3, 4)]
    assert [record.error.reason if record.error else None for record in records] == [
        None,
        BLANK_LINE,
        BLANK_LINE,
        None,
    ]
    conversation = record_to_conversation(records[3])
    assert (conversation.source, conversation.line, conversation.where) == (str(path), 4, f"{path}:4")


def test_invalid_json_line_is_an_error_record(tmp_path):
    good = json.dumps({"prompt": "p", "completion": "c"}).encode()
    path = write_jsonl(tmp_path / "d.jsonl", [good, b'{"prompt": "p",', good])
    records = list(iter_raw_records(path))
    assert [record.error is None for record in records] == [True, False, True]
    assert (records[1].where, records[1].error.reason) == (f"{path}:2", "invalid_json")
    assert records[1].data is None
    with pytest.raises(ProtocolError, match="invalid JSON"):
        record_to_conversation(records[1])


def test_invalid_utf8_line_does_not_kill_the_file(tmp_path):
    good = json.dumps({"prompt": "p", "completion": "ü"}, ensure_ascii=False).encode()
    path = write_jsonl(tmp_path / "d.jsonl", [good, b'{"prompt": "\xff\xfe", "completion": "c"}', good])
    records = list(iter_raw_records(path))
    assert (records[1].where, records[1].error.reason) == (f"{path}:2", "invalid_utf8")
    assert record_to_conversation(records[2]).messages[1].content == "ü"


@pytest.mark.parametrize("line", [b"[1, 2]", b'"text"', b"3", b"null"])
def test_non_object_line(tmp_path, line):
    (record,) = iter_raw_records(write_jsonl(tmp_path / "d.jsonl", [line]))
    assert record.line == 1 and record.error.reason == "not_an_object" and "JSON object" in str(record.error)


def test_deep_nesting_and_huge_numbers_do_not_raise(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [b"[" * 100_000, b"1" * 5000])
    assert [record.error.reason for record in iter_raw_records(path)] == ["invalid_json", "invalid_json"]


def test_bom_and_line_separators_inside_strings(tmp_path):
    content = "a\u2028b\u0085c\rd"  # characters str.splitlines would break on
    line = json.dumps({"prompt": "p", "completion": content}, ensure_ascii=False).encode()
    path = write_jsonl(tmp_path / "d.jsonl", [b"\xef\xbb\xbf" + line, line])
    records = list(iter_raw_records(path))
    assert [record_to_conversation(record).messages[1].content for record in records] == [content, content]


def test_jsonl_crlf_line_endings(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "p", "completion": "c"}\r\n{"prompt": "q", "completion": "d"}\r\n')
    assert [record.line for record in iter_raw_records(path) if record.error is None] == [1, 2]


def test_json_array_file_names_records_not_lines(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"prompt": "p", "completion": "c"}, 5, {"instruction": "i", "output": "o"}]))
    records = list(iter_raw_records(path))
    assert [record.line for record in records] == [1, 2, 3]
    assert (records[1].where, records[1].error.reason) == (f"{path} record 2", "not_an_object")
    assert record_to_conversation(records[2]).where == f"{path} record 3"


def test_a_truncated_json_array_keeps_its_whole_records_and_locates_the_cut(tmp_path):
    path = tmp_path / "d.json"
    whole = json.dumps([{"prompt": "p", "completion": "c"}] * 3, indent=1)
    for cut, where, kept in ((len(whole) - 20, "record 3", 2), (len(whole) - 2, "record 4", 3)):
        path.write_text(whole[:cut])
        records = list(iter_raw_records(path))
        assert [record.error is None for record in records] == [True] * kept + [False]
        assert records[-1].where == f"{path} {where}" and records[-1].error.reason == "invalid_json"
        assert "line " in str(records[-1].error)  # the message says where in the file it broke


@pytest.mark.parametrize("text", ["[]", " [ ] \n"])
def test_an_empty_json_array_has_no_records(tmp_path, text):
    path = tmp_path / "d.json"
    path.write_text(text)
    assert list(iter_raw_records(path)) == []


def test_text_after_a_json_array_is_an_error_record(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"prompt": "p", "completion": "c"}] x')
    records = list(iter_raw_records(path))
    assert records[0].error is None and (records[1].where, records[1].error.reason) == (
        f"{path} record 2",
        "invalid_json",
    )


def test_duplicate_keys_are_reported_at_any_depth(tmp_path):
    line = b'{"prompt": "p", "completion": "c", "prompt": "q"}'
    nested = b'{"messages": [{"role": "user", "content": "a", "content": "b"}]}'
    records = list(iter_raw_records(write_jsonl(tmp_path / "d.jsonl", [line, nested])))
    assert [record.duplicate_keys for record in records] == [("prompt",), ("content",)]
    assert record_to_conversation(records[0]).messages[0].content == "q"  # JSON's rule: the last wins
    assert record_to_conversation(records[0]).duplicate_keys == ("prompt",)


@pytest.mark.parametrize(
    ("line", "named"),
    [
        (b'{"prompt": "lone \\ud800", "completion": "c"}', "'prompt'"),
        (
            b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "\\uDC00"}]}',
            "'messages[1].content'",
        ),
        (b'{"prompt": "p", "completion": "c", "tools": [{"name": "\\udabc"}]}', "'tools[0].name'"),
        (b'{"prompt": "p", "completion": "c", "\\ud800": 1}', "a key"),
    ],
)
def test_a_lone_surrogate_anywhere_is_invalid_text(tmp_path, line, named):
    (record,) = iter_raw_records(write_jsonl(tmp_path / "d.jsonl", [line]))
    assert record.error.reason == "invalid_text" and named in str(record.error)
    path = tmp_path / "d.json"
    path.write_bytes(b"[" + line + b"]")
    (record,) = iter_raw_records(path)
    assert record.error.reason == "invalid_text"


def test_a_surrogate_pair_is_text(tmp_path):
    line = b'{"prompt": "\\ud83d\\ude00", "completion": "c"}'
    (record,) = iter_raw_records(write_jsonl(tmp_path / "d.jsonl", [line]))
    assert record_to_conversation(record).messages[0].content == "\U0001f600"


def test_json_file_with_one_object(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"prompt": "p", "completion": "c"}))
    (record,) = iter_raw_records(path)
    assert record == RawRecord(str(path), 1, data={"prompt": "p", "completion": "c"})


def test_invalid_json_file_is_one_error(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('{"prompt": "p", "completion": "c"}\n{"prompt": "q", "completion": "d"}\n')
    (record,) = iter_raw_records(path)
    assert record.line == 1 and record.error.reason == "invalid_json"
    assert record.where == f"{path}:1" and ".jsonl" in str(record.error) and "line 2" in str(record.error)


def test_json_file_with_a_scalar_or_bad_bytes(tmp_path):
    scalar, bad_bytes = tmp_path / "a.json", tmp_path / "b.json"
    scalar.write_text("42")
    bad_bytes.write_bytes(b'[{"prompt": "\xff"}]')
    assert [record.error.reason for record in iter_raw_records(scalar)] == ["not_an_object"]
    assert [record.error.reason for record in iter_raw_records(bad_bytes)] == ["invalid_utf8"]


# --- the plain-message fast path ---------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    keys=st.sampled_from([("role", "content"), ("from", "value"), ("role", "value"), ("from", "content")]),
    role=st.one_of(
        st.sampled_from(["user", "gpt", "function_call", "tool"]), st.text(), st.none(), st.integers()
    ),
    content=st.one_of(st.text(), st.none(), st.integers(), st.just([{"type": "text", "text": "x"}])),
)
def test_a_two_key_message_parses_as_the_full_parse_would(keys, role, content):
    """Most messages are a role and a string: they take a shortcut, which must give the Message (or the
    error) that the full parse gives; a third key that changes nothing ("train": true) forces the full
    parse."""

    def parse(turn):
        try:
            return parse_messages([turn], "messages")
        except ProtocolError as error:  # its message lists the keys, which differ by "train"
            return error.reason

    turn = {keys[0]: role, keys[1]: content}
    assert parse(turn) == parse({**turn, "train": True})


def test_conversations_read_from_files_are_marked_checked_for_surrogates(tmp_path):
    """The reader refuses lone surrogates, so normalize skips its search for records from a file; a
    conversation built in memory is searched (test_pipeline checks that it is refused)."""
    path = write_jsonl(
        tmp_path / "d.jsonl", [json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()]
    )
    (record,) = iter_raw_records(path)
    assert record_to_conversation(record).surrogates_checked
    assert not record_to_conversation(record.data).surrogates_checked


# ---- msgspec where it gives what the standard library gives ----------------------------------------------
KEYS = st.sampled_from(['"a"', '"b"', '"a:b"', '"\\u0061"', '"c\\u003a"', '"\\/"'])
JSON_STRINGS = st.sampled_from(['""', '":"', '"x: y"', '"\\u003A"', '"\\ud800"', '"é\\n"', '"\\\\"', '"\\/"'])
SCALARS = st.one_of(
    JSON_STRINGS,
    st.integers(-(2**70), 2**70).map(str),
    st.sampled_from(["1.5", "-0.0", "1e400", "0.1", "5e-324", "1.797e308", "NaN", "true", "null"]),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
)
JSON_TEXTS = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(lambda items: "[" + ", ".join(items) + "]"),
        st.lists(st.tuples(KEYS, inner), max_size=4).map(
            lambda pairs: "{" + ",".join(f"{key} :{value}" for key, value in pairs) + "}"
        ),
    ),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(JSON_TEXTS)
def test_json_in_a_record_parses_as_the_standard_library_parses_it(text):
    """Tool calls' arguments and tools given as JSON text: msgspec's value, or else the standard
    library's value or error (msgspec refuses NaN and lone surrogates)."""
    from sft.protocol.types import json_loads

    def outcome(loads):
        try:
            return json.dumps(loads(text))
        except ValueError as error:
            return type(error).__name__

    assert outcome(json_loads) == outcome(json.loads)
