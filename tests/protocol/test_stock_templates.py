"""The stock chat templates models ship (read at test time from the `trl` wheel, never copied here): the
verdict for each (one row, split rows, refused per conversation, refused), and every trained span, with
the tokens before it, equal token for token to what transformers renders for that turn at inference (the
generation prompt, then through the end-of-turn), in the one-row path and the split path.
"""

from __future__ import annotations

import importlib.resources
import json
import re
from dataclasses import replace
from datetime import date
from pathlib import Path

import jinja2
import numpy as np
import pytest

from sft.protocol.labels import IGNORE_INDEX
from sft.protocol.pipeline import Accounting, ConversationEncoder, DataError
from sft.protocol.templates import BUILTINS, JinjaTemplate, check_template
from sft.protocol.templates.jinja import jinja_message
from sft.protocol.types import (
    Conversation,
    Message,
    ProtocolConfig,
    ProtocolError,
    TemplateError,
    ToolCall,
)
from tests.helpers import CORPUS, make_tokenizer

transformers = pytest.importorskip("transformers")
pytest.importorskip("trl")
STOCK = Path(str(importlib.resources.files("trl") / "chat_templates"))

# name → (template.eot, eos_token, bos_token)
TEMPLATES = {
    "llama3": (["<|eot_id|>"], "<|eot_id|>", "<|begin_of_text|>"),
    "llama3_1": (["<|eot_id|>", "<|eom_id|>"], "<|eot_id|>", "<|begin_of_text|>"),
    "llama3_2": (["<|eot_id|>", "<|eom_id|>"], "<|eot_id|>", "<|begin_of_text|>"),
    "qwen2_5": (["<|im_end|>"], "<|im_end|>", None),
    "qwen3": (["<|im_end|>"], "<|im_end|>", None),
    "qwen3_instruct_2507": (["<|im_end|>"], "<|im_end|>", None),
    "qwen3_5_think": (["<|im_end|>"], "<|im_end|>", None),
    "qwen3_6": (["<|im_end|>"], "<|im_end|>", None),
    "gemma": (["<end_of_turn>"], "<eos>", "<bos>"),
    "gemma3": (["<end_of_turn>"], "<eos>", "<bos>"),
    "gemma4": (["<turn|>", "<|tool_response>"], "<eos>", "<bos>"),
    "cohere2": (["<|END_OF_TURN_TOKEN|>"], "<|END_OF_TURN_TOKEN|>", "<BOS_TOKEN>"),
    "lfm2": (["<|im_end|>"], "<|im_end|>", "<|startoftext|>"),
    "nemotron_3_nano": (["<|im_end|>"], "<|im_end|>", None),
    "phi3_5": (["<|end|>"], "<|endoftext|>", None),
    "gptoss": (["<|return|>", "<|end|>", "<|call|>"], "<|return|>", None),
    "deepseekv3": (["<｜end▁of▁sentence｜>"], "<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>"),
    "deepseek_r1_distill": (["<｜end▁of▁sentence｜>"], "<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>"),
}
CONTROL = re.compile(r"<\|[A-Za-z_]+\|?>|<[a-z_]+\|>|<｜[^｜]+｜>|<(?:start|end)_of_turn>|<[A-Z]+_TOKEN>")

WEATHER = ToolCall("get_weather", {"city": "Bern"}, id="call_1")
TIME = ToolCall("get_time", {"zone": "CET"}, id="call_2")
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": f"The {what}.",
            "parameters": {"type": "object", "properties": {arg: {"type": "string"}}, "required": [arg]},
        },
    }
    for name, what, arg in (
        ("get_weather", "weather in a city", "city"),
        ("get_time", "time in a zone", "zone"),
    )
]


def thought(text: str | None, on: bool) -> str | None:
    return text if on else None


def conversation(kind: str) -> tuple[list[Message], list | None]:
    """The conversations each template is judged on: system prompts, several turns, reasoning, calls."""
    think = "think" in kind
    system = [Message("system", "You are a terse assistant.")]
    chat = [
        Message("user", "What is two plus two?"),
        Message("assistant", "Four.", reasoning=thought("Add two and two.", think)),
        Message("user", "And times three?"),
        Message("assistant", "Twelve.", reasoning=thought("Four times three.", think)),
    ]
    if kind in ("chat", "think"):
        return system + chat, None
    calls = (WEATHER, TIME) if kind == "two_calls" else (WEATHER,)
    results = [Message("tool", '{"temp": "21 C"}', tool_call_id="call_1", name="get_weather")]
    results += [Message("tool", "10:00", tool_call_id="call_2", name="get_time")] * (kind == "two_calls")
    call_thought = thought("Look it up.", think or kind == "call_thought")
    tools = [
        Message("user", "Weather in Bern?"),
        Message("assistant", "", reasoning=call_thought, tool_calls=calls),
        *results,
        Message("assistant", "It is 21 C.", reasoning=thought("Report it.", think)),
    ]
    return system + tools + chat[2:], TOOLS


