"""Tool-call scores for every builtin template's call format and the stock Jinja formats: a reference
rendered through its template scores 1 against itself; a wrong name, wrong arguments or a call that does
not parse score 0 where they should; sft-chat reads the same calls and keeps the text around them."""

from __future__ import annotations

import dataclasses
import json

import pytest

from sft.chat_reply import parse_reply
from sft.protocol.templates import BUILTINS
from sft.protocol.types import Message, ToolCall
from sft.scoring import score_generation, tool_calls_in_text
from tests.helpers import generated_reply, stock_template, stock_template_source

CALLS = (ToolCall("get_weather", {"city": "Bern", "days": 2}), ToolCall("get_time", {"zone": "CET"}))
TOOL_SCORES = ("tool_call_parses", "tool_call_name", "tool_call_arguments")
ALL_ONE = dict.fromkeys(["exact_match", "normalized_exact_match", "token_f1", *TOOL_SCORES], 1.0)


def message(*calls: ToolCall, content: str = "Let me look.") -> Message:
    return Message("assistant", content, tool_calls=calls)


def tool_scores(text: str, template, calls=CALLS) -> tuple[float, ...]:
    scores = score_generation(text, "", calls, template)
    return tuple(scores[name] for name in TOOL_SCORES)


STOCK = {  # trl's stock templates: (end-of-turn markers, calls per message they render, stop tokens)
    "qwen2_5": (["<|im_end|>"], 2, None),  # Hermes JSON in <tool_call>
    "qwen3": (["<|im_end|>"], 2, None),
    "qwen3_6": (["<|im_end|>"], 2, None),  # <tool_call><function=…><parameter=…>
    "glm4moe": (["<|user|>", "<|observation|>"], 2, None),  # <tool_call>NAME<arg_key>…
    "llama3_1": (["<|eot_id|>", "<|eom_id|>"], 1, None),  # bare {"name", "parameters"}
    "llama3_2": (["<|eot_id|>", "<|eom_id|>"], 1, None),
    # <|tool_call>call:NAME{key:<|"|>value<|"|>}<tool_call|>, the content after the calls
    "gemma4": (["<turn|>"], 2, ["<turn|>", "<|tool_response>"]),
    "gptoss": (["<|return|>", "<|end|>", "<|call|>"], 1, ["<|return|>", "<|call|>"]),  # to=functions.NAME
    "lfm2_2_5": (["<|im_end|>"], 2, None),  # <|tool_call_start|>[NAME(key='value'), …]<|tool_call_end|>
    "muse_glimmer": (["<|eot|>"], 2, None),  # <atem:invoke name="NAME"><atem:parameter name="KEY">…
}
# render no content beside calls (GPT-OSS renders it as the analysis channel: reasoning)
DROPS_CONTENT = {"llama3_1", "llama3_2", "muse_glimmer", "gptoss"}


TEMPLATES = [pytest.param(name, 2, id=name) for name in BUILTINS] + [
    pytest.param(name, count, id=name) for name, (_, count, _) in STOCK.items()
]


def load(name: str):
    if name in BUILTINS:
        return BUILTINS[name]
    eot, _, stop = STOCK[name]
    return stock_template(name, eot, stop)


@pytest.mark.parametrize("name, count", TEMPLATES)
def test_a_rendered_reference_scores_one_against_itself(name, count):
    template = load(name)
    reference = generated_reply(template, message(*CALLS[:count]))
    scores = score_generation(reference, reference, CALLS[:count], template)
    assert scores == ALL_ONE
    assert score_generation(reference, reference, None, template) == ALL_ONE  # calls read from the text
    reply = parse_reply(reference, template)  # sft-chat reads the same calls, and keeps the text
    assert reply.tool_calls == CALLS[:count]
    assert reply.content == ("" if name in DROPS_CONTENT else "Let me look.")


@pytest.mark.parametrize("name, count", TEMPLATES)
def test_a_wrong_name_or_wrong_arguments_score_zero(name, count):
    template = load(name)
    renamed = dataclasses.replace(CALLS[0], name="get_forecast")
    changed = dataclasses.replace(CALLS[0], arguments={"city": "Basel", "days": 2})
    assert tool_scores(generated_reply(template, message(renamed)), template, CALLS[:1]) == (1.0, 0.0, 0.0)
    assert tool_scores(generated_reply(template, message(changed)), template, CALLS[:1]) == (1.0, 1.0, 0.0)
    answer = generated_reply(template, Message("assistant", "It is sunny in Bern."))
    assert tool_scores(answer, template) == (0.0, 0.0, 0.0)


