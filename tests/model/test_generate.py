"""generate: KV-cached decoding equals naive re-running, stop ids, greedy and seeded sampling."""

from __future__ import annotations

import torch

from sft.model.generate import generate
from sft.model.llama import LlamaForCausalLM
from tests.helpers import tiny_decoder as tiny_model

PROMPT = [5, 17, 3, 42, 8]


def naive_greedy(model: LlamaForCausalLM, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding that re-runs the whole sequence every step: no cache to get wrong."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def test_greedy_with_cache_equals_naive_greedy():
    model = tiny_model()
    expected = naive_greedy(model, PROMPT, 12)
    assert generate(model, PROMPT, 12, stop_ids=set()) == expected
    assert generate(model, PROMPT, 12, stop_ids=set()) == expected  # deterministic


def test_stops_after_the_first_stop_id_and_includes_it():
    model = tiny_model()
    free_run = generate(model, PROMPT, 12, stop_ids=set())
    stop_id = free_run[3]
    first = free_run.index(stop_id)
    assert generate(model, PROMPT, 12, stop_ids={stop_id, 10_000}) == free_run[: first + 1]


def test_generation_ends_at_the_context_length():
    model = tiny_model()
    prompt = list(range(35))
    assert len(generate(model, prompt, 100, stop_ids=set())) == 40 - 35


def test_sampling_is_reproducible_with_a_seeded_generator():
    model = tiny_model()

    def sample(seed: int, top_p: float) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        return generate(model, PROMPT, 16, set(), temperature=1.5, top_p=top_p, generator=generator)

    assert sample(1, 0.9) == sample(1, 0.9)
    assert sample(1, 1.0) != sample(2, 1.0)  # 16 draws at a high temperature: a collision is negligible
    # A nucleus smaller than any one token's probability keeps only the most likely token: greedy.
    assert sample(3, 1e-6) == generate(model, PROMPT, 16, set())