KINDS = ("chat", "think", "tools", "think_tools", "two_calls", "call_thought")

# The verdicts pinned: rows per conversation, or the reason it is refused; "refused" for the template.
VERDICTS = {
    "llama3": {"chat": 1, "think": "template_drops_message", "tools": "template_drops_message"},
    "llama3_1": {"chat": 1, "think": "template_drops_message", "tools": 1, "two_calls": "template_rejected"},
    "llama3_2": {"chat": 1, "think": "template_drops_message", "tools": 1, "two_calls": "template_rejected"},
    "qwen2_5": {"chat": 1, "think": "template_drops_message", "tools": 1, "two_calls": 1},
    "qwen3_instruct_2507": {"chat": 1, "think": "template_drops_message", "tools": 1, "two_calls": 1},
    "gemma3": {"chat": 1, "think": "template_drops_message", "tools": "template_rejected"},
    "cohere2": {"chat": 1, "think": "template_drops_message", "tools": "template_rejected"},
    "lfm2": {"chat": 1, "think": "template_drops_message", "tools": "template_drops_message"},
    "qwen3": {"chat": 2, "think": 2, "tools": 3, "think_tools": 3, "two_calls": 3},
    "qwen3_5_think": {"chat": 2, "think": 2, "tools": 3, "think_tools": 3, "two_calls": 3},
    "qwen3_6": {"chat": 2, "think": 2, "tools": 3, "think_tools": 3, "two_calls": 3},
    "nemotron_3_nano": {"chat": "no_inference_target", "think": 2, "think_tools": 3},
    "gptoss": {
        "chat": 2,
        "think": 2,
        "tools": 3,
        "think_tools": 3,  # the answer's prompt holds the call's reasoning, its whole rendering does not
        "call_thought": 3,
        "two_calls": "template_drops_message",
    },
    "gemma4": {"chat": 1, "tools": 1, "call_thought": 3, "think": "template_drops_message"},
    "gemma": {"chat": "template_rejected", "tools": "template_rejected"},  # a system message: refused
    "phi3_5": {"chat": 1, "tools": "template_drops_message"},
    "deepseekv3": "refused",
    "deepseek_r1_distill": "refused",
}


def stock_template(name: str, **options) -> JinjaTemplate:
    eot, eos, bos = TEMPLATES[name]
    source = (STOCK / f"{name}.jinja").read_text(encoding="utf-8")
    return JinjaTemplate(source, eot=eot, eos_token=eos, bos_token=bos, origin=name, **options)


def tokenizers(name: str, template: JinjaTemplate):
    """A BPE with the template's control tokens (those its source writes, and bos/eos/eot) as single ids;
    ours and the same tokenizer as transformers loads it, with the template."""
    eot, eos, bos = TEMPLATES[name]
    specials = sorted(set(CONTROL.findall(template.source)) | {*eot, eos} | ({bos} if bos else set()))
    ours = make_tokenizer(
        specials, vocab_size=500, corpus=CORPUS + [m.content for m in conversation("think_tools")[0]]
    )
    theirs = transformers.PreTrainedTokenizerFast(
        tokenizer_object=make_tokenizer(
            specials, 500, CORPUS + [m.content for m in conversation("think_tools")[0]]
        ),
        bos_token=bos,
        eos_token=eos,
    )
    theirs.chat_template = template.source
    return ours, theirs


def encode(template, tokenizer, kind: str, turns: str = "auto"):
    messages, tools = conversation(kind)
    encoder = ConversationEncoder(tokenizer, template, ProtocolConfig(max_seq_len=100_000, turns=turns))
    accounting = Accounting()
    examples = list(encoder.encode_conversations([Conversation(messages, tools=tools)], accounting))
    return examples, accounting


