"""Generation-based evaluation on your conversations: each trained assistant turn is generated from its
inference prompt (greedy by default, batched, KV cache) and scored against the reference (sft.scoring).

The prompt is `render(messages[:k], add_generation_prompt=True)` and the reference is what training
trains for turn k (its span in turn k's own row, without the marker that ends it, where generation
stops): exactly what the model must produce at inference (invariant 1). Shared by `sft-eval` and the
training callback; no Lightning here.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from sft.evaluate import reply_text
from sft.model.generate import generate_batch
from sft.protocol.pipeline import ConversationEncoder, only_turn
from sft.protocol.types import Conversation, ProtocolError
from sft.scoring import mean_scores, score_generation

METRIC_PREFIX = "gen/"
# Without eval.max_new_tokens each item may generate its reference's tokens, its stop token and this many
# more (a reply that runs on still shows how), at most REFERENCE_BUDGET_CAP: no reference is cut short.
REFERENCE_MARGIN = 16
REFERENCE_BUDGET_CAP = 2048


@dataclass
class GenerationItem:
    """One trained assistant turn to generate: `turn` is its index among the conversation's messages."""

    where: str
    turn: int
    prompt: str
    prompt_ids: list[int]
    reference: str
    reference_calls: list[Any] | None = None


@dataclass
class Generation:
    text: str
    stopped: bool  # ended with the end-of-turn token (else cut at max_new_tokens or the context)
    scores: dict[str, float] = field(default_factory=dict)


def generation_items(
    entries: Iterable[Iterable[Conversation | ProtocolError]],
    encoder: ConversationEncoder,
    max_items: int,
    only: Container[tuple[int, int]] | None = None,
) -> list[GenerationItem]:
    """Up to `max_items` items, in input order, from the conversations of `entries` (one stream per data
    entry, each numbered from 0 as training numbers it) prepared exactly as training prepares them
    (normalization, system prompt decision, mask strategy). Bad records are skipped: the loss pass over the
    same input accounts for them. `only`: the (entry, record) of the conversations to take (see
    sft.data.validation); reading stops once `max_items` are found."""
    items: list[GenerationItem] = []
    for entry, conversations in enumerate(entries):
        for index, conversation in enumerate(conversations):
            if isinstance(conversation, ProtocolError) or (only is not None and (entry, index) not in only):
                continue
            try:
                conversation, _ = encoder.prepare(conversation, index)
            except ProtocolError:
                continue
            items += conversation_items(conversation, encoder)[: max_items - len(items)]
            if len(items) >= max_items:
                return items
    return items


def conversation_items(conversation: Conversation, encoder: ConversationEncoder) -> list[GenerationItem]:
    """An item for each trained assistant turn of a prepared conversation (ConversationEncoder.prepare)."""
    items: list[GenerationItem] = []
    template, tokenizer = encoder.template, encoder.tokenizer
    messages = conversation.messages
    for turn, message in enumerate(messages):
        if message.role != "assistant" or not message.train:
            continue
        own = only_turn(messages, turn)  # the row training trains turn k in: its prompt, then the turn
        [row] = template.render_rows(own, conversation.tools, conversation.variables, "per_turn")
        start, end = row.assistant_spans[0]
        prompt, reference = row.text[:start], row.text[start:end]
        ending = max((m for m in template.eot_markers if reference.endswith(m)), key=len, default="")
        reference = reference[: len(reference) - len(ending)]
        items.append(
            GenerationItem(
                where=conversation.where,
                turn=turn,
                prompt=prompt,
                prompt_ids=tokenizer.encode(prompt, add_special_tokens=False).ids,
                reference=reference,
                reference_calls=getattr(message, "tool_calls", None),
            )
        )
    return items


@dataclass(frozen=True)
class GenerationSettings:
    """How items are generated (the `eval` section's keys of the same names)."""

    max_new_tokens: int | None = None  # None: each item's own budget (new_token_budgets)
    batch_size: int = 16  # prompts decoded together (sorted by length, left-padded)
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0

    @classmethod
    def from_section(cls, section: Any) -> GenerationSettings:
        """From the `eval` config section, a mapping or an object with these attributes."""
        get = (
            section.get if isinstance(section, dict) else lambda key, default: getattr(section, key, default)
        )
        return cls(*(get(f.name, f.default) for f in fields(cls)))


def new_token_budgets(
    items: Sequence[GenerationItem], tokenizer: Any, max_new_tokens: int | None
) -> int | list[int]:
    """`max_new_tokens` when set, else each item's reference tokens + 1 (its stop token) + REFERENCE_MARGIN,
    at most REFERENCE_BUDGET_CAP: a fixed budget below a reference's length would make it unmatchable."""
    if max_new_tokens is not None:
        return max_new_tokens
    lengths = (len(tokenizer.encode(item.reference, add_special_tokens=False).ids) for item in items)
    return [min(length + 1 + REFERENCE_MARGIN, REFERENCE_BUDGET_CAP) for length in lengths]


def evaluate_generations(
    model: torch.nn.Module,
    tokenizer: Any,
    stop_tokens: Sequence[str],
    items: Sequence[GenerationItem],
    settings: GenerationSettings,
    generator: torch.Generator | None = None,
    template: Any = None,
) -> tuple[list[Generation], dict[str, float]]:
    """Generate every item until one of `stop_tokens` (the template's) and score it (tool calls read in
    `template`'s format); returns the generations and the mean scores (`gen/...`), with `gen/stopped`: the
    fraction that ended at a stop token (the rest were cut by the budget or the context)."""
    stop_ids = {tokenizer.token_to_id(token) for token in stop_tokens}
    was_training = model.training
    model.eval()
    try:
        new_ids = generate_batch(
            model,
            [item.prompt_ids for item in items],
            new_token_budgets(items, tokenizer, settings.max_new_tokens),
            stop_ids,
            settings.batch_size,
            settings.temperature,
            settings.top_p,
            generator,
        )
    finally:
        model.train(was_training)
    generations = []
    for item, ids in zip(items, new_ids, strict=True):
        text, stopped = reply_text(tokenizer, ids, stop_ids)
        generations.append(
            Generation(text, stopped, score_generation(text, item.reference, item.reference_calls, template))
        )
    metrics = {
        METRIC_PREFIX + name: value for name, value in mean_scores(g.scores for g in generations).items()
    }
    if generations:
        metrics[METRIC_PREFIX + "stopped"] = sum(g.stopped for g in generations) / len(generations)
    return generations, metrics
