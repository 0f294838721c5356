"""Templates: byte-exact builtins, exact assistant spans, Jinja (tags and inference), the start-up probe."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sft.protocol.templates import (
    BUILTINS,
    JinjaTemplate,
    builtin_jinja_source,
    check_template,
    load_template,
    probe_conversation,
    probe_messages,
    render_chat_prompt,
    standalone_config,
)
from sft.protocol.types import Message, ProtocolError, TemplateError, ToolCall

CONVERSATION = [
    Message("system", "Be brief."),
    Message("user", "Hi"),
    Message("assistant", "Hello!"),
    Message("user", "Weather?"),
    Message("assistant", "Let me check."),
    Message("tool", '{"temp": 21}'),
    Message("assistant", "21 °C."),
]
NO_TOOL = CONVERSATION[:5]

CHATML_TAGGED = (
    "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}"
    "{% if m.role == 'assistant' %}{% generation %}{{ m.content + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ m.content + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Meta's Llama 3 Instruct template (as published), written here so no download is needed.
LLAMA3_JINJA = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Qwen2.5-Instruct's template (tool-call branch trimmed): injects a default system prompt when none is given.
QWEN25_JINJA = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""  # noqa: E501 (verbatim)

# The Llama 3 format with generation tags, as a user would write it for transformers' assistant mask.
LLAMA3_TAGGED = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m.role + '<|end_header_id|>\n\n' }}"
    "{% if m.role == 'assistant' %}{% generation %}{{ m.content | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ m.content | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Mistral-style: the system prompt joins the first user turn, roles must alternate, and there is no
# generation prompt (the model answers right after [/INST]).
ALTERNATING_JINJA = (
    "{% if messages[0].role == 'system' %}{% set system = messages[0].content + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set system = '' %}{% set loop_messages = messages %}"
    "{% endif %}{{ bos_token }}{% for m in loop_messages %}"
    "{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if m.role == 'user' %}{{ '[INST] ' + (system if loop.first else '') + m.content + ' [/INST]' }}"
    "{% else %}{{ m.content + eos_token }}{% endif %}{% endfor %}"
)

# Mistral-v3-style: tool definitions go right before the last user message, so with tools the history
# renders differently once a later user turn exists.
TOOLS_BEFORE_LAST_USER = (
    "{% set user_messages = messages | selectattr('role', 'equalto', 'user') | list %}"
    "{% for m in messages %}"
    "{% if tools and m == user_messages[-1] %}[TOOLS]{{ tools | tojson }}[/TOOLS]{% endif %}"
    "{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# As GPT-OSS does: an assistant's reasoning stays in history only while no later assistant turn exists,
# so the prompt for an answer holds the reasoning of the call before it, and the rendering through the
# answer does not.
REASONING_UNTIL_ANSWERED = (
    "{% for m in messages %}"
    "{% set later = messages[loop.index:] | selectattr('role', 'equalto', 'assistant') | list %}"
    "<{{ m.role }}>{% if m.reasoning_content and not later %}[{{ m.reasoning_content }}]{% endif %}"
    "{{ m.content }}<end>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)
CALL_THEN_ANSWER = [
    Message("user", "Weather?"),
    Message("assistant", "Checking.", reasoning="Look it up."),
    Message("tool", "21"),
    Message("assistant", "21 °C.", reasoning="Report it."),
]


def span_texts(rendered):
    return [rendered.text[start:end] for start, end in rendered.assistant_spans]


def without_tags(source: str) -> str:
    return re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", source)


# ---- builtins ------------------------------------------------------------------------------------------


def test_chatml_is_byte_exact():
    rendered = render_chat_prompt(CONVERSATION, BUILTINS["chatml"])
    assert rendered.text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nWeather?<|im_end|>\n"
        "<|im_start|>assistant\nLet me check.<|im_end|>\n"
        '<|im_start|>tool\n{"temp": 21}<|im_end|>\n'
        "<|im_start|>assistant\n21 °C.<|im_end|>\n"
    )
    assert span_texts(rendered) == ["Hello!<|im_end|>", "Let me check.<|im_end|>", "21 °C.<|im_end|>"]
    prompt = render_chat_prompt(CONVERSATION[:2], BUILTINS["chatml"], add_generation_prompt=True)
    assert prompt.text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert prompt.assistant_spans == []


def test_llama3_is_byte_exact():
    rendered = render_chat_prompt(CONVERSATION, BUILTINS["llama3"])
    assert rendered.text == (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWeather?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nLet me check.<|eot_id|>"
        '<|start_header_id|>ipython<|end_header_id|>\n\n{"temp": 21}<|eot_id|>'
        "<|start_header_id|>assistant<|end_header_id|>\n\n21 °C.<|eot_id|>"
    )
    assert span_texts(rendered) == ["Hello!<|eot_id|>", "Let me check.<|eot_id|>", "21 °C.<|eot_id|>"]
    prompt = render_chat_prompt(CONVERSATION[1:2], BUILTINS["llama3"], add_generation_prompt=True)
    assert prompt.text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_microlm_is_byte_exact():
    rendered = render_chat_prompt(CONVERSATION, BUILTINS["microlm"])
    assert rendered.text == (
        "<|system|>\nBe brief.\n"
        "<|user|>\nHi\n"
        "<|assistant|>\nHello!\n<|endoftext|>\n"
        "<|user|>\nWeather?\n"
        "<|assistant|>\nLet me check.\n<|endoftext|>\n"
        '<|tool|>\n{"temp": 21}\n'
        "<|assistant|>\n21 °C.\n<|endoftext|>\n"
    )
    assert span_texts(rendered) == [
        "Hello!\n<|endoftext|>",
        "Let me check.\n<|endoftext|>",
        "21 °C.\n<|endoftext|>",
    ]
    prompt = render_chat_prompt(CONVERSATION[1:2], BUILTINS["microlm"], add_generation_prompt=True)
    assert prompt.text == "<|user|>\nHi\n<|assistant|>\n"


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builtins_pass_the_probe_and_honour_train_false(name):
    template = load_template({"name": name})
    check_template(template)
    assert template.eot in template.special_tokens
    messages = [
        m if m.content != "Hello!" else Message("assistant", "Hello!", train=False) for m in CONVERSATION
    ]
    texts = span_texts(render_chat_prompt(messages, template))
    assert len(texts) == 2 and not any("Hello!" in text for text in texts)


# ---- Jinja ---------------------------------------------------------------------------------------------


def test_jinja_chatml_matches_builtin_with_and_without_tags():
    for source in (CHATML_TAGGED, without_tags(CHATML_TAGGED)):
        template = JinjaTemplate(source, eot="<|im_end|>")
        check_template(template)
        for messages in (CONVERSATION, NO_TOOL, CONVERSATION[1:3]):
            assert template.render(messages) == BUILTINS["chatml"].render(messages)
            assert template.render(messages, add_generation_prompt=True) == BUILTINS["chatml"].render(
                messages, add_generation_prompt=True
            )


def test_generation_tags_and_inference_give_the_same_spans():
    # Tags around an assistant turn written through a macro, which the markers must survive.
    macro_tagged = (
        "{% macro turn(m) %}{{ '<|im_start|>' + m.role + '\\n' }}{% if m.role == 'assistant' %}"
        "{% generation %}{{ m.content }}<|im_end|>{% endgeneration %}{% else %}{{ m.content }}<|im_end|>"
        "{% endif %}{{ '\\n' }}{% endmacro %}{% for m in messages %}{{ turn(m) }}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    conversations = [
        CONVERSATION,
        [Message("user", "  spaced  "), Message("assistant", "\n\nline\n "), Message("user", "x")],
        [
            Message("user", "ünï 🙂"),
            Message("assistant", "中文"),
            Message("user", "b"),
            Message("assistant", ""),
        ],
        [
            Message("user", "a"),
            Message("assistant", "b", train=False),
            Message("user", "c"),
            Message("assistant", "d"),
        ],
    ]
    for tagged, builtin in ((CHATML_TAGGED, "chatml"), (macro_tagged, "chatml"), (LLAMA3_TAGGED, "llama3")):
        tokens = {"bos_token": "<|begin_of_text|>"} if builtin == "llama3" else {}
        eot = BUILTINS[builtin].eot
        with_tags = JinjaTemplate(tagged, eot=eot, **tokens)
        inferred = JinjaTemplate(without_tags(tagged), eot=eot, **tokens)
        assert with_tags.has_generation_tags and not inferred.has_generation_tags
        check_template(with_tags)
        for messages in conversations:
            assert with_tags.render(messages) == inferred.render(messages)
            if builtin == "chatml":
                assert with_tags.render(messages) == BUILTINS["chatml"].render(messages)


def test_llama3_style_jinja_matches_builtin_and_trims_like_meta():
    template = JinjaTemplate(LLAMA3_JINJA, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    check_template(template)
    assert template.eot == "<|eot_id|>" and template.special_tokens == ["<|begin_of_text|>", "<|eot_id|>"]
    assert template.render(NO_TOOL) == BUILTINS["llama3"].render(NO_TOOL)
    assert template.render(NO_TOOL, add_generation_prompt=True) == BUILTINS["llama3"].render(
        NO_TOOL, add_generation_prompt=True
    )
    # The template trims content, so the model is trained on what it renders, not on the raw message.
    rendered = template.render([Message("user", "q"), Message("assistant", "  answer \n")])
    assert span_texts(rendered) == ["answer<|eot_id|>"]


def test_qwen25_style_jinja_injects_a_default_system_prompt_and_passes_the_probe():
    template = load_template({"name": "jinja", "source": QWEN25_JINJA, "eot": "<|im_end|>"})
    check_template(template)
    assert template.supports_tool_role and not template.requires_alternation
    # The copy here has no tool-call branch and no reasoning: conversations with them are refused one by one.
    assert check_template(template) == ["reasoning", "tool"]
    rendered = template.render(CONVERSATION[1:3])
    assert rendered.text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    assert span_texts(rendered) == ["Hello!<|im_end|>"]
    assert template.render(NO_TOOL) == BUILTINS["chatml"].render(NO_TOOL)
    with_tool = template.render(CONVERSATION)
    assert '<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response><|im_end|>\n' in with_tool.text
    assert span_texts(with_tool) == span_texts(BUILTINS["chatml"].render(CONVERSATION))


def test_tools_reach_the_jinja_template():
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"city": "Zürich"}}}]
    template = JinjaTemplate(QWEN25_JINJA, eot="<|im_end|>")
    rendered = render_chat_prompt(NO_TOOL, template, tools=tools)
    assert (
        '<tools>\n{"type": "function", "function": {"name": "get_weather", "parameters": {"city": "Zürich"}}}'
        in rendered.text
    )
    assert span_texts(rendered) == ["Hello!<|im_end|>", "Let me check.<|im_end|>"]


def test_not_prefix_stable_raises_naming_the_message():
    template = JinjaTemplate(TOOLS_BEFORE_LAST_USER, eot="<|im_end|>")
    messages = [
        Message("user", "q1"),
        Message("assistant", "a1"),
        Message("user", "q2"),
        Message("assistant", "a2"),
    ]
    assert span_texts(template.render(messages)) == ["a1<|im_end|>", "a2<|im_end|>"]  # stable without tools
    with pytest.raises(TemplateError, match=r"not prefix-stable at message 2 .*'\[TOOLS\]"):
        template.render(messages, tools=[{"name": "search"}])
    assert span_texts(template.render(messages[:2], tools=[{"name": "search"}])) == ["a1<|im_end|>"]


def test_alternating_template_passes_the_probe_without_a_tool_turn():
    template = JinjaTemplate(ALTERNATING_JINJA, bos_token="<s>", eos_token="</s>")
    assert template.requires_alternation and not template.supports_tool_role
    assert "tool" not in {m.role for m in probe_messages(template)}
    check_template(template)
    rendered = template.render(NO_TOOL)
    assert (
        rendered.text == "<s>[INST] Be brief.\n\nHi [/INST]Hello!</s>[INST] Weather? [/INST]Let me check.</s>"
    )
    assert span_texts(rendered) == ["Hello!</s>", "Let me check.</s>"]
    with pytest.raises(ProtocolError, match="must alternate") as error:
        template.render([Message("user", "a"), Message("user", "b")])
    assert error.value.reason == "template_rejected"


def test_sandbox_refuses_unsafe_templates():
    with pytest.raises(TemplateError, match="sandbox"):
        JinjaTemplate("{% set x = messages.append(1) %}", eot="<e>").render([Message("user", "a")])
    with pytest.raises(TemplateError, match="sandbox"):
        JinjaTemplate("{{ ''.__class__.__mro__ }}", eot="<e>").render([])


def test_template_errors_at_load():
    with pytest.raises(TemplateError, match="does not parse"):
        JinjaTemplate("{% for m in messages %}", eot="<e>")
    with pytest.raises(TemplateError, match="end-of-turn"):
        JinjaTemplate("{{ messages }}")
    nested = "{% generation %}{% generation %}x{% endgeneration %}{% endgeneration %}"
    with pytest.raises(TemplateError, match="nests"):
        JinjaTemplate(nested, eot="x").render([])
    # Tags only on the final turn are enough: the spans are what each turn adds as the final turn.
    last_turn_only = CHATML_TAGGED.replace("m.role == 'assistant'", "m.role == 'assistant' and loop.last")
    rendered = JinjaTemplate(last_turn_only, eot="<|im_end|>").render(NO_TOOL)
    assert span_texts(rendered) == ["Hello!<|im_end|>", "Let me check.<|im_end|>"]


# ---- the start-up probe --------------------------------------------------------------------------------


def probe_error(source: str, eot: str = "<|im_end|>") -> str:
    with pytest.raises(TemplateError) as error:
        check_template(JinjaTemplate(source, eot=eot))
    return str(error.value)


def test_a_template_that_drops_the_system_prompt_refuses_conversations_with_one():
    source = CHATML_TAGGED.replace("{% for m in messages %}", "{% for m in messages if m.role != 'system' %}")
    for template in (
        JinjaTemplate(source, eot="<|im_end|>"),
        JinjaTemplate(without_tags(source), eot="<|im_end|>"),
    ):
        assert check_template(template) == ["reasoning", "tool", "system"]
        with pytest.raises(ProtocolError, match=r"does not render message 1 \(system\)'s content") as error:
            template.render_rows(NO_TOOL)
        assert error.value.reason == "template_drops_message"
        assert span_texts(template.render_rows(NO_TOOL[1:])[0]) == [
            "Hello!<|im_end|>",
            "Let me check.<|im_end|>",
        ]


def test_probe_catches_duplicated_content():
    source = without_tags(CHATML_TAGGED).replace(
        "{% endfor %}", "{% if m.role == 'user' %}(you said: {{ m.content }}){% endif %}{% endfor %}"
    )
    assert "message 1 (user, content 'probe-user-1-2b9c'): rendered 2 times" in probe_error(source)


def test_a_turn_left_open_for_its_tool_result_is_trained_as_inference_closes_it():
    # A tool result is folded into the assistant turn that called it, before that turn's end-of-turn: as
    # the final turn the call is closed by <|im_end|>, so that turn gets a row of its own.
    source = without_tags(CHATML_TAGGED).replace(
        "{{ m.content + '<|im_end|>' }}{% else %}",
        "{{ m.content }}{% for c in m.tool_calls or [] %}{{ c.function.name }}{% endfor %}"
        "{% if loop.last or messages[loop.index0 + 1].role != 'tool' %}<|im_end|>{% endif %}"
        "{% elif m.role == 'tool' %}{{ m.content + '<|im_end|>' }}{% else %}",
    )
    template = JinjaTemplate(source, eot="<|im_end|>")
    assert check_template(template) == ["reasoning"]
    messages, tools, _ = probe_conversation(template)
    rows = template.render_rows(messages, tools)
    assert [span_texts(row) for row in rows] == [
        ["probe-assistant-1-5e1d<|im_end|>"],
        ["probe_lookup_5a4c<|im_end|>"],
        ["probe-assistant-3-d852<|im_end|>"],
    ]
    assert rows[1].text.endswith("<|im_start|>assistant\nprobe_lookup_5a4c<|im_end|>\n")


def test_a_generation_tag_around_more_than_the_target_trains_the_target():
    # As TRL's *_training.jinja do: the header (or a prefilled <think>) and the newline after the marker
    # inside the tags. Inference gives the model the header, so only the reply through the marker trains.
    source = (
        "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}"
        "{{ '<|im_start|>assistant\\n' + m.content + '<|im_end|>\\n' }}{% endgeneration %}"
        "{% else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    template = JinjaTemplate(source, eot="<|im_end|>")
    check_template(template)
    assert span_texts(template.render(NO_TOOL)) == ["Hello!<|im_end|>", "Let me check.<|im_end|>"]


def test_probe_catches_a_generation_tag_without_the_eot():
    source = CHATML_TAGGED.replace(
        "{% generation %}{{ m.content + '<|im_end|>' }}{% endgeneration %}",
        "{% generation %}{{ m.content }}{% endgeneration %}<|im_end|>",
    )
    assert "no {% generation %} block covers what the model generates" in probe_error(source)


def test_probe_catches_a_wrong_eot():
    error = probe_error(without_tags(CHATML_TAGGED), eot="<|eot_id|>")
    assert "assistant message 3: no end-of-turn marker follows it" in error


def test_turns_closed_only_as_the_final_turn_are_trained_in_rows_of_their_own():
    only_last_closed = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% else %}<end>{% endif %}"
    )
    template = JinjaTemplate(only_last_closed, eot="<end>")
    assert span_texts(template.render(NO_TOOL[:3])) == ["Hello!<end>"]
    with pytest.raises(TemplateError, match="not prefix-stable at message 3"):
        template.render(NO_TOOL)
    rows = template.render_rows(NO_TOOL)
    assert [span_texts(row) for row in rows] == [["Hello!<end>"], ["Let me check.<end>"]]
    assert (
        rows[1].text
        == "<system>Be brief.<user>Hi<assistant>Hello!<user>Weather?<assistant>Let me check.<end>"
    )


def test_a_turn_after_a_history_rendered_otherwise_trains_after_its_own_generation_prompt():
    # The conversation through the answer drops "[Look it up.]"; inference shows it in the answer's
    # prompt. The answer's row is that prompt plus what the template renders for the answer.
    template = JinjaTemplate(REASONING_UNTIL_ANSWERED, eot="<end>")
    check_template(template)
    rows = template.render_rows(CALL_THEN_ANSWER)
    prompt = template.render_text(CALL_THEN_ANSWER[:3], add_generation_prompt=True)
    assert prompt == "<user>Weather?<end><assistant>[Look it up.]Checking.<end><tool>21<end><assistant>"
    assert [row.text for row in rows] == [
        "<user>Weather?<end><assistant>[Look it up.]Checking.<end>",
        prompt + "[Report it.]21 °C.<end>",
    ]
    assert [span_texts(row) for row in rows] == [["[Look it up.]Checking.<end>"], ["[Report it.]21 °C.<end>"]]
    with pytest.raises(TemplateError, match="not prefix-stable at message 2"):
        template.render_rows(CALL_THEN_ANSWER, turns="whole")


def test_a_final_turn_that_quotes_its_history_after_a_history_rendered_otherwise_is_refused():
    # What the answer renders depends on the history here, so its text is not the turn's own: not guessed.
    quoting = REASONING_UNTIL_ANSWERED.replace(
        "{{ m.content }}",
        "{{ m.content }}{% if loop.last and m.role == 'assistant' %} ({{ messages[0].content }}){% endif %}",
    )
    template = JinjaTemplate(quoting, eot="<end>")
    assert span_texts(template.render_rows(CALL_THEN_ANSWER[:2])[0]) == [
        "[Look it up.]Checking. (Weather?)<end>"
    ]
    with pytest.raises(ProtocolError, match="assistant message 4 has no inference-exact target"):
        template.render_rows(CALL_THEN_ANSWER)


def test_probe_catches_prefix_instability():
    source = without_tags(CHATML_TAGGED).replace(
        "m.role + '\\n'", "m.role + ('*' if loop.last else '') + '\\n'"
    )
    assert "assistant message 3 has no inference-exact target" in probe_error(source)


# ---- loading -------------------------------------------------------------------------------------------


def test_load_template_from_files(tmp_path):
    (tmp_path / "t.jinja").write_text(QWEN25_JINJA)
    config = {
        "chat_template": LLAMA3_JINJA,
        "bos_token": "<|begin_of_text|>",
        "eos_token": {"content": "<|eot_id|>"},
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    listed = {
        "chat_template": [
            {"name": "tool_use", "template": "x"},
            {"name": "default", "template": LLAMA3_JINJA},
        ]
    }
    (tmp_path / "listed.json").write_text(json.dumps({**config, **listed}))

    from_jinja = load_template({"name": "jinja", "path": str(tmp_path / "t.jinja"), "eot": "<|im_end|>"})
    assert from_jinja.source == QWEN25_JINJA
    for path in (tmp_path / "tokenizer_config.json", tmp_path / "listed.json", tmp_path):
        template = load_template({"name": "jinja", "path": str(path)})
        assert template.source == LLAMA3_JINJA
        assert (template.bos_token, template.eot) == ("<|begin_of_text|>", "<|eot_id|>")
        assert template.render(NO_TOOL).text == BUILTINS["llama3"].render(NO_TOOL).text
    (tmp_path / "chat_template.jinja").write_text(CHATML_TAGGED)  # wins over the config's, as in transformers
    assert (
        load_template({"name": "jinja", "path": str(tmp_path), "eot": "<|im_end|>"}).source == CHATML_TAGGED
    )


def test_load_template_errors(tmp_path):
    with pytest.raises(ValueError, match="expected one of"):
        load_template({"name": "vicuna"})
    with pytest.raises(ValueError, match="only used with template=jinja"):
        load_template({"name": "chatml", "path": "x.jinja"})
    with pytest.raises(ValueError, match="exactly one of"):
        load_template({"name": "jinja", "path": None, "source": None})
    with pytest.raises(FileNotFoundError, match="nothing at"):
        load_template({"name": "jinja", "path": str(tmp_path / "missing.jinja")})
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(TemplateError, match="no chat template"):
        load_template({"name": "jinja", "path": str(tmp_path)})
    (tmp_path / "listed.json").write_text(json.dumps({"chat_template": [{"name": "rag", "template": "x"}]}))
    with pytest.raises(TemplateError, match="no 'default' entry"):
        load_template({"name": "jinja", "path": str(tmp_path / "listed.json"), "eot": "x"})


def test_fingerprint_follows_the_template():
    base = JinjaTemplate(CHATML_TAGGED, eot="<|im_end|>")
    assert base.fingerprint == JinjaTemplate(CHATML_TAGGED, eot="<|im_end|>").fingerprint
    assert base.fingerprint != JinjaTemplate(without_tags(CHATML_TAGGED), eot="<|im_end|>").fingerprint
    assert (
        base.fingerprint
        != JinjaTemplate(CHATML_TAGGED, eot="<|im_end|>", template_kwargs={"x": 1}).fingerprint
    )
    assert len({template.fingerprint for template in BUILTINS.values()}) == len(BUILTINS)


# ---- property: chatml spans are exactly content + eot ---------------------------------------------------

CONTROL = ("<|im_start|>", "<|im_end|>")
content = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20).filter(
    lambda text: not any(token in text for token in CONTROL)
)
turn = st.tuples(st.sampled_from(["system", "user", "assistant", "tool"]), content, st.booleans())


@settings(max_examples=200, deadline=None)
@given(st.lists(turn, max_size=8))
def test_chatml_spans_are_exactly_assistant_content_plus_eot(turns):
    messages = [Message(role, text, train) for role, text, train in turns]
    rendered = BUILTINS["chatml"].render(messages)
    trained = [m for m in messages if m.role == "assistant" and m.train]
    assert span_texts(rendered) == [m.content + "<|im_end|>" for m in trained]
    ends = [0] + [end for _, end in rendered.assistant_spans]
    assert all(
        start >= previous for (start, _), previous in zip(rendered.assistant_spans, ends, strict=False)
    )
    # Outside the spans is exactly the untrained part: every header, the trailing newlines, other messages.
    outside = "".join(
        rendered.text[a:b]
        for a, b in zip(ends, [s for s, _ in rendered.assistant_spans] + [None], strict=True)
    )
    expected = "".join(
        f"<|im_start|>{m.role}\n" + ("" if m in trained else m.content + "<|im_end|>") + "\n"
        for m in messages
    )
    assert outside == expected


def test_eot_may_be_a_list_and_stop_tokens_are_their_own_setting():
    source = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}"
        "{% if m.role == 'assistant' %}{{ '<|return|>' if loop.last else '<|end|>' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    config = {"name": "jinja", "source": source, "eot": ["<|return|>", "<|end|>"], "stop": ["<|return|>"]}
    template = load_template(config)
    assert template.eot_markers == ("<|return|>", "<|end|>") and template.stop_tokens == ("<|return|>",)
    assert template.eot == "<|return|>" and {"<|return|>", "<|end|>"} <= set(template.special_tokens)
    check_template(template)
    rows = template.render_rows(NO_TOOL)  # <|end|> in history, <|return|> as the final turn: split
    assert [span_texts(row) for row in rows] == [["Hello!<|return|>"], ["Let me check.<|return|>"]]
    rebuilt = load_template(standalone_config(template))
    assert rebuilt.fingerprint == template.fingerprint and rebuilt.stop_tokens == ("<|return|>",)
    assert load_template({**config, "stop": []}).stop_tokens == ("<|return|>", "<|end|>")


@pytest.mark.parametrize("name", ["chatml", "llama3"])
def test_builtin_placeholders_in_data_stay_as_written_as_in_the_exported_template(name):
    """Text like "{system}" in a tool's description or "{arguments}" in a call's name is data, never a
    slot filled a second time: the builtin renders what its exported Jinja template renders."""
    tools = [{"type": "function", "function": {"name": "f", "description": "Fills {system} and {tools}."}}]
    messages = [
        Message("system", "Be brief."),
        Message("user", "Call it."),
        Message("assistant", "", tool_calls=(ToolCall("{arguments}", {"slot": "{name}"}),)),
        Message("tool", "done", name="{arguments}"),
        Message("assistant", "Done."),
    ]
    builtin = BUILTINS[name]
    exported = JinjaTemplate(builtin_jinja_source(builtin), eot=builtin.eot)
    rendered = builtin.render(messages, tools)
    assert "Fills {system} and {tools}." in rendered.text and '"{arguments}"' in rendered.text
    assert rendered.text == exported.render(messages, tools).text