def reference_turns(theirs, template: JinjaTemplate, kind: str) -> list[tuple[list[int], list[int]]]:
    """Per trained assistant turn, what transformers renders at inference: the ids of
    apply_chat_template(messages[:k], add_generation_prompt=True), and those that follow, through the last
    end-of-turn id.
    Where the whole conversation through turn k renders its history otherwise than that prompt (GPT-OSS
    drops a call's reasoning once an answer follows), the turn is what transformers renders for message k
    after a one-message history, appended to the prompt and encoded with it, as one string."""
    messages, tools = conversation(kind)
    dicts = [transformers_message(m) for m in messages]
    eot_ids = {theirs.convert_tokens_to_ids(marker) for marker in template.eot_markers}
    expected = []
    for k, message in enumerate(messages):
        if message.role != "assistant":
            continue
        prompt = theirs.apply_chat_template(
            dicts[:k], tools=tools, add_generation_prompt=True, return_dict=False
        )
        full = theirs.apply_chat_template(dicts[: k + 1], tools=tools, return_dict=False)
        if full[: len(prompt)] != prompt:
            prompt_text = theirs.apply_chat_template(
                dicts[:k], tools=tools, add_generation_prompt=True, tokenize=False
            )
            full = theirs(prompt_text + turn_alone(theirs, dicts[k], tools), add_special_tokens=False)[
                "input_ids"
            ]
        assert full[: len(prompt)] == prompt
        generated = full[len(prompt) :]
        last_eot = max(i for i, token in enumerate(generated) if token in eot_ids)
        expected.append((prompt, generated[: last_eot + 1]))
    return expected


def turn_alone(theirs, message: dict, tools: list | None) -> str:
    """What transformers renders for `message` after its generation prompt, as the reply to one user
    message (a history every template renders the same way before a final turn)."""
    history = [{"role": "user", "content": "Go on."}]
    prompt = theirs.apply_chat_template(history, tools=tools, add_generation_prompt=True, tokenize=False)
    full = theirs.apply_chat_template([*history, message], tools=tools, tokenize=False)
    assert full.startswith(prompt)
    return full[len(prompt) :]


def trained_runs(example) -> list[tuple[list[int], list[int]]]:
    """Each run of trained tokens, with the ids before it: the context it is trained in."""
    trained = np.flatnonzero(example.labels != IGNORE_INDEX)
    runs = np.split(trained, np.flatnonzero(np.diff(trained) != 1) + 1) if len(trained) else []
    return [(example.input_ids[: run[0]].tolist(), example.labels[run].tolist()) for run in runs]


@pytest.mark.parametrize("name", sorted(VERDICTS))
def test_verdicts_and_every_trained_span_equals_inference(name):
    today = date.today().isoformat()  # transformers prints today's date where a template asks for one
    template = stock_template(name, date=today)
    if VERDICTS[name] == "refused":
        with pytest.raises(
            TemplateError, match=rf"template {name} .* assistant message \d+ has no inference-exact"
        ):
            check_template(template)
        return
    check_template(template)
    ours, theirs = tokenizers(name, template)
    for kind, verdict in VERDICTS[name].items():
        if isinstance(verdict, str):
            with pytest.raises(DataError, match=rf"^<memory>:0: {verdict}: "):
                encode(template, ours, kind)
            continue
        examples, accounting = encode(template, ours, kind)
        assert len(examples) == verdict, kind
        assert (accounting.split, accounting.split_rows) == ((1, verdict) if verdict > 1 else (0, 0)), kind
        expected = reference_turns(theirs, template, kind)
        runs = [run for example in examples for run in trained_runs(example)]
        assert runs == expected, kind
        split, _ = encode(template, ours, kind, turns="per_turn")  # the split path gives the same tokens
        assert [run for example in split for run in trained_runs(example)] == expected, kind


@pytest.mark.parametrize("name", ["qwen3", "qwen2_5", "llama3", "gptoss", "qwen3_6", "gemma3", "phi3_5"])
def test_trl_training_templates_are_accepted_and_spans_end_at_the_marker(name):
    """TRL's *_training.jinja wrap more than the target in {% generation %} (the newline after the marker,
    a header, a prefilled <think>): accepted, and what trains is what the same template generates."""
    eot, eos, bos = TEMPLATES[name]
    source = (STOCK / f"{name}_training.jinja").read_text(encoding="utf-8")
    template = JinjaTemplate(
        source, eot=eot, eos_token=eos, bos_token=bos, origin=name, date=date.today().isoformat()
    )
    assert template.has_generation_tags
    check_template(template)
    ours, theirs = tokenizers(name, template)
    for kind in [kind for kind, verdict in VERDICTS[name].items() if isinstance(verdict, int)]:
        examples, _ = encode(template, ours, kind)
        assert [run for example in examples for run in trained_runs(example)] == reference_turns(
            theirs, template, kind
        )


