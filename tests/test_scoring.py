"""Each generation score on hand-checked cases: exact, normalized, token F1, and tool calls."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from sft.scoring import (
    exact_match,
    mean_scores,
    normalized_exact_match,
    score_generation,
    token_f1,
    tool_call,
    tool_call_scores,
    tool_calls_in_text,
)


def test_exact_match_ignores_only_surrounding_whitespace():
    assert exact_match(" Paris\n", "Paris") == 1.0
    assert exact_match("paris", "Paris") == 0.0
    assert exact_match("Pa ris", "Paris") == 0.0


def test_normalized_exact_match_follows_squad():
    assert normalized_exact_match("The  Eiffel tower!", "eiffel Tower") == 1.0
    assert normalized_exact_match("an apple", "apple.") == 1.0
    assert normalized_exact_match("apples", "apple") == 0.0


@pytest.mark.parametrize(
    "generated, reference, expected",
    [
        ("the cat sat", "cat sat down", 2 * (2 / 2) * (2 / 3) / (2 / 2 + 2 / 3)),  # articles dropped
        ("x y y", "y y z", 2 / 3),  # a repeated word counts as often as both have it
        ("x y", "z", 0.0),
        ("", "", 1.0),
        ("", "word", 0.0),
        ("The.", "", 1.0),  # both normalize to nothing
    ],
)
def test_token_f1(generated, reference, expected):
    assert token_f1(generated, reference) == pytest.approx(expected)


def test_tool_call_reads_the_openai_shapes():
    plain = {"name": "get", "arguments": {"city": "Oslo"}}
    assert tool_call(plain) == plain
    assert tool_call({"name": "get", "arguments": '{"city": "Oslo"}'}) == plain
    assert (
        tool_call({"type": "function", "function": {"name": "get", "arguments": {"city": "Oslo"}}}) == plain
    )
    assert tool_call({"name": "get"}) == {"name": "get", "arguments": {}}
    assert tool_call(SimpleNamespace(name="get", arguments={"city": "Oslo"}, id="call_1")) == plain
    assert tool_call({"arguments": {}}) is None
    assert tool_call({"name": "get", "arguments": "{not json"}) is None


def test_tool_calls_in_text_reads_every_block_and_marks_the_broken_ones():
    text = (
        'Sure.<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n<tool_call>{oops}</tool_call>'
    )
    assert tool_calls_in_text(text) == [{"name": "a", "arguments": {"x": 1}}, None]
    assert tool_calls_in_text("no calls here") == []


def test_tool_calls_in_text_reads_gpt_oss_messages_to_functions():
    text = (
        "<|channel|>analysis<|message|>Look it up.<|end|><|start|>assistant to=functions.a"
        '<|channel|>commentary json<|message|>{"x": 1}<|end|><|start|>assistant<|channel|>commentary '
        "to=functions.b <|constrain|>json<|message|>{oops"
    )
    assert tool_calls_in_text(text) == [{"name": "a", "arguments": {"x": 1}}, None]
    assert tool_calls_in_text("<|channel|>final<|message|>No call.") == []


def call_text(name: str, arguments: dict) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


REFERENCE_CALLS = [{"name": "weather", "arguments": {"city": "Oslo", "unit": "C"}}]


@pytest.mark.parametrize(
    "generated, expected",
    [
        (call_text("weather", {"unit": "C", "city": "Oslo"}), (1.0, 1.0, 1.0)),  # key order does not count
        (call_text("weather", {"city": "Bergen", "unit": "C"}), (1.0, 1.0, 0.0)),
        (call_text("forecast", {"city": "Oslo", "unit": "C"}), (1.0, 0.0, 0.0)),
        ("<tool_call>{'name': 'weather'}</tool_call>", (0.0, 0.0, 0.0)),  # not JSON
        ("It is sunny in Oslo.", (0.0, 0.0, 0.0)),  # no call at all
        (call_text("weather", {"city": "Oslo", "unit": "C"}) * 2, (1.0, 0.0, 0.0)),  # one call too many
    ],
)
def test_tool_call_scores(generated, expected):
    scores = tool_call_scores(generated, REFERENCE_CALLS)
    assert (scores["tool_call_parses"], scores["tool_call_name"], scores["tool_call_arguments"]) == expected


def test_reference_calls_come_from_the_structured_field_or_the_reference_text():
    generated = call_text("weather", {"city": "Oslo", "unit": "C"})
    from_text = score_generation(generated, call_text("weather", {"unit": "C", "city": "Oslo"}))
    assert from_text["tool_call_arguments"] == 1.0 and from_text["exact_match"] == 0.0
    structured = [
        {"type": "function", "function": {"name": "weather", "arguments": '{"city":"Oslo","unit":"C"}'}}
    ]
    assert score_generation(generated, "", structured)["tool_call_arguments"] == 1.0
    assert "tool_call_parses" not in score_generation("Hi", "Hello")  # no calls: no tool-call scores


def test_mean_scores_average_tool_call_scores_over_tool_call_items_only():
    means = mean_scores(
        [
            {"exact_match": 1.0, "tool_call_name": 1.0},
            {"exact_match": 0.0},
            {"exact_match": 0.0, "tool_call_name": 0.0},
            {"exact_match": 1.0},
        ]
    )
    assert means == {"exact_match": 0.5, "tool_call_name": 0.5}


def qwen_xml(value: str) -> str:
    return f"<tool_call>\n<function=f>\n<parameter=x>\n{value}\n</parameter>\n</function>\n</tool_call>"


def glm_xml(value: str) -> str:
    return f"<tool_call>f\n<arg_key>x</arg_key>\n<arg_value>{value}</arg_value>\n</tool_call>"


@pytest.mark.parametrize("xml", [qwen_xml, glm_xml])
@pytest.mark.parametrize(
    "reference, written, expected",
    [
        ("2", "2", 1.0),  # a string is written as it is: "2" and 2 both read `2`
        (2, "2", 1.0),
        (2, '"2"', 0.0),  # a JSON string where the template writes the number
        ("Bern", "Bern", 1.0),
        ("Bern", '"Bern"', 0.0),  # the template never quotes a string
        ("a b", "a  b", 0.0),
        (True, "true", 1.0),
        (True, "1", 0.0),
        (2.0, "2", 1.0),
        ({"a": 1, "b": [1, 2]}, '{"b":[1, 2],"a":1}', 1.0),  # non-strings compare as JSON values
        ({"a": 1}, "{'a': 1}", 0.0),
    ],
)
def test_xml_arguments_compare_as_the_template_writes_them(xml, reference, written, expected):
    scores = tool_call_scores(xml(written), [{"name": "f", "arguments": {"x": reference}}])
    assert scores["tool_call_arguments"] == expected


@pytest.mark.parametrize("xml", [qwen_xml, glm_xml])
def test_xml_arguments_read_from_both_texts_compare_as_written(xml):
    assert score_generation(xml("2"), xml("2"))["tool_call_arguments"] == 1.0
    assert score_generation(xml('"Bern"'), xml("Bern"))["tool_call_arguments"] == 0.0
    assert score_generation(xml('"2"'), xml("2"))["tool_call_arguments"] == 0.0
    assert score_generation(xml("Bern"), call_text("f", {"x": "Bern"}))["tool_call_arguments"] == 1.0


def test_json_arguments_tell_true_from_1_but_not_2_from_2_0():
    reference = [{"name": "f", "arguments": {"flag": True, "days": 2}}]
    assert (
        tool_call_scores(call_text("f", {"flag": True, "days": 2.0}), reference)["tool_call_arguments"] == 1
    )
    assert tool_call_scores(call_text("f", {"flag": 1, "days": 2}), reference)["tool_call_arguments"] == 0
