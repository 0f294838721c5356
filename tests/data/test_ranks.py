"""Who prepares which data entry when every rank of a job prepares, and one builder per artifact."""

from __future__ import annotations

import functools
import os
import threading
import time
from pathlib import Path

import pytest

from sft.data.ranks import (
    PrepareRanks,
    artifact_lock,
    assign_entries,
    prepare_in_turn,
    prepare_on_local_ranks,
)


@pytest.mark.parametrize(
    "environment, per_node, expected",
    [
        ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, False, (3, 4)),
        ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, True, (1, 2)),
        (
            {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "4"},
            False,
            (5, 8),
        ),
        (
            {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "4"},
            True,
            (1, 4),
        ),
        ({"RANK": "0", "WORLD_SIZE": "1"}, False, (0, 1)),
        ({}, True, (0, 1)),
    ],
)
def test_ranks_come_from_the_launcher_environment(monkeypatch, environment, per_node, expected):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS",
                 "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    ranks = PrepareRanks.from_environment(per_node)
    assert (ranks.rank, ranks.world_size, ranks.per_node) == (*expected, per_node)


def test_entries_are_balanced_by_size_the_same_way_on_every_rank():
    sizes = [10, 80, 30, 30, 5, 45]
    owners = assign_entries(sizes, 2)
    assert owners == assign_entries(list(sizes), 2)
    loads = [sum(size for size, owner in zip(sizes, owners, strict=True) if owner == rank) for rank in (0, 1)]
    assert sum(loads) == sum(sizes) and max(loads) - min(loads) <= max(sizes)
    assert assign_entries(sizes, 1) == [0] * len(sizes)
    assert sorted(set(assign_entries([1] * 3, 5))) == [0, 1, 2]  # more ranks than entries: some idle


def test_one_builder_per_artifact_and_different_artifacts_in_parallel(tmp_path):
    store = tmp_path / "stores" / "key-a"
    finished = {"same": threading.Event(), "other": threading.Event()}

    def builder(path, done):
        with artifact_lock(path):
            done.set()

    with artifact_lock(store):
        same = threading.Thread(target=builder, args=(store, finished["same"]))
        other = threading.Thread(target=builder, args=(tmp_path / "stores" / "key-b", finished["other"]))
        same.start(), other.start()
        assert finished["other"].wait(5)
        assert not finished["same"].wait(0.3)
    same.join(5)
    assert finished["same"].is_set()


def test_each_entry_is_built_once_by_its_owner_and_every_rank_gets_all_in_order(tmp_path):
    entries, sizes = ["a", "b", "c", "d", "a"], [5, 40, 10, 30, 5]
    cache: dict[str, str] = {}
    builders: list[tuple[int, str]] = []

    def builder(rank):
        def build(entry):
            if entry not in cache:  # a cache miss: encode (slowly) and publish
                builders.append((rank, entry))
                time.sleep(0.05)
                cache[entry] = entry.upper()
            return cache[entry]

        return build

    results = {}

    def run(rank):
        results[rank] = prepare_in_turn(entries, sizes, builder(rank), PrepareRanks(rank, 2), tmp_path)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert results[0] == results[1] == ["A", "B", "C", "D", "A"]
    assert sorted(entry for _, entry in builders) == ["a", "b", "c", "d"]  # each once, "a" listed twice
    owners = dict(zip("abcd", assign_entries(sizes[:4], 2), strict=True))
    assert all(owners[entry] == rank for rank, entry in builders), (builders, owners)


ENTRIES, SIZES = ["a", "b", "c", "d", "e", "f"], [60, 50, 40, 30, 20, 10]


def build_in_cache(cache: Path, rank: int, entry: str) -> str:
    """A store build: a cache miss writes `entry` (who built it, and when), a hit only reads it."""
    path = cache / entry
    if not path.exists():
        started = time.monotonic()
        time.sleep(0.2)
        path.write_text(f"{rank} {os.getpid()} {started} {time.monotonic()}")
    return path.read_text()


def prepare_share(cache: Path, ranks: PrepareRanks, ready) -> list[str]:
    if ranks.rank > 0:
        time.sleep(1.0)  # a helper starts late (imports): rank 0 would be done with its share by now
    build = functools.partial(build_in_cache, cache, ranks.rank)
    return prepare_in_turn(ENTRIES, SIZES, build, ranks, cache / "locks", ready)


def test_local_ranks_prepare_their_shares_at_once_in_separate_processes(tmp_path):
    """Every rank takes its locks before any builds, so a late helper's entries are never taken by rank 0,
    and the two shares are built at the same time, each in its own process."""
    built = prepare_on_local_ranks(functools.partial(prepare_share, tmp_path), 2)
    records = [record.split() for record in built]
    owners = assign_entries(SIZES, 2)
    assert [int(record[0]) for record in records] == owners
    pids = [
        {record[1] for record, owner in zip(records, owners, strict=True) if owner == rank} for rank in (0, 1)
    ]
    assert pids[0] == {str(os.getpid())} and len(pids[1]) == 1 and pids[1] != pids[0]
    shares = [
        [record for record, owner in zip(records, owners, strict=True) if owner == rank] for rank in (0, 1)
    ]
    first_starts = [min(float(record[2]) for record in share) for share in shares]
    last_ends = [max(float(record[3]) for record in share) for share in shares]
    assert max(first_starts) < min(last_ends)  # the two shares were being built at the same time
