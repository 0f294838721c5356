"""normalize_conversations: role aliases, validation reasons, merge, strip, content kept byte for byte."""

from __future__ import annotations

import copy
import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sft.protocol.normalize import ROLE_ALIASES, normalize_conversations
from sft.protocol.types import Conversation, Message, ProtocolConfig, ProtocolError, ToolCall


def conversation(*turns, tools=None) -> Conversation:
    """turns: (role, content) or (role, content, train)."""
    return Conversation([Message(*turn) for turn in turns], source="d.jsonl", line=5, tools=tools)


def roles(result: Conversation) -> list[str]:
    return [message.role for message in result.messages]


def normalize_error(conv, config=None, **kwargs) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        normalize_conversations(conv, config or ProtocolConfig(), **kwargs)
    return caught.value


@pytest.mark.parametrize(("alias", "role"), sorted(ROLE_ALIASES.items()))
def test_role_aliases(alias, role):
    turns = (
        [("assistant", "a")] * (role == "tool")
        + [(alias, "x")]
        + [("assistant", "a")] * (role != "assistant")
    )
    assert roles(normalize_conversations(conversation(*turns), ProtocolConfig()))[role == "tool"] == role


def test_sharegpt_tool_call_roles():
    conv = conversation(("human", "q"), ("function_call", "{}"), ("observation", "r"), ("gpt", "a"))
    assert roles(normalize_conversations(conv, ProtocolConfig())) == [
        "user",
        "assistant",
        "tool",
        "assistant",
    ]


def test_unknown_role_names_it_and_the_fix():
    error = normalize_error(conversation(("narrator", "x"), ("assistant", "a")))
    assert error.reason == "unknown_role"
    assert "'narrator'" in str(error) and "message 1" in str(error) and "protocol.role_map" in str(error)


def test_role_map_fixes_and_overrides():
    config = ProtocolConfig(role_map={"narrator": "user", "model": "user"})
    conv = conversation(("narrator", "x"), ("model", "y"), ("assistant", "a"))
    assert roles(normalize_conversations(conv, config)) == ["user", "user", "assistant"]


def test_role_map_to_an_unknown_role_is_a_config_error():
    with pytest.raises(ValueError, match="protocol.role_map") as caught:
        normalize_conversations(
            conversation(("user", "q"), ("assistant", "a")), ProtocolConfig(role_map={"x": "me"})
        )
    assert not isinstance(caught.value, ProtocolError)


def test_no_assistant_turn():
    error = normalize_error(conversation(("system", "s"), ("user", "q")))
    assert error.reason == "no_assistant_turn" and "assistant" in str(error)


def test_untrained_assistant_turns_are_still_valid():
    result = normalize_conversations(conversation(("user", "q"), ("assistant", "a", False)), ProtocolConfig())
    assert result.messages[1].train is False


def test_train_flag_only_kept_on_assistant():
    result = normalize_conversations(conversation(("user", "q", False), ("assistant", "a")), ProtocolConfig())
    assert result.messages[0].train is True


def test_empty_content():
    error = normalize_error(conversation(("user", "q"), ("assistant", "")))
    assert error.reason == "empty_content" and "message 2" in str(error) and "assistant" in str(error)


def test_non_string_content():
    error = normalize_error(conversation(("user", ["q"]), ("assistant", "a")))
    assert error.reason == "wrong_type" and "message 1" in str(error) and "list" in str(error)


def test_system_not_first():
    error = normalize_error(conversation(("user", "q"), ("system", "s"), ("assistant", "a")))
    assert error.reason == "system_not_first" and "message 2" in str(error)


def test_two_system_messages():
    error = normalize_error(conversation(("system", "s"), ("system", "t"), ("user", "q"), ("assistant", "a")))
    assert error.reason == "system_not_first"


@pytest.mark.parametrize(
    "turns",
    [
        [("assistant", "a"), ("user", "q")],
        [("system", "s"), ("user", "q"), ("user", "q"), ("assistant", "a")],
        [("user", "q"), ("assistant", "a"), ("tool", "r"), ("user", "q")],
    ],
)
def test_wrong_role_order_when_alternation_is_required(turns):
    conv = conversation(*turns)
    normalize_conversations(conv, ProtocolConfig())  # fine without alternation
    error = normalize_error(conv, requires_alternation=True)
    assert error.reason == "wrong_role_order" and "alternating" in str(error)


def test_alternation_allows_system_and_tool_turns_after_assistant():
    conv = conversation(
        ("system", "s"),
        ("user", "q"),
        ("function_call", "{}"),
        ("tool", "r1"),
        ("observation", "r2"),
        ("assistant", "a"),
        ("user", "q"),
        ("assistant", "a"),
    )
    assert len(normalize_conversations(conv, ProtocolConfig(), requires_alternation=True).messages) == 8


def test_merge_consecutive_joins_with_newline_and_ands_train():
    conv = conversation(
        ("human", "q1"),
        ("user", "q2"),
        ("gpt", "a1"),
        ("assistant", "a2", False),
        ("user", "q3"),
        ("gpt", "a3"),
    )
    result = normalize_conversations(conv, ProtocolConfig(merge_consecutive=True), requires_alternation=True)
    assert result.messages == [
        Message("user", "q1\nq2"),
        Message("assistant", "a1\na2", False),
        Message("user", "q3"),
        Message("assistant", "a3"),
    ]


