"""A distributed batch sampler that resumes mid-epoch exactly where an uninterrupted run would be.

A *unit* is one batch's list of dataset indices. Each epoch a plan (a function of the epoch alone, e.g.
seeded by `[seed, epoch]`: sft.data.datamodule's PackedPlan and LengthGroupedPlan) lays out the units in
order, so every rank computes the same global order without communicating, and rank r takes units r,
r + W, r + 2W, ...

Uneven tails are padded by repeating units from the start of the epoch's order (as `DistributedSampler`
does), so every unit is seen each epoch and all ranks step the same number of times.

Resume state is rank-independent: the epoch and the number of batches each rank has consumed in it (the
same on every rank, the trainer's batch index), which is all Lightning keeps from one rank's checkpoint.
`state_dict()` reports what `__iter__` has yielded; with prefetching (DataLoader workers, Lightning's
one-batch look-ahead) that runs ahead of training, so the owner overwrites `batches_consumed` with the
trainer's count before saving.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Sampler

Units = Sequence[Sequence[int] | np.ndarray]


class ResumableBatchSampler(Sampler[list[int]]):
    """Yields this rank's share of each epoch's units; use as `DataLoader(batch_sampler=...)`.

    `units` is a fixed list (e.g. packing bins) or a function `plan(epoch) -> units` (e.g. length-grouped
    batches re-drawn every epoch); a plan must be deterministic in its epoch.
    """

    def __init__(
        self,
        units: Units | Callable[[int], Units],
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        # A plain attribute, not a lambda over `units`: the sampler must pickle (ddp_spawn, workers).
        self._plan = units if callable(units) else None
        self._fixed_units = None if callable(units) else units
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self._resume_at = 0  # batches to skip at the start of the next __iter__ (set by load_state_dict)
        self._yielded = 0  # batches of this epoch handed out so far, counting skipped ones
        self._planned: tuple[int, Units] | None = None

    def _units(self) -> Units:
        """The current epoch's units, planned once per epoch (a plan may be costly, len() asks too)."""
        if self._plan is None:
            return self._fixed_units
        if self._planned is None or self._planned[0] != self.epoch:
            self._planned = (self.epoch, self._plan(self.epoch))
        return self._planned[1]

    def _global_order(self, unit_count: int) -> np.ndarray:
        """Unit indices in the epoch's order, padded to a multiple of the world size."""
        order = np.arange(unit_count)
        padding = -unit_count % self.world_size
        if padding and unit_count:
            order = np.concatenate([order, np.resize(order, padding)])
        return order

    def __iter__(self) -> Iterator[list[int]]:
        units = self._units()
        mine = self._global_order(len(units))[self.rank :: self.world_size]
        start, self._resume_at = self._resume_at, 0
        self._yielded = start
        for unit_index in mine[start:]:
            self._yielded += 1
            yield np.asarray(units[unit_index]).tolist()

    def __len__(self) -> int:
        """Batches per rank in the whole current epoch (a resumed epoch yields only the rest)."""
        return -(-len(self._units()) // self.world_size)

    @property
    def sampler(self) -> ResumableBatchSampler:
        """Lightning calls `set_epoch` on `dataloader.sampler` and `dataloader.batch_sampler.sampler`, never
        on the batch sampler itself; this makes it reach us (without it every epoch replays epoch 0)."""
        return self

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this at every epoch start, also for the epoch a checkpoint resumes: same epoch,
        resume point kept; a new epoch starts from its first batch."""
        if epoch != self.epoch:
            self.epoch = epoch
            self._resume_at = 0
            self._yielded = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batches_consumed": self._yielded,
            "seed": self.seed,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next `__iter__` continue with the first batch not yet consumed."""
        for key in ("seed", "world_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"checkpoint's sampler has {key}={state[key]} but this run has {getattr(self, key)}; "
                    "an exact mid-epoch resume needs the same seed and number of ranks"
                )
        self.epoch = int(state["epoch"])
        self._resume_at = self._yielded = int(state["batches_consumed"])
        if self._resume_at > len(self):
            raise ValueError(f"cannot resume at batch {self._resume_at}: epoch has only {len(self)} per rank")
