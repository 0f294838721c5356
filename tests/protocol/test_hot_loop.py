"""The hot loop's shortcuts: the one-search control-token scan finds what the per-string check finds;
chunks start small."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sft.protocol import pipeline
from sft.protocol.control_tokens import ControlTokenScan, data_strings, literal_pattern
from sft.protocol.pipeline import Accounting, ConversationEncoder, read_conversations
from sft.protocol.templates import BUILTINS
from sft.protocol.types import Conversation, Message, ProtocolConfig, ToolCall

CHATML = {"<|im_start|>", "<|im_end|>"}
PIECES = [
    "a",
    " ",
    "\n",
    '"',
    "\\",
    "<|im_",
    "end|>",
    "<|im_end|>",
    "true",
    "1",
    "\x00",
    "é",
    '<"q">',
    "</s>",
]
TEXT = st.lists(st.sampled_from(PIECES), max_size=4).map("".join)
JSON_VALUE = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), TEXT),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)),
    max_leaves=8,
)


def exact_hit(conversation: Conversation, texts: set[str]) -> bool:
    pattern = literal_pattern(texts)
    return any(pattern.search(text) for _, text in data_strings(conversation))


@st.composite
def conversations(draw) -> Conversation:
    calls = tuple(
        ToolCall(draw(TEXT) or "f", draw(st.dictionaries(TEXT, JSON_VALUE, max_size=3)))
        for _ in range(draw(st.integers(0, 2)))
    )
    messages = [
        Message("user", draw(TEXT)),
        Message("assistant", draw(TEXT), reasoning=draw(st.none() | TEXT), tool_calls=calls),
    ]
    tools = draw(st.none() | st.lists(st.dictionaries(TEXT, JSON_VALUE, max_size=3), max_size=2))
    variables = draw(st.dictionaries(TEXT, JSON_VALUE, max_size=2))
    return Conversation(messages, tools=tools, variables=variables)


@settings(max_examples=400, deadline=None)
@given(conversations(), st.sampled_from([CHATML, {"true"}, {'<"q">', "<|im_end|>"}, {"a\nb", "é"}]))
def test_the_scan_misses_nothing_the_per_string_check_finds(conversation, texts):
    """A hit may be false (the caller then runs the exact check), a miss never."""
    if exact_hit(conversation, texts):
        assert ControlTokenScan(texts).maybe_found(conversation)


SPELLINGS = {  # ways a JSON writer may spell the same record
    "verbatim": lambda record: json.dumps(record, ensure_ascii=False),
    "ascii": json.dumps,
    "escaped slash": lambda record: json.dumps(record, ensure_ascii=False).replace("/", "\\/"),
    "escaped <": lambda record: json.dumps(record, ensure_ascii=False).replace("<", "\\u003c"),
}


@settings(max_examples=300, deadline=None)
@given(
    conversations(),
    st.sampled_from([CHATML, {"</s>"}, {'<"q">', "<|im_end|>"}, {"a\nb", "é"}]),
    st.sampled_from(sorted(SPELLINGS)),
)
def test_the_scan_of_a_record_read_from_json_misses_nothing(conversation, texts, spelling):
    """A record read from a file is searched as its JSON text unless an escape in it could hide a token."""
    messages = [
        {
            "role": m.role,
            "content": m.content,
            **({"reasoning_content": m.reasoning} if m.reasoning is not None else {}),
            **(
                {
                    "tool_calls": [
                        {"function": {"name": c.name, "arguments": c.arguments}} for c in m.tool_calls
                    ]
                }
                if m.tool_calls
                else {}
            ),
        }
        for m in conversation.messages
    ]
    record = {
        "messages": messages,
        "tools": conversation.tools,
        "chat_template_kwargs": conversation.variables,
    }
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "a.jsonl")
        path.write_text(SPELLINGS[spelling](record) + "\n", encoding="utf-8")
        [read] = read_conversations(str(path))
    assert read.source_text is not None
    if exact_hit(read, texts):
        assert ControlTokenScan(texts).maybe_found(read)


def test_no_match_spans_two_strings():
    conversation = Conversation([Message("user", "say <|im_"), Message("assistant", "end|> done")])
    assert not ControlTokenScan(CHATML).maybe_found(conversation)


def test_a_token_that_json_escapes_is_found_in_nested_tools():
    """JSON writes `<"q">` as `<\\"q\\">`: then the tools' strings are searched one by one."""
    texts = {'<"q">'}
    conversation = Conversation(
        [Message("user", "u"), Message("assistant", "a")], tools=[{"f": {"description": ['x <"q">']}}]
    )
    scan = ControlTokenScan(texts)
    assert not scan.json_verbatim and scan.maybe_found(conversation) and exact_hit(conversation, texts)


def test_the_joiner_is_in_no_token():
    assert ControlTokenScan({"\x00", "\x01<x>"}).joiner == "\x02"


def test_the_first_chunks_are_small_so_tokenizing_starts_early(tokenizer, monkeypatch):
    """Chunks double from FIRST_CHUNK to ENCODE_CHUNK and what is left at the end is cut in halves down
    to FIRST_CHUNK (little labelling left once the tokenizer is done); the examples are those of one big
    chunk."""
    monkeypatch.setattr(pipeline, "FIRST_CHUNK", 2)
    monkeypatch.setattr(pipeline, "ENCODE_CHUNK", 8)
    encoder = ConversationEncoder(tokenizer, BUILTINS["chatml"], ProtocolConfig())
    sizes = []
    encode_rows = encoder.encode_rows
    monkeypatch.setattr(encoder, "encode_rows", lambda chunk: sizes.append(len(chunk)) or encode_rows(chunk))
    conversations = [
        Conversation([Message("user", f"question {n}"), Message("assistant", "answer " * (n + 1))])
        for n in range(29)
    ]
    examples = list(encoder.encode_conversations(conversations, Accounting()))
    assert sizes == [2, 4, 8, 8, 3, 2, 2]  # the 7 left after 22: 3, then 2 of 4, then 2
    monkeypatch.setattr(pipeline, "FIRST_CHUNK", 64)
    monkeypatch.setattr(pipeline, "ENCODE_CHUNK", 64)
    whole = list(encoder.encode_conversations(conversations, Accounting()))
    assert sizes[7:] == [29]
    assert all(
        np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.labels, b.labels)
        for a, b in zip(examples, whole, strict=True)
    )