def test_strip_content_strips_and_drops_empty_turns():
    conv = conversation(("user", "  q \n"), ("user", " \t"), ("assistant", "\na\n"), ("assistant", ""))
    result = normalize_conversations(conv, ProtocolConfig(strip_content=True))
    assert result.messages == [Message("user", "q"), Message("assistant", "a")]


def test_input_is_not_mutated_and_provenance_kept():
    conv = conversation(("human", "q"), ("human", "q"), ("gpt", "a"), tools=[{"name": "f"}])
    before = copy.deepcopy(conv)
    result = normalize_conversations(conv, ProtocolConfig(merge_consecutive=True))
    assert conv == before and result is not conv
    assert (result.source, result.line, result.tools) == ("d.jsonl", 5, [{"name": "f"}])
    assert result.tools is not conv.tools


@given(
    st.lists(st.text(min_size=1), min_size=1, max_size=6), st.text(alphabet=" \t\n\r\u00a0\u3000", min_size=1)
)
def test_content_passes_through_unchanged(contents, whitespace):
    turns = [Message(role, text) for text in contents for role in ("user", "assistant")]
    turns.append(Message("user", whitespace))  # whitespace-only content is kept as written
    result = normalize_conversations(Conversation(turns), ProtocolConfig())
    assert [message.content for message in result.messages] == [message.content for message in turns]


def test_tool_results_need_an_assistant_call_before_them():
    assert normalize_error(conversation(("user", "q"), ("tool", "r"), ("assistant", "a"))).reason == (
        "tool_without_call"
    )
    call = ToolCall("f", {}, id="c1")
    calling = Message("assistant", "", tool_calls=(call,))
    fine = Conversation(
        [Message("user", "q"), calling, Message("tool", "r", tool_call_id="c1"), Message("assistant", "a")]
    )
    assert roles(normalize_conversations(fine, ProtocolConfig())) == [
        "user",
        "assistant",
        "tool",
        "assistant",
    ]
    wrong_id = Conversation(
        [Message("user", "q"), calling, Message("tool", "r", tool_call_id="c9"), Message("assistant", "a")]
    )
    error = normalize_error(wrong_id)
    assert error.reason == "tool_without_call" and "'c9'" in str(error) and "message 3" in str(error)


def test_reasoning_and_calls_belong_to_assistants_and_allow_empty_content():
    misplaced = Conversation([Message("user", "q", reasoning="r"), Message("assistant", "a")])
    assert normalize_error(misplaced).reason == "misplaced_field"
    only_reasoning = Conversation([Message("user", "q"), Message("assistant", "", reasoning="r")])
    assert normalize_conversations(only_reasoning, ProtocolConfig()).messages[1].reasoning == "r"


def test_merge_consecutive_joins_an_assistants_calls_and_keeps_tool_results_apart():
    calls = [ToolCall("f", {"a": 1}), ToolCall("g", {})]
    conv = Conversation(
        [
            Message("user", "q"),
            Message("assistant", "", reasoning="r1", tool_calls=(calls[0],)),
            Message("assistant", "", tool_calls=(calls[1],)),
            Message("tool", "x"),
            Message("tool", "y"),
            Message("assistant", "a"),
        ]
    )
    merged = normalize_conversations(conv, ProtocolConfig(merge_consecutive=True))
    assert roles(merged) == ["user", "assistant", "tool", "tool", "assistant"]
    assert merged.messages[1].tool_calls == tuple(calls) and merged.messages[1].reasoning == "r1"


@pytest.mark.parametrize(
    ("messages", "reason", "named"),
    [
        (
            [Message("user", "u"), Message("assistant", "", tool_calls=(ToolCall("f", {"q": "\ud800"}),))],
            "invalid_text",
            "message 2",
        ),
        ([Message("user", "\udc00"), Message("assistant", ["not text"])], "invalid_text", "message 1"),
        ([Message("user", ["not text"]), Message("assistant", "\ud800")], "wrong_type", "message 1"),
    ],
)
def test_the_first_bad_message_is_named_whatever_the_later_ones_hold(messages, reason, named):
    """One search over every string finds a lone surrogate; then each message is checked in order."""
    error = normalize_error(Conversation(messages))
    assert error.reason == reason and str(error).startswith(named + " ")


def test_normalizing_a_message_keeps_every_field_it_does_not_set():
    """A distinct value in every field of Message, so that a field added later is checked too."""
    from sft.protocol.normalize import _with_role

    values = {"role": "gpt", "content": "c", "train": False, "tool_calls": (ToolCall("f", {}),)}
    message = Message(
        **{f.name: values.get(f.name, f"value of {f.name}") for f in dataclasses.fields(Message)}
    )
    assert _with_role(message, "assistant", "d", True) == dataclasses.replace(
        message, role="assistant", content="d", train=True
    )


def test_normalizing_a_conversation_keeps_every_field_it_does_not_set():
    """A distinct value in every field of Conversation, so that a field added later is checked too."""
    values = {
        "messages": [Message("user", "q"), Message("assistant", "a")],
        "line": 7,
        "tools": [{"name": "f"}],
        "in_array": True,
        "duplicate_keys": ("k",),
        "variables": {"enable_thinking": True},
        "surrogates_checked": True,
    }
    conversation = Conversation(
        **{f.name: values.get(f.name, f"value of {f.name}") for f in dataclasses.fields(Conversation)}
    )
    assert normalize_conversations(conversation, ProtocolConfig()) == conversation