BROKEN_MARKUP = {
    "</function>": "function>",
    "</arg_value>": "arg_value>",
    'Bern<|"|>': "Bern",
    "'Bern'": "'Bern",
    "</atem:parameter>": "atem:parameter>",
}


@pytest.mark.parametrize("name, count", TEMPLATES)
def test_a_call_that_does_not_parse_scores_zero(name, count):
    template = load(name)
    reference = generated_reply(template, message(*CALLS[:count]))
    broken = reference.replace('"Bern"', '"Bern', 1)  # the first call's JSON (or JSON value) is cut
    for markup, cut in BROKEN_MARKUP.items():  # the other formats do not quote strings as JSON
        broken = broken.replace(markup, cut, 1) if broken == reference else broken
    assert broken != reference
    scores = score_generation(broken, reference, CALLS[:count], template)
    assert (scores["tool_call_parses"], scores["tool_call_arguments"]) == (0.0, 0.0)
    assert parse_reply(broken, template).tool_calls == ()  # sft-chat keeps it as text


WEATHER = {"name": "get_weather", "arguments": {"city": "Bern", "days": 2}}
TIME = {"name": "get_time", "arguments": {"zone": "CET"}}


def test_a_builtin_reads_its_own_format_only():
    """chatml writes calls in <tool_call> blocks: a bare JSON call there is text; llama3 writes them bare."""
    bare = 'Sure. {"name": "get_weather", "parameters": {"city": "Bern", "days": 2}}'
    assert tool_calls_in_text(bare, BUILTINS["chatml"]) == []
    assert tool_calls_in_text(bare, BUILTINS["llama3"]) == [WEATHER]
    assert tool_calls_in_text(bare) == [WEATHER]  # a Jinja template: every common format


@pytest.mark.parametrize(
    "text, calls",
    [
        (  # Mistral v3: [TOOL_CALLS] and a JSON list, with ids
            '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Bern", "days": 2}, '
            '"id": "a1b2c3d4e"}, {"name": "get_time", "arguments": {"zone": "CET"}, "id": "f5g6h7i8j"}]',
            [WEATHER, TIME],
        ),
        (  # Mistral Small 3.2 / Magistral: NAME[ARGS]{json} per call
            '[TOOL_CALLS]get_weather[ARGS]{"city": "Bern", "days": 2}'
            '[TOOL_CALLS]get_time[ARGS]{"zone": "CET"}',
            [WEATHER, TIME],
        ),
        ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Bern"', [None]),
        ('[TOOL_CALLS]get_weather[ARGS]{"city": ', [None]),
        (  # Llama 3.1: <|python_tag|> then JSON, or a builtin tool's call
            '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Bern", "days": 2}}',
            [WEATHER],
        ),
        (
            '<|python_tag|>brave_search.call(query="weather in Bern")',
            [{"name": "brave_search", "arguments": {"query": "weather in Bern"}}],
        ),
        ("<|python_tag|>brave_search.call(query=", [None]),
        ("<|python_tag|>f.call(x={[1]: 2})", [None]),  # an unhashable key: broken, not a crash
        (  # DeepSeek-V3.1: NAME<｜tool▁sep｜>{json}, no type and no fence
            "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>"
            '{"city": "Bern", "days": 2}<｜tool▁call▁end｜><｜tool▁call▁begin｜>get_time<｜tool▁sep｜>'
            '{"zone": "CET"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
            [WEATHER, TIME],
        ),
        ('<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Bern"}', [None]),
        ("<｜tool▁call▁begin｜>get_weather<｜tool▁call▁end｜>", [None]),  # no separator
        (  # LFM2: an object argument is JSON, a list Python's repr
            '<|tool_call_start|>[f(opts={"on": true, "off": null}, tags=[\'x\', True])]<|tool_call_end|>',
            [{"name": "f", "arguments": {"opts": {"on": True, "off": None}, "tags": ["x", True]}}],
        ),
        ("<|tool_call_start|>[get_weather(city='Bern', days=2)", [None]),  # not closed
        ("<|tool_call_start|>[get_weather('Bern')]<|tool_call_end|>", [None]),  # a positional argument
        (  # Muse Glimmer: an invoke that is not closed
            '<atem:function_calls>\n<atem:invoke name="get_weather">\n<atem:parameter name="city">Bern',
            [None],
        ),
        (  # a JSON object that is no call is text
            'The answer is {"city": "Bern"} and {"name": "x"}.',
            [],
        ),
    ],
)
def test_common_jinja_formats_read_by_hand(text, calls):
    assert tool_calls_in_text(text) == calls


