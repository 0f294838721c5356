"""Replies parsed into the records' schema: what a template renders for an assistant message, cut where
generation stops, parses back into that message (GPT-OSS channels, Qwen3 and the builtins' <think> and calls);
sft-chat keeps it so, and the next turn renders history as the template does (GPT-OSS drops the CoT)."""

from __future__ import annotations

import io

import pytest

import sft.evaluate
from sft.chat_reply import Reply, parse_reply
from sft.checkpoint import InferenceBundle
from sft.cli.chat import ChatSession, run_repl
from sft.evaluate import as_message
from sft.protocol.templates import BUILTINS
from sft.protocol.types import Message, ToolCall
from tests.helpers import CORPUS, generated_reply, make_tokenizer, stock_template

GPT_OSS_EOT = ["<|return|>", "<|end|>", "<|call|>"]
GPT_OSS_SPECIALS = [*GPT_OSS_EOT, "<|start|>", "<|channel|>", "<|message|>"]
CALL = ToolCall("get_weather", {"city": "Bern", "days": 2})
ASSISTANT = [
    Message("assistant", "It is 21 C.", reasoning="Report it."),
    Message("assistant", "It is 21 C."),
    Message("assistant", "", reasoning="Look it up.", tool_calls=(CALL,)),
    Message("assistant", "", tool_calls=(CALL,)),
]


@pytest.mark.parametrize(
    "name, eot, stop",
    [
        ("gptoss", GPT_OSS_EOT, ["<|return|>", "<|call|>"]),
        ("qwen3", ["<|im_end|>"], None),
        ("chatml", None, None),
        ("llama3", None, None),  # calls as bare JSON
        ("microlm", None, None),
    ],
)
@pytest.mark.parametrize("message", ASSISTANT, ids=["answer_thought", "answer", "call_thought", "call"])
def test_a_rendered_turn_parses_back_into_its_message(name, eot, stop, message):
    template = BUILTINS[name] if name in BUILTINS else stock_template(name, eot, stop)
    reply = parse_reply(generated_reply(template, message), template)
    reasoning = message.reasoning if name != "qwen3" or message.reasoning else ""  # Qwen3 thinks always
    assert (reply.content, reply.reasoning, reply.tool_calls) == (
        message.content,
        reasoning,
        message.tool_calls,
    )


def test_gpt_oss_channels_are_shown_one_per_line_and_real_model_call_headers_parse():
    reply = parse_reply(
        "<|channel|>analysis<|message|>Look it up.<|end|><|start|>assistant<|channel|>commentary "
        'to=functions.get_weather <|constrain|>json<|message|>{"city": "Bern"}'
    )
    assert reply == Reply(
        "",
        "Look it up.",
        (ToolCall("get_weather", {"city": "Bern"}),),
        shown='[analysis] Look it up.\n[call get_weather] {"city": "Bern"}',
    )
    assert parse_reply("<|channel|>final<|message|>Hi.").shown == "[final] Hi."


def test_calls_that_do_not_parse_stay_in_the_content():
    broken = "<tool_call>\n{not json}\n</tool_call>"
    assert parse_reply(broken) == Reply(broken, None, (), shown=broken)
    reply = parse_reply("<|channel|>commentary to=functions.f json<|message|>{oops")
    assert (reply.content, reply.tool_calls) == ("{oops", ())


def test_sft_chat_keeps_gpt_oss_replies_in_the_schema_and_renders_history_as_the_template(monkeypatch):
    """A call with its reasoning, the tool's result (/tool), the answer, then a new question: the answer's
    prompt holds the call's reasoning, the next question's does not (GPT-OSS drops CoT once answered)."""
    template = stock_template("gptoss", GPT_OSS_EOT, ["<|return|>", "<|call|>"])
    tokenizer = make_tokenizer(GPT_OSS_SPECIALS, 400, CORPUS + ["Look it up. Report it. It is 21 C in Bern."])
    scripted = [
        "<|channel|>analysis<|message|>Look it up.<|end|><|start|>assistant to=functions.get_weather"
        '<|channel|>commentary json<|message|>{"city": "Bern"}<|call|>',
        "<|channel|>analysis<|message|>Report it.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>It is 21 C.<|return|>",
        "<|channel|>final<|message|>Bye.<|return|>",
    ]
    prompts = []

    def fake_generate(model, prompt_ids, max_new_tokens, stop_ids, **sampling):
        prompts.append(tokenizer.decode(prompt_ids, skip_special_tokens=False))
        return tokenizer.encode(scripted[len(prompts) - 1], add_special_tokens=False).ids

    monkeypatch.setattr(sft.evaluate, "generate", fake_generate)
    session = ChatSession(InferenceBundle(None, tokenizer, template, {}, {}, {}))
    out = io.StringIO()
    run_repl(session, ["Weather in Bern?", '/tool {"temp": "21 C"}', "Thanks."], out)
    assert out.getvalue().splitlines() == [
        "[analysis] Look it up.",
        '[call get_weather] {"city": "Bern"}',
        "[analysis] Report it.",
        "[final] It is 21 C.",
        "[final] Bye.",
    ]
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Bern"}}}
    assert session.history == [
        {"role": "user", "content": "Weather in Bern?"},
        {"role": "assistant", "content": "", "reasoning": "Look it up.", "tool_calls": [call]},
        {"role": "tool", "content": '{"temp": "21 C"}', "name": "get_weather"},
        {"role": "assistant", "content": "It is 21 C.", "reasoning": "Report it."},
        {"role": "user", "content": "Thanks."},
        {"role": "assistant", "content": "Bye."},
    ]
    for count, prompt in zip((1, 3, 5), prompts, strict=True):
        messages = [as_message(m) for m in session.history[:count]]
        assert prompt == template.render_text(messages, None, True)
    assert "Look it up." in prompts[1] and "Look it up." not in prompts[2]
    assert prompts[2].endswith("It is 21 C.<|end|><|start|>user<|message|>Thanks.<|end|><|start|>assistant")


def test_tool_without_a_call_is_refused_and_not_kept(tokenizer):
    session = ChatSession(InferenceBundle(None, tokenizer, BUILTINS["chatml"], {}, {}, {}))
    with pytest.raises(ValueError, match="the last reply called no tool"):
        session.answer_tool_call("21 C")
    assert session.history == []
