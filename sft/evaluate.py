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
from sft.model.generate import generate, generate_batch
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
    stop_ids = stop_token_ids(tokenizer, template)
    new_ids = generate(model, prompt_ids(messages, tokenizer, template), max_new_tokens, stop_ids, **sampling)
    return reply_text(tokenizer, new_ids, stop_ids)


def stop_token_ids(tokenizer: Tokenizer, template: ChatTemplate) -> set[int]:
    return {tokenizer.token_to_id(token) for token in template.stop_tokens}


def reply_text(tokenizer: Tokenizer, new_ids: list[int], stop_ids: set[int]) -> tuple[str, bool]:
    """(the generated text without its closing stop token, whether it ended at one)."""
    stopped = bool(new_ids) and new_ids[-1] in stop_ids
    return tokenizer.decode(new_ids[:-1] if stopped else new_ids, skip_special_tokens=False), stopped


@torch.no_grad()
def exact_match_counts(
    model: torch.nn.Module,
    items: Sequence[EvalItem],
    tokenizer: Tokenizer,
    template: ChatTemplate,
    max_new_tokens: int,
    batch_size: int = 16,
) -> tuple[int, int]:
    """(correct, total) over `items`, greedy, `batch_size` prompts decoded together (each as it would be
    alone: sft.model.generate.generate_batch)."""
    was_training = model.training
    model.eval()
    stop_ids = stop_token_ids(tokenizer, template)
    prompts = [prompt_ids(messages, tokenizer, template) for messages, _ in items]
    replies = generate_batch(model, prompts, max_new_tokens, stop_ids, batch_size)
    correct = sum(
        exact_match(reply_text(tokenizer, new_ids, stop_ids)[0], expected)
        for new_ids, (_, expected) in zip(replies, items, strict=True)
    )
    model.train(was_training)
    return correct, len(items)


def sample_eval_items(seed: int, count: int, max_items: int) -> list[EvalItem]:
    """The held-out split of the embedded default, as exact-match items."""
    return evaluation_items(generate_conversations(count, seed, split="val"))[:max_items]