def test_whole_refuses_what_auto_splits():
    template = stock_template("qwen3")
    ours, _ = tokenizers("qwen3", template)
    with pytest.raises(TemplateError, match="qwen3 is not prefix-stable at message 3 .*protocol.turns=auto"):
        encode(template, ours, "think", turns="whole")


def test_builtin_chatml_renders_reasoning_calls_and_tools_as_qwen3_does():
    messages, tools = conversation("think_tools")
    final_turn = messages[:3]  # system, user, the call with its reasoning: the call is the final turn
    qwen3 = stock_template("qwen3")
    for add_generation_prompt, case in ((False, final_turn), (True, messages[:2])):
        assert BUILTINS["chatml"].render_text(case, tools, add_generation_prompt) == qwen3.render_text(
            case, tools, add_generation_prompt
        )


def test_per_record_template_variables_reach_the_template():
    template = stock_template("qwen3")
    plain = [Message("user", "Hi"), Message("assistant", "Hello!")]
    [thinking] = template.render_rows(plain)
    [quiet] = template.render_rows(plain, variables={"enable_thinking": False})
    assert "<think>\n\n</think>\n\nHello!" in thinking.text and quiet.text == thinking.text
    prompt = template.render_text(plain[:1], None, True, {"enable_thinking": False})
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    gptoss = stock_template("gptoss")
    assert "Reasoning: high" in gptoss.render_text(plain, variables={"reasoning_effort": "high"})


def truncated_gptoss(max_seq_len: int | None):
    """GPT-OSS's rows of an opening exchange + `think_tools` (its answer's row is P_k + T), with
    truncation=turns at `max_seq_len` (None: whole)."""
    template = stock_template("gptoss")
    ours, _ = tokenizers("gptoss", template)
    messages, tools = conversation("think_tools")
    opening = [Message("user", "Hi there, how are you today?"), Message("assistant", "Fine, thanks.")]
    config = ProtocolConfig(max_seq_len=max_seq_len or 100_000, truncation="turns")
    encoder = ConversationEncoder(ours, template, config)
    accounting = Accounting()
    conversations = [
        Conversation(messages[:1] + opening + messages[1:], tools=tools, source="chat.jsonl", line=3)
    ]
    return list(encoder.encode_conversations(conversations, accounting)), accounting


def test_truncation_turns_shortens_a_split_row_as_its_own_inference_row():
    """A split row too long for max_seq_len loses its oldest exchanges and stays its turn's inference row
    (once, the whole-conversation render refused GPT-OSS's P_k + T rows)."""
    whole, _ = truncated_gptoss(None)
    answer = 2  # the answer after the call: trained in P_k + T
    examples, accounting = truncated_gptoss(len(whole[answer].input_ids) - 1)
    assert len(examples) == len(whole) and accounting.truncated == 1
    assert len(examples[answer].input_ids) < len(whole[answer].input_ids)
    (_, shortened), (_, original) = trained_runs(examples[answer])[-1], trained_runs(whole[answer])[-1]
    assert shortened == original  # the same turn, trained after a shorter history


def test_a_dropped_turn_of_a_kept_split_conversation_is_counted():
    whole, _ = truncated_gptoss(None)
    opening_only = len(whole[0].input_ids)  # the first row fits; the call's row cannot shorten below it
    examples, accounting = truncated_gptoss(opening_only)
    assert len(examples) < len(whole) and accounting.kept == 1
    dropped = len(whole) - len(examples)
    assert sum(accounting.noted.values()) == dropped
    assert all(place.startswith("chat.jsonl:3 (turn ") for place in accounting.where["turn_too_long"])


def transformers_message(message: Message, arguments_as_json: bool = False) -> dict:
    """A message as a user gives it to transformers: each call's arguments a plain dict, or (as OpenAI's
    API gives them) its JSON string."""
    fields = jinja_message(message)
    for call, item in zip(message.tool_calls, fields.get("tool_calls", []), strict=True):
        arguments = (
            json.dumps(call.arguments, ensure_ascii=False) if arguments_as_json else dict(call.arguments)
        )
        item["function"] = {**item["function"], "arguments": arguments}
    return fields