# ---- DeepSeek: trl's templates join a call's arguments as a string, so transformers renders them ----------

DEEPSEEK = {
    "deepseekv3": "Let me look.",
    "deepseek_r1_distill": None,
}  # R1 renders calls without content only


def deepseek_reply(name: str, *calls: ToolCall) -> str:
    """What DeepSeek-V3 / R1 writes for `calls` after a user turn, rendered by transformers through trl's
    template with each call's arguments a JSON string (as OpenAI's messages carry them), up to the
    end-of-sentence token."""
    from transformers.utils.chat_template_utils import render_jinja_template

    source = stock_template_source(name)
    user = {"role": "user", "content": "Weather in Bern?"}
    assistant = {
        "role": "assistant",
        "content": DEEPSEEK[name],
        "tool_calls": [
            {"type": "function", "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
            for c in calls
        ],
    }
    (prompt,), _ = render_jinja_template([[user]], chat_template=source, bos_token="<bos>")
    (text,), _ = render_jinja_template([[user, assistant]], chat_template=source, bos_token="<bos>")
    assert text.startswith(f"{prompt}<｜Assistant｜>{DEEPSEEK[name] or ''}<｜tool▁calls▁begin｜>")
    return text[len(prompt) :].removeprefix("<｜Assistant｜>").removesuffix("<｜end▁of▁sentence｜>")


@pytest.mark.parametrize("count", [1, 2])
@pytest.mark.parametrize("name", DEEPSEEK)
def test_deepseek_calls_score_one_against_themselves_and_zero_when_wrong(name, count):
    reference = deepseek_reply(name, *CALLS[:count])
    assert score_generation(reference, reference, CALLS[:count]) == ALL_ONE
    assert score_generation(reference, reference) == ALL_ONE  # calls read from the text
    renamed = dataclasses.replace(CALLS[0], name="get_forecast")
    changed = dataclasses.replace(CALLS[0], arguments={"city": "Basel", "days": 2})
    for generated, expected in ((renamed, (1.0, 0.0, 0.0)), (changed, (1.0, 1.0, 0.0))):
        assert tool_scores(deepseek_reply(name, generated), None, CALLS[:1]) == expected
    for broken in (reference.replace('"Bern"', '"Bern', 1), reference.replace("<｜tool▁call▁end｜>", "", 1)):
        scores = score_generation(broken, reference, CALLS[:count])
        assert (scores["tool_call_parses"], scores["tool_call_arguments"]) == (0.0, 0.0)
        assert parse_reply(broken).tool_calls == ()
    reply = parse_reply("Look it up.\n</think>\n\n" + reference)  # R1 thinks after its prompt's <think>
    assert (reply.reasoning, reply.content, reply.tool_calls) == (
        "Look it up.",
        DEEPSEEK[name] or "",
        CALLS[:count],
    )


# ---- XML formats write a string as it is and any other value as JSON --------------------------------------


@pytest.mark.parametrize("name", ["qwen3_6", "glm4moe", "muse_glimmer"])
def test_a_string_and_a_number_an_xml_template_writes_alike_score_one_either_way(name):
    template = load(name)
    as_string, as_number = ToolCall("get_weather", {"days": "2"}), ToolCall("get_weather", {"days": 2})
    written = generated_reply(template, message(as_string))
    assert written == generated_reply(template, message(as_number))  # the template cannot tell them apart
    for reference in (as_string, as_number):
        assert tool_scores(written, template, [reference]) == (1.0, 1.0, 1.0)
    assert tool_scores(written.replace("2", '"2"'), template, [as_number]) == (1.0, 1.0, 0.0)
