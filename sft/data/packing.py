"""Which examples share a row: best-fit-decreasing packing, or length-grouped batches when not packing.

Both work on the store's `lengths` alone and return batches of example indices, so they are cheap to
recompute and need no torch (`sft-prepare` can report packing efficiency).
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, insort

import numpy as np


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[np.ndarray]:
    """Pack examples into bins of `capacity` tokens: longest first, each into the fullest bin it fits.

    Returns bins in creation order, each an int64 array of example indices (ascending). Deterministic: equal
    lengths are placed in index order, and among equally full bins the oldest wins. O(n log n): bins are
    bucketed by remaining room, and a sorted list of the distinct non-empty rooms (at most `capacity` + 1
    values) finds the tightest fit by bisection instead of scanning bins.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) == 0:
        return []
    if lengths.min() < 0:
        raise ValueError("example lengths must be non-negative")
    if lengths.max() > capacity:
        longest = int(lengths.argmax())
        raise ValueError(
            f"example {longest} has {lengths[longest]} tokens, more than the packing capacity {capacity}; "
            "truncate examples to at most the row length (protocol.max_seq_len)"
        )
    order = np.argsort(-lengths, kind="stable")
    sorted_lengths = lengths[order].tolist()
    # Bins with less room than the shortest example can never be used again: they leave the index.
    smallest = sorted_lengths[-1]
    rooms: list[int] = []  # sorted distinct remaining capacities that have at least one open bin
    bins_by_room: dict[int, list[int]] = {}  # room -> min-heap of bin ids
    bin_of_placement = np.empty(len(order), dtype=np.int64)
    bin_count = 0
    for placement, length in enumerate(sorted_lengths):
        position = bisect_left(rooms, length)
        if position == len(rooms):
            bin_id, room = bin_count, capacity
            bin_count += 1
        else:
            room = rooms[position]
            heap = bins_by_room[room]
            bin_id = heapq.heappop(heap)
            if not heap:
                del bins_by_room[room]
                rooms.pop(position)
        bin_of_placement[placement] = bin_id
        room -= length
        if room >= smallest:
            if room not in bins_by_room:
                bins_by_room[room] = []
                insort(rooms, room)
            heapq.heappush(bins_by_room[room], bin_id)
    # Group example indices by bin (ascending index within a bin) without a Python list per bin.
    grouped = np.lexsort((order, bin_of_placement))
    boundaries = np.flatnonzero(np.diff(bin_of_placement[grouped])) + 1
    return np.split(order[grouped], boundaries)


def packing_efficiency(lengths: np.ndarray, bins: list[np.ndarray], capacity: int) -> float:
    """Real tokens / (bins × capacity): the share of packed rows that is not padding. `lengths` are those
    packed: per packing unit (sft.data.units), so a split conversation's real tokens are its tree's nodes
    (what is computed), not its rows' tokens."""
    if not bins:
        return 0.0
    lengths = np.asarray(lengths, dtype=np.int64)
    real_tokens = int(lengths[np.concatenate(bins)].sum())
    return real_tokens / (len(bins) * capacity)


def group_by_length(
    lengths: np.ndarray, batch_size: int, seed: int, epoch: int, mega_batch_factor: int = 50
) -> list[np.ndarray]:
    """Batches of similar-length examples, so padding wastes little, in an order still random per step.

    Shuffle, cut into mega-batches of `mega_batch_factor * batch_size`, sort each by length (longest first),
    split into batches, shuffle the batches. The last batch may be short. Deterministic in (seed, epoch).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    rng = np.random.default_rng([seed, epoch])
    permutation = rng.permutation(len(lengths))
    mega_batch = mega_batch_factor * batch_size
    batches: list[np.ndarray] = []
    for start in range(0, len(permutation), mega_batch):
        chunk = permutation[start : start + mega_batch]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]