def test_deepseek_joins_call_arguments_as_transformers_joins_a_json_string():
    """DeepSeek V3 writes `'```json' + '\\n' + arguments`: each call's arguments join as their JSON text
    (once: template_rejected), and the answer after the results trains exactly what follows transformers'
    generation prompt (the calls stay untrained: this template prefills `<think>` after a user turn)."""
    template = stock_template("deepseekv3")
    ours, theirs = tokenizers("deepseekv3", template)
    messages, tools = conversation("two_calls")
    messages = [replace(m, train=False) if m.tool_calls else m for m in messages[:6]]
    messages[2] = replace(
        messages[2], tool_calls=(WEATHER, replace(TIME, arguments={"zone": 'Zürich, "CET"'}))
    )
    dicts = [transformers_message(m, arguments_as_json=True) for m in messages]
    encoder = ConversationEncoder(ours, template, ProtocolConfig(max_seq_len=100_000))
    [example] = encoder.encode_conversations([Conversation(messages, tools=tools)], Accounting())
    rendered = theirs.apply_chat_template(dicts, tools=tools, tokenize=False)
    assert '```json\n{"zone": "Zürich, \\"CET\\""}\n```' in rendered
    assert example.input_ids.tolist() == theirs(rendered, add_special_tokens=False)["input_ids"]
    prompt = theirs.apply_chat_template(
        dicts[:-1], tools=tools, add_generation_prompt=True, return_dict=False
    )
    assert trained_runs(example) == [(prompt, example.input_ids[len(prompt) :].tolist())]
    assert theirs.decode(example.input_ids[len(prompt) :]) == "It is 21 C.<｜end▁of▁sentence｜>"


def argument_templates() -> list[str]:
    return sorted(
        path.stem for path in STOCK.glob("*.jinja") if "arguments" in path.read_text(encoding="utf-8")
    )


@pytest.mark.parametrize("name", argument_templates())
def test_call_arguments_render_as_transformers_renders_them(name):
    """Every stock template that reads call arguments renders what transformers renders given them as an
    object (`tojson`, `items`, `is mapping`, printed as a dict); where transformers refuses the object
    (DeepSeek joins it to a string with `+`), what it renders given the JSON string."""
    eot, eos, bos = TEMPLATES.get(name.removesuffix("_training"), (None, "</s>", "<s>"))
    source = (STOCK / f"{name}.jinja").read_text(encoding="utf-8")
    template = JinjaTemplate(source, eot=eot, eos_token=eos, bos_token=bos, date=date.today().isoformat())
    render = transformers.utils.chat_template_utils.render_jinja_template
    for kind in ("tools", "two_calls"):
        messages, tools = conversation(kind)
        expected = None
        for as_json in (False, True):
            dicts = [transformers_message(m, as_json) for m in messages]
            try:
                [expected], _ = render(
                    [dicts], tools=tools, chat_template=source, bos_token=bos, eos_token=eos
                )
                break
            except (jinja2.TemplateError, TypeError):  # raise_exception, or `+` on a dict
                continue
        if expected is None:
            with pytest.raises(ProtocolError):
                template.render_text(messages, tools)
        else:
            assert template.render_text(messages, tools) == expected, kind


PRINTS_ARGUMENTS = (
    "{% for m in messages if m.tool_calls %}{% set a = m.tool_calls[0].function.arguments %}"
    "{{ a }}|{{ '~' ~ a }}|{{ a | string }}|{{ a | tojson }}|{{ a is mapping }}|{{ a.items() | list }}"
    "{% endfor %}"
)


def test_printed_arguments_stay_the_object_transformers_prints():
    """Only `+` joins the JSON text: printing, `~`, `string`, `tojson`, `is mapping` and `items()` give
    what transformers gives for the object, and the JSON text it holds is out of the sandbox's reach."""
    messages, tools = conversation("tools")
    dicts = [transformers_message(m) for m in messages]
    render = transformers.utils.chat_template_utils.render_jinja_template
    hidden = PRINTS_ARGUMENTS.replace("{{ a }}", "{{ a._call }}")  # undefined: prints nothing
    for source in (PRINTS_ARGUMENTS, hidden):
        [expected], _ = render([dicts], tools=tools, chat_template=source)
        assert JinjaTemplate(source, eot="</s>").render_text(messages, tools) == expected
    assert expected.startswith("|~{'city': 'Bern'}|{'city': 'Bern'}|{\"city\": \"Bern\"}|True|")
    for reach in ("a.__add__('')", "a.update(x=1)"):
        escape = PRINTS_ARGUMENTS.replace("{{ a }}", f"{{{{ {reach} }}}}")
        with pytest.raises(TemplateError, match="is unsafe"):
            JinjaTemplate(escape, eot="</s>").render_text(messages, tools)
