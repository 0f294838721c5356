"""Generation-based evaluation: greedy exact match on held-out sample conversations.

Each item is a conversation cut just before an assistant turn; the model generates (KV cache, greedy)
until its end-of-turn token and the text must equal the reference answer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tokenizers import Tokenizer

from sft.data.sample import evaluation_items, exact_match, generate_conversations
from sft.model.generate import generate
from sft.protocol.templates import ChatTemplate, render_chat_prompt
from sft.protocol.types import Message

EvalItem = tuple[list[dict], str]


def prompt_ids(messages: Sequence[dict], tokenizer: Tokenizer, template: ChatTemplate) -> list[int]:
    """The conversation so far plus the assistant header, tokenized exactly as in training."""
    rendered = render_chat_prompt(
        [Message(m["role"], m["content"]) for m in messages], template, add_generation_prompt=True
    )
    return tokenizer.encode(rendered.text, add_special_tokens=False).ids


def generate_reply(
    model: torch.nn.Module,
    messages: Sequence[dict],
    tokenizer: Tokenizer,
    template: ChatTemplate,
    max_new_tokens: int,
    **sampling,
) -> tuple[str, bool]:
    """(reply text without the end-of-turn token, whether the model stopped by itself)."""
    stop_id = tokenizer.token_to_id(template.eot)
    new_ids = generate(
        model, prompt_ids(messages, tokenizer, template), max_new_tokens, {stop_id}, **sampling
    )
    stopped = bool(new_ids) and new_ids[-1] == stop_id
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
