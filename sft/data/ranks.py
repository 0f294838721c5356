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
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# (rank, world size) variables of the launchers, in order of preference: torchrun, then SLURM's srun.
_GLOBAL = (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS"))
_LOCAL = (("LOCAL_RANK", "LOCAL_WORLD_SIZE"), ("SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"))


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


@contextmanager
def artifact_lock(path: Path) -> Iterator[None]:
    """Hold `<path>.lock` exclusively: one process builds a given tokenizer or store at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
