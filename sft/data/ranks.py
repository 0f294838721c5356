"""Preparation on every rank of a job: who prepares which data entry, and one preparer per artifact.

When a job's ranks all start `prepare` together (torchrun, srun: RANK / WORLD_SIZE or SLURM_PROCID /
SLURM_NTASKS in the environment), each rank encodes its share of the data entries (balanced by size, the
same on every rank) while the others do theirs; then every rank opens every store from the cache, in input
order, so rows, order and accounting are those of one process. Each tokenizer or store is built under its
own file lock: a rank that needs an artifact another rank is building waits for it, then opens it; one
that finds it missing after the lock (its builder failed) builds it itself and meets the same error.
A `tokenizer=bpe` run thus trains its tokenizer once, on the first rank to get there.

With a shared cache (data.prepare_per_node=false) the entries are split over all ranks of the job; by
default each node prepares every entry itself, split over its own ranks (Lightning's
`prepare_data_per_node`), since nodes need not share a filesystem. No torch here.

When Lightning itself starts the ranks (`hardware=ddp_cpu`, `ddp`, `fsdp` from one command), they do not
exist yet when the data is prepared (the tokenizer must exist before the model), so `prepare_on_local_ranks`
starts that many preparers on the node at once, the same shares as the ranks would take.
"""

from __future__ import annotations

import fcntl
import hashlib
import multiprocessing
import os
import queue
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

# (rank, world size) variables of the launchers, in order of preference: torchrun, then SLURM's srun.
_GLOBAL = (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS"))
_LOCAL = (("LOCAL_RANK", "LOCAL_WORLD_SIZE"), ("SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"))
T = TypeVar("T")
Ready = Callable[[], None]


@dataclass(frozen=True)
class PrepareRanks:
    """The preparers this process shares the data entries with: it is number `rank` of `world_size`."""

    rank: int = 0
    world_size: int = 1
    per_node: bool = True

    @classmethod
    def from_environment(cls, per_node: bool = True) -> PrepareRanks:
        """This process's place among the job's ranks as its launcher set it (one rank when none did)."""
        for rank_name, size_name in _LOCAL if per_node else _GLOBAL:
            rank, size = os.environ.get(rank_name), os.environ.get(size_name)
            if rank is not None and size is not None and size.isdigit() and int(size) > 1:
                return cls(int(rank), int(size), per_node)
        return cls(0, 1, per_node)

    @staticmethod
    def launched() -> bool:
        """Whether a launcher started this process as one rank of a job (torchrun, srun, or Lightning's own
        re-launch of the command for its other ranks, which sets LOCAL_RANK alone)."""
        return any(name in os.environ for pair in (*_GLOBAL, *_LOCAL) for name in pair)

    def describe(self, mine: int, total: int) -> str:
        scope = "on this node" if self.per_node else "in the job (shared cache)"
        return (
            f"preparing {mine} of {total} data entries on rank {self.rank} of {self.world_size} {scope}; "
            f"data.prepare_per_node={str(self.per_node).lower()}"
        )


def assign_entries(sizes: Sequence[int], world_size: int) -> list[int]:
    """The rank that prepares each entry: largest first, each to the least loaded rank so far (ties to
    the lowest rank). Depends only on the sizes, so every rank computes the same assignment."""
    loads = [0] * world_size
    owners = [0] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        owner = min(range(world_size), key=lambda rank: (loads[rank], rank))
        owners[index] = owner
        loads[owner] += sizes[index]
    return owners


class ArtifactLock:
    """`<path>.lock` held exclusively: one process builds a given tokenizer or store at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path.with_name(f".{path.name}.lock")
        self._handle = None

    def acquire(self) -> ArtifactLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "a")
        fcntl.flock(self._handle, fcntl.LOCK_EX)
        return self

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


@contextmanager
def artifact_lock(path: Path) -> Iterator[None]:
    lock = ArtifactLock(path).acquire()
    try:
        yield
    finally:
        lock.release()


def entry_lock_path(lock_dir: Path, entry: str) -> Path:
    return lock_dir / hashlib.sha256(entry.encode()).hexdigest()[:32]


def prepare_in_turn(
    entries: Sequence[str],
    sizes: Sequence[int],
    build: Callable[[str], T],
    ranks: PrepareRanks,
    lock_dir: Path | None,
    ready: Ready | None = None,
) -> list[T]:
    """`build(entry)` of every entry, in order: first this rank's share, each under its entry's lock (all
    taken up front, so that the other ranks wait for them rather than duplicate them), then every entry
    under its lock again: a store another rank built is only opened; one whose builder failed is built
    here and fails the same way. On one rank this is simply every entry in order; `lock_dir` None (a
    read-only cache, where nothing is built, only opened) takes no locks and has no shares: every rank
    opens every entry. `ready()`, called once this rank holds its locks, returns when every rank does
    (prepare_on_local_ranks), so none takes another's entry first."""
    unique = dict(zip(entries, sizes, strict=True))  # an entry listed twice is built once, by one owner
    owners = assign_entries(list(unique.values()), ranks.world_size)
    built: dict[str, T] = {}
    if ranks.world_size > 1 and lock_dir is not None:
        mine = [entry for entry, owner in zip(unique, owners, strict=True) if owner == ranks.rank]
        print(f"sft: {ranks.describe(len(mine), len(unique))}", file=sys.stderr)
        locks = [ArtifactLock(entry_lock_path(lock_dir, entry)).acquire() for entry in mine]
        try:
            if ready is not None:
                ready()
            for entry, lock in zip(mine, locks, strict=True):
                built[entry] = build(entry)
                lock.release()
        finally:
            for lock in locks:
                lock.release()
    for entry in entries:
        if entry not in built:
            with artifact_lock(entry_lock_path(lock_dir, entry)) if lock_dir else nullcontext():
                built[entry] = build(entry)
    return [built[entry] for entry in entries]


def prepare_on_local_ranks(work: Callable[[PrepareRanks, Ready], T], count: int, per_node: bool = True) -> T:
    """`work(ranks, ready)` on `count` processes of this node at once, as the ranks Lightning is about to
    start would run it: this process as rank 0 and `count - 1` spawned helpers (`work` must pickle). Each
    calls `ready()` once it holds its entries' locks; rank 0 lets all go on when every helper has (or one
    died: its entries are then built by whoever reaches them). Returns rank 0's result."""
    context = multiprocessing.get_context("spawn")  # not fork: the tokenizer's threads may be running
    locked, go = context.Queue(), context.Event()
    helpers = [
        context.Process(
            target=_helper, args=(work, PrepareRanks(rank, count, per_node), locked, go), daemon=True
        )
        for rank in range(1, count)
    ]
    for helper in helpers:
        helper.start()

    def all_locked() -> None:
        waiting = len(helpers)
        while waiting:
            try:
                locked.get(timeout=0.1)
                waiting -= 1
            except queue.Empty:
                if any(helper.exitcode is not None for helper in helpers):
                    break
        go.set()

    try:
        return work(PrepareRanks(0, count, per_node), all_locked)
    finally:
        go.set()
        for helper in helpers:
            helper.join()


def _helper(work: Callable[[PrepareRanks, Ready], object], ranks: PrepareRanks, locked, go) -> None:
    def ready() -> None:
        locked.put(ranks.rank)
        go.wait()

    work(ranks, ready)
