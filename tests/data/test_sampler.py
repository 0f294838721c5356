"""ResumableBatchSampler: disjoint shards, an order fixed by (seed, epoch), exact mid-epoch resume."""

from __future__ import annotations

import itertools
import pickle
from functools import partial

import numpy as np
import pytest
from torch.utils.data import DataLoader

from sft.data.packing import group_by_length
from sft.data.sampler import ResumableBatchSampler


def make_units(count: int) -> list[np.ndarray]:
    """Units with distinct contents, so a repeat or a skip shows up as a changed list."""
    return [np.arange(3 * i, 3 * i + 1 + i % 3) for i in range(count)]


def epoch_batches(sampler: ResumableBatchSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("unit_count", [0, 1, 12, 13, 14])
def test_shards_are_disjoint_and_cover_the_epoch(world_size, unit_count):
    units = make_units(unit_count)
    ranks = [ResumableBatchSampler(units, seed=5, rank=r, world_size=world_size) for r in range(world_size)]
    shards = [[tuple(batch) for batch in epoch_batches(s, 1)] for s in ranks]
    per_rank = -(-unit_count // world_size)
    assert all(len(shard) == len(s) == per_rank for shard, s in zip(shards, ranks, strict=True))
    everything = list(itertools.chain(*shards))
    assert set(everything) == {tuple(u.tolist()) for u in units}
    # Only the padding repeats, and only units from the start of the epoch's order.
    assert len(everything) - len(set(everything)) == per_rank * world_size - unit_count


class ShuffledPlan:
    """A plan as the data module gives one: the epoch's order from (seed, epoch) alone."""

    def __init__(self, units, seed: int):
        self.units, self.seed = units, seed

    def __call__(self, epoch: int):
        return [self.units[i] for i in np.random.default_rng([self.seed, epoch]).permutation(len(self.units))]


def test_order_depends_only_on_the_plans_seed_and_epoch():
    units = make_units(50)
    first = ResumableBatchSampler(ShuffledPlan(units, 7), seed=7)
    second = ResumableBatchSampler(ShuffledPlan(units, 7), seed=7)
    list(second)  # a sampler's history does not matter
    assert epoch_batches(first, 3) == epoch_batches(second, 3)
    assert epoch_batches(first, 3) != epoch_batches(first, 4)
    assert epoch_batches(first, 3) != epoch_batches(ResumableBatchSampler(ShuffledPlan(units, 8), seed=8), 3)
    assert list(ResumableBatchSampler(units)) == [u.tolist() for u in units]  # fixed units: in order


def uninterrupted(make, epochs: int) -> list[list[int]]:
    sampler = make()
    return [batch for epoch in range(epochs) for batch in epoch_batches(sampler, epoch)]


@pytest.mark.parametrize("world_size", [1, 3])
def test_resume_from_any_batch_reproduces_the_rest_exactly(world_size):
    units = make_units(11)
    for rank in range(world_size):
        make = partial(ResumableBatchSampler, units, seed=2, rank=rank, world_size=world_size)
        expected = uninterrupted(make, epochs=3)
        per_epoch = len(make())
        for epoch, consumed in itertools.product(range(3), range(per_epoch + 1)):
            before = make()
            seen = [b for e in range(epoch) for b in epoch_batches(before, e)]
            before.set_epoch(epoch)
            seen += list(itertools.islice(iter(before), consumed))
            state = pickle.loads(pickle.dumps(before.state_dict()))  # as a checkpoint would carry it
            assert state["epoch"] == epoch and state["batches_consumed"] == consumed

            after = make()
            after.load_state_dict(state)
            after.set_epoch(epoch)  # Lightning re-announces the resumed epoch: the position must survive
            resumed = list(after)
            resumed += [b for e in range(epoch + 1, 3) for b in epoch_batches(after, e)]
            assert seen + resumed == expected, (rank, epoch, consumed)


def test_resume_with_a_per_epoch_plan_and_a_dataloader():
    lengths = np.random.default_rng(0).integers(1, 100, size=101)
    plan = partial(group_by_length, lengths, 4, 9)  # plan(epoch): length-grouped batches re-drawn each epoch
    make = partial(ResumableBatchSampler, plan, seed=9, rank=1, world_size=2)
    expected = uninterrupted(make, epochs=2)

    sampler = make()
    sampler.set_epoch(1)
    loader = DataLoader(range(len(lengths)), batch_sampler=sampler, num_workers=0)
    consumed = [batch.tolist() for batch in itertools.islice(loader, 5)]
    state = sampler.state_dict()
    assert state["batches_consumed"] == 5  # without workers the sampler is not ahead of the consumer

    resumed = make()
    resumed.load_state_dict(state)
    rest = [batch.tolist() for batch in DataLoader(range(len(lengths)), batch_sampler=resumed)]
    assert consumed + rest == expected[len(expected) // 2 :]


def test_owner_can_state_the_consumed_count_when_prefetching_ran_ahead():
    units = make_units(20)
    ahead = ResumableBatchSampler(units, seed=1)
    iterator = iter(ahead)
    taken = [next(iterator) for _ in range(6)]  # the loader fetched 6, training finished only 4
    state = {**ahead.state_dict(), "batches_consumed": 4}
    resumed = ResumableBatchSampler(units, seed=1)
    resumed.load_state_dict(state)
    assert taken[:4] + list(resumed) == list(ResumableBatchSampler(units, seed=1))


def test_resume_refuses_a_different_world_or_an_impossible_position():
    sampler = ResumableBatchSampler(make_units(10), world_size=2, rank=1)
    with pytest.raises(ValueError, match="world_size"):
        sampler.load_state_dict({"epoch": 0, "batches_consumed": 1, "world_size": 4})
    with pytest.raises(ValueError, match="seed"):
        sampler.load_state_dict({"epoch": 0, "batches_consumed": 1, "seed": 3})
    with pytest.raises(ValueError, match="only 5"):
        sampler.load_state_dict({"epoch": 0, "batches_consumed": 6})
    with pytest.raises(ValueError, match="rank"):
        ResumableBatchSampler(make_units(3), rank=2, world_size=2)


def test_sampler_pickles_for_spawned_processes():
    sampler = ResumableBatchSampler(make_units(9), seed=4, world_size=2)
    assert list(pickle.loads(pickle.dumps(sampler))) == list(sampler)
