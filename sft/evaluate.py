"""Generation-based evaluation: greedy exact match on held-out sample conversations.

Each item is a conversation cut just before an assistant turn; the model generates (KV cache, greedy)
until its end-of-turn token and the text must equal the reference answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tokenizers import Tokenizer

from sft.data.sample import evaluation_items, exact_match, generate_conversations
from sft.model.generate import generate
from sft.protocol.messages import parse_messages
from sft.protocol.templates import ChatTemplate, render_chat_prompt
from sft.protocol.types import Message

EvalItem = tuple[list[dict], str]


def as_message(message: Mapping[str, Any]) -> Message:
    """A chat message dict in the records' schema (role, content, reasoning, tool_calls, a tool message's
    tool_call_id and name) as the protocol's Message."""
    return parse_messages([dict(message)], "chat history")[0]


def prompt_ids(
    messages: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, template: ChatTemplate
) -> list[int]:
    """The conversation so far plus the generation prompt, tokenized exactly as in training; earlier turns
    render as the template renders history (e.g. without reasoning where it strips it)."""
    rendered = render_chat_prompt([as_message(m) for m in messages], template, add_generation_prompt=True)
    return tokenizer.encode(rendered.text, add_special_tokens=False).ids


def generate_reply(
    model: torch.nn.Module,
    messages: Sequence[Mapping[str, Any]],
    tokenizer: Tokenizer,
    template: ChatTemplate,
    max_new_tokens: int,
    **sampling,
) -> tuple[str, bool]:
    """(reply text without the stop token, whether the model stopped by itself at one of the template's
    generation-stop tokens)."""
    stop_ids = {tokenizer.token_to_id(token) for token in template.stop_tokens}
    new_ids = generate(model, prompt_ids(messages, tokenizer, template), max_new_tokens, stop_ids, **sampling)
    stopped = bool(new_ids) and new_ids[-1] in stop_ids
    return tokenizer.decode(new_ids[:-1] if stopped else new_ids, skip_special_tokens=False), stopped


@torch.no_grad()
def exact_match_counts(
    model: torch.nn.Module,
    items: Sequence[EvalItem],
    tokenizer: Tokenizer,
    template: ChatTemplate,
    max_new_tokens: int,
) -> tuple[int, int]:
    """(correct, total) over `items`, greedy."""
    was_training = model.training
    model.eval()
    correct = sum(
        exact_match(generate_reply(model, messages, tokenizer, template, max_new_tokens)[0], expected)
        for messages, expected in items
    )
    model.train(was_training)
    return correct, len(items)


def sample_eval_items(seed: int, count: int, max_items: int) -> list[EvalItem]:
    """The held-out split of the embedded default, as exact-match items."""
    return evaluation_items(generate_conversations(count, seed, split="val"))[:max_items]
