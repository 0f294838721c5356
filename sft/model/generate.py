"""Autoregressive decoding with a KV cache: one prefill pass over the prompt, then one token per step."""

from __future__ import annotations

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
    max_new_tokens = min(max_new_tokens, context_len - len(prompt_ids))
    device = next(model.parameters()).device
    kv_cache = KVCache(max_len=len(prompt_ids) + max_new_tokens)
    input_ids = torch.tensor([prompt_ids], device=device)  # the whole prompt first, then one token at a time
    new_ids: list[int] = []
    for _ in range(max_new_tokens):
        hidden = model(input_ids, kv_cache=kv_cache, return_hidden=True)
        logits = model.output_logits(hidden[0, -1])  # the last position's only: no [prompt, vocab] logits
        next_id = sample_next_token(logits, temperature, top_p, generator)
        new_ids.append(next_id)
        if next_id in stop_ids:
            break
        input_ids = torch.tensor([[next_id]], device=device)
    return new_ids
