"""Packing and length grouping: every example exactly once, bins within capacity, dense, deterministic."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sft.data.packing import best_fit_decreasing, group_by_length, packing_efficiency


def log_normal_lengths(count: int, seed: int = 0) -> np.ndarray:
    """A wide spread like real chat data: short replies to long documents, 20..2000 tokens."""
    rng = np.random.default_rng(seed)
    return np.clip(np.exp(rng.normal(np.log(300), 1.0, count)), 20, 2000).astype(np.int64)


def reference_best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """The textbook O(n * bins) version: scan every bin for the tightest fit, oldest bin on ties."""
    rooms: list[int] = []
    bins: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [b for b, room in enumerate(rooms) if room >= lengths[index]]
        if fits:
            target = min(fits, key=lambda b: (rooms[b], b))
        else:
            target = len(rooms)
            rooms.append(capacity)
            bins.append([])
        rooms[target] -= lengths[index]
        bins[target].append(index)
    return [sorted(b) for b in bins]


def assert_valid_packing(lengths: np.ndarray, bins: list[np.ndarray], capacity: int) -> None:
    placed = np.concatenate(bins) if bins else np.array([], dtype=np.int64)
    assert sorted(placed.tolist()) == list(range(len(lengths)))
    assert all(lengths[b].sum() <= capacity for b in bins)
    assert all(len(b) > 0 for b in bins)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 64), max_size=60), st.integers(64, 100))
def test_matches_the_textbook_algorithm(raw_lengths, capacity):
    lengths = np.array(raw_lengths, dtype=np.int64)
    bins = best_fit_decreasing(lengths, capacity)
    assert_valid_packing(lengths, bins, capacity)
    assert [b.tolist() for b in bins] == reference_best_fit_decreasing(lengths, capacity)


def test_dense_on_a_wide_length_spread_and_deterministic():
    lengths = log_normal_lengths(20_000)
    bins = best_fit_decreasing(lengths, 4096)
    assert_valid_packing(lengths, bins, 4096)
    assert packing_efficiency(lengths, bins, 4096) > 0.95
    again = best_fit_decreasing(lengths.copy(), 4096)
    assert all(np.array_equal(a, b) for a, b in zip(bins, again, strict=True))


def test_million_examples_speed():
    lengths = log_normal_lengths(1_000_000, seed=1)
    started = time.perf_counter()
    bins = best_fit_decreasing(lengths, 4096)
    elapsed = time.perf_counter() - started
    efficiency = packing_efficiency(lengths, bins, 4096)
    print(
        f"best_fit_decreasing: 1M examples -> {len(bins)} bins in {elapsed:.2f}s, efficiency {efficiency:.4f}"
    )
    assert sum(len(b) for b in bins) == len(lengths)


def test_too_long_example_is_an_error():
    with pytest.raises(ValueError, match="example 1 has 513 tokens"):
        best_fit_decreasing(np.array([10, 513, 5]), 512)


def test_edge_cases():
    assert best_fit_decreasing(np.array([], dtype=np.int64), 8) == []
    assert packing_efficiency(np.array([]), [], 8) == 0.0
    bins = best_fit_decreasing(np.array([8, 8, 4, 4]), 8)
    assert [b.tolist() for b in bins] == [[0], [1], [2, 3]]
    assert packing_efficiency(np.array([8, 8, 4, 4]), bins, 8) == 1.0


@pytest.mark.parametrize("count", [0, 1, 7, 1000, 1003])
def test_group_by_length_covers_every_example_once(count):
    lengths = log_normal_lengths(count)
    batches = group_by_length(lengths, batch_size=8, seed=3, epoch=0)
    assert sorted(np.concatenate(batches).tolist() if batches else []) == list(range(count))
    assert sum(len(b) < 8 for b in batches) <= 1
    assert all(np.all(np.diff(lengths[b]) <= 0) for b in batches)


def test_group_by_length_is_deterministic_in_seed_and_epoch_and_groups_lengths():
    lengths = log_normal_lengths(4000)

    def plan(seed: int, epoch: int) -> list[list[int]]:
        return [b.tolist() for b in group_by_length(lengths, 16, seed, epoch)]

    assert plan(0, 0) == plan(0, 0)
    assert plan(0, 1) != plan(0, 0) and plan(1, 0) != plan(0, 0)
    grouped_padding = sum(len(b) * lengths[b].max() for b in group_by_length(lengths, 16, 0, 0))
    shuffled = np.random.default_rng(0).permutation(len(lengths))
    random_padding = sum(16 * lengths[shuffled[i : i + 16]].max() for i in range(0, len(lengths), 16))
    assert grouped_padding < 0.6 * random_padding
