"""Differential test against transformers: the same template gives the same token ids, and our trained
tokens are exactly its `return_assistant_tokens_mask` — for the builtin, for Jinja with `{% generation %}`
tags, and for the same Jinja without tags (our inference from the generation prompt)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from sft.protocol.labels import IGNORE_INDEX, build_loss_labels
from sft.protocol.templates import BUILTINS, JinjaTemplate, load_template
from sft.protocol.types import Message
from tests.helpers import make_tokenizer

transformers = pytest.importorskip("transformers")

BOS, EOS = "<|begin_of_text|>", "<|eot_id|>"

CHATML_TAGGED = (
    "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}"
    "{% if m.role == 'assistant' %}{% generation %}{{ m.content + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ m.content + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA3_TAGGED = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' }}"
    "{% if m.role == 'assistant' %}{% generation %}{{ m.content | trim + eos_token }}{% endgeneration %}"
    "{% else %}{{ m.content | trim + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Qwen2.5-like: a default system prompt when none is given, tool results inside a user turn.
QWEN_TAGGED = """{%- if messages[0].role != 'system' %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'assistant' %}
        {{- '<|im_start|>assistant\\n' }}
        {%- generation %}
            {{- message.content + '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\\n' }}
    {%- elif message.role == 'tool' %}
        {{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

CONVERSATIONS = [
    [
        {"role": "user", "content": "Hello, how are you?"},
        {"role": "assistant", "content": "I am fine, thank you."},
    ],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Reverse the list 3 1 2"},
        {"role": "assistant", "content": "2 1 3"},
        {"role": "user", "content": "Sort it."},
        {"role": "assistant", "content": "1 2 3"},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome."},
    ],
    [
        {"role": "user", "content": "Ünïcödé  text,\temoji 🙂\n"},
        {"role": "assistant", "content": " 中文字符\n\nnewlines.  "},
        {"role": "user", "content": "\n"},
        {"role": "assistant", "content": ""},
    ],
    [
        {"role": "user", "content": "The quick brown fox?"},
        {"role": "assistant", "content": "Let me check the tool."},
        {"role": "tool", "content": '{"jumps": "over the lazy dog"}'},
        {"role": "assistant", "content": "It jumps over the lazy dog."},
    ],
]


def without_tags(source: str) -> str:
    return re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", source)


def jinja(source: str):
    return load_template({"name": "jinja", "source": source, "bos_token": BOS, "eos_token": EOS, "eot": None})


CASES = {
    # (1) our builtin chatml against transformers on chatml written with generation tags
    "chatml-builtin": (CHATML_TAGGED, BUILTINS["chatml"]),
    # (2) our Jinja with tags against transformers on the same template
    "chatml-tags": (CHATML_TAGGED, JinjaTemplate(CHATML_TAGGED, eot="<|im_end|>")),
    "llama3-tags": (LLAMA3_TAGGED, jinja(LLAMA3_TAGGED)),
    "qwen-tags": (QWEN_TAGGED, JinjaTemplate(QWEN_TAGGED, eot="<|im_end|>")),
    # (3) the tags removed: our spans come from the generation prompt, transformers' from the tags
    "chatml-inferred": (CHATML_TAGGED, JinjaTemplate(without_tags(CHATML_TAGGED), eot="<|im_end|>")),
    "llama3-inferred": (LLAMA3_TAGGED, jinja(without_tags(LLAMA3_TAGGED))),
    "qwen-inferred": (QWEN_TAGGED, JinjaTemplate(without_tags(QWEN_TAGGED), eot="<|im_end|>")),
}


@pytest.fixture(scope="module")
def tokenizers():
    ours = make_tokenizer()
    theirs = transformers.PreTrainedTokenizerFast(
        tokenizer_object=make_tokenizer(), bos_token=BOS, eos_token=EOS
    )
    return ours, theirs


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=lambda c: f"{len(c)}msgs")
@pytest.mark.parametrize("case", sorted(CASES))
def test_ids_and_trained_tokens_match_transformers(tokenizers, case, conversation):
    ours, theirs = tokenizers
    tagged_source, template = CASES[case]
    reference = theirs.apply_chat_template(
        conversation,
        chat_template=tagged_source,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    rendered = template.render([Message(m["role"], m["content"]) for m in conversation])
    assert rendered.text == theirs.apply_chat_template(
        conversation, chat_template=tagged_source, tokenize=False
    )
    encoding = ours.encode(rendered.text, add_special_tokens=False)
    labels = build_loss_labels(encoding.ids, encoding.offsets, rendered.assistant_spans)
    assert encoding.ids == list(reference["input_ids"])
    assert (labels != IGNORE_INDEX).astype(int).tolist() == list(reference["assistant_masks"])
    assert np.any(labels != IGNORE_INDEX)
