"""Autoregressive decoding with a KV cache: one prefill pass over the prompt, then one token per step."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from sft.model.llama import KVCache, LlamaForCausalLM


def sample_next_token(
    logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None = None
) -> int:
    """One id from a [vocab] logits vector: argmax at temperature 0, else nucleus (top-p) sampling."""
    if temperature == 0.0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, sorted_ids = probs.sort(descending=True)
    if top_p < 1.0:
        # Keep a token while the tokens ranked above it hold less than top_p: the smallest set reaching
        # top_p, never empty. multinomial renormalizes what is left.
        sorted_probs = sorted_probs * (sorted_probs.cumsum(0) - sorted_probs < top_p)
    # Draw on the generator's device, so a CPU generator also seeds a model on the GPU.
    device = generator.device if generator is not None else sorted_probs.device
    rank = torch.multinomial(sorted_probs.to(device), 1, generator=generator)
    return int(sorted_ids[int(rank)])


@torch.inference_mode()
def generate(
    model: LlamaForCausalLM,
    prompt_ids: list[int],
    max_new_tokens: int,
    stop_ids: set[int],
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Continue `prompt_ids` and return the new ids only.

    Generation ends after a stop id, which IS included as the last returned id (so a caller can tell a
    finished answer from a truncated one), after `max_new_tokens`, or at the model's context length
    (`max_position_embeddings`). temperature 0 is greedy and deterministic; otherwise tokens are sampled
    from softmax(logits / temperature) restricted to the top-p nucleus, reproducibly for a seeded generator.
    """
    if not prompt_ids:
        raise ValueError("prompt_ids is empty: generation needs at least one token to condition on")
    if temperature < 0.0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature=} {top_p=}")
    context_len = model.config.max_position_embeddings
    if len(prompt_ids) >= context_len:
        raise ValueError(f"a {len(prompt_ids)}-token prompt leaves no room in a {context_len}-token context")
    return generate_batch(model, [prompt_ids], max_new_tokens, stop_ids, 1, temperature, top_p, generator)[0]


@torch.inference_mode()
def generate_batch(
    model: torch.nn.Module,
    prompts: Sequence[list[int]],
    max_new_tokens: int | Sequence[int],
    stop_ids: set[int],
    batch_size: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """The new ids of each prompt (a stop id, when reached, is the last), as `generate` gives them alone.

    Prompts are sorted by length, so that a batch pads little, and left-padded: each row gets its own
    positions and a mask that hides its padding, in the prompt pass and every cached step, so it sees what
    it would alone. A row stops at a stop id or its budget (max_new_tokens, one for all or one per prompt, or
    what its context leaves); an empty prompt or one that fills the context gets no ids. A batch ends when
    every row has stopped."""
    context_len = model.config.max_position_embeddings
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else max_new_tokens
    budgets = [
        min(limit, context_len - len(prompt)) if prompt else 0
        for prompt, limit in zip(prompts, limits, strict=True)
    ]
    order = sorted(
        (index for index, budget in enumerate(budgets) if budget > 0), key=lambda i: len(prompts[i])
    )
    outputs: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        new_ids = _decode_left_padded(
            model,
            [prompts[row] for row in rows],
            [budgets[row] for row in rows],
            stop_ids,
            temperature,
            top_p,
            generator,
        )
        for row, ids in zip(rows, new_ids, strict=True):
            outputs[row] = ids
    return outputs


def _decode_left_padded(
    model: torch.nn.Module,
    prompts: list[list[int]],
    budgets: list[int],
    stop_ids: set[int],
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
) -> list[list[int]]:
    device = next(model.parameters()).device
    width = max(len(prompt) for prompt in prompts)
    padding = [width - len(prompt) for prompt in prompts]
    input_ids = torch.tensor(
        [[0] * pad + prompt for pad, prompt in zip(padding, prompts, strict=True)], device=device
    )
    real = torch.tensor([[0] * pad + [1] * (width - pad) for pad in padding], device=device)
    positions = (real.cumsum(dim=1) - 1).clamp(min=0)  # each row's own 0, 1, ... from its first real token
    padded = any(padding)  # unpadded rows take the plain causal path, exactly as one prompt alone does
    kv_cache = KVCache(max_len=width + max(budgets))
    new_ids: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    for _ in range(max(budgets)):
        mask = real if padded else None
        hidden = model(
            input_ids, position_ids=positions, kv_cache=kv_cache, attention_mask=mask, return_hidden=True
        )
        logits = model.output_logits(hidden[:, -1])  # the last positions' only: no [B, T, vocab] logits
        if temperature == 0.0:
            next_ids = logits.argmax(dim=-1).tolist()
        else:
            next_ids = [sample_next_token(row, temperature, top_p, generator) for row in logits]
        for row, token in enumerate(next_ids):
            if not finished[row]:
                new_ids[row].append(token)
                finished[row] = token in stop_ids or len(new_ids[row]) == budgets[row]
        if all(finished):
            break
        input_ids = torch.tensor(next_ids, device=device)[:, None]
        positions = positions[:, -1:] + 1
        real = torch.cat([real, real.new_ones(len(prompts), 1)], dim=1)
    return new_ids
