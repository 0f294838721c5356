"""SFTDataModule: the protocol's stores as packed (or length-grouped, padded) batches, sharded and resumable.

Start-up is explicit: `prepared = prepare(config)` (sft.data.build: the tokenizer and the memory-mapped
stores, cached by content), then `SFTDataModule(config, prepared)` lays out the rows. Rows are fixed for the
run: with packing a row is a best-fit-decreasing bin of examples, otherwise one example; each epoch the
sampler deals out batches of rows in a seed-and-epoch-determined order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, Dataset

from sft.data.build import EmptyDataError, PreparedData
from sft.data.collate import collate_rows, packed_row, without_targets
from sft.data.packing import best_fit_decreasing, group_by_length, packing_efficiency
from sft.data.sampler import ResumableBatchSampler
from sft.data.store import TokenStore
from sft.data.units import PackingUnits, packing_units
from sft.data.validation import split_val

if TYPE_CHECKING:
    from sft.cli.schemas import PrepareConfig


class StoreIndex:
    """Several stores addressed by one global example id."""

    def __init__(self, stores: Sequence[TokenStore]):
        self.stores = list(stores)
        self.lengths = (
            np.concatenate([s.lengths for s in self.stores]) if self.stores else np.zeros(0, np.int64)
        )
        self.starts = np.cumsum([0] + [len(s) for s in self.stores])
        # Conversation numbers restart in each store: offset them so they are unique over all stores.
        counts = [int(s.conversations[-1]) + 1 if len(s) else 0 for s in self.stores]
        self.conversations = (
            np.concatenate(
                [s.conversations + first for s, first in zip(self.stores, np.cumsum([0, *counts]))]
            )
            if self.stores
            else np.zeros(0, np.int64)
        )

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, example_id: int) -> tuple[np.ndarray, np.ndarray]:
        source = int(np.searchsorted(self.starts, example_id, side="right")) - 1
        return self.stores[source][int(example_id - self.starts[source])]

    def records(self, example_ids: np.ndarray) -> set[tuple[int, int]]:
        """(store, record) of each example's conversation: its store's place in the list and its index in
        that store's input (TokenStore.records)."""
        sources = np.searchsorted(self.starts, example_ids, side="right") - 1
        return {
            (int(source), int(record))
            for source in np.unique(sources)
            for record in self.stores[source].records[example_ids[sources == source] - self.starts[source]]
        }


class RowDataset(Dataset):
    """Row r is the packing units `rows[r]` laid end to end (packing) or the single unit r (sft.data.units,
    sft.data.collate.packed_row): each unit is its own document, positions restarting at 0, so a row gives
    every example the losses it has alone."""

    def __init__(self, index: StoreIndex, units: PackingUnits, rows: list[np.ndarray] | None):
        self.index = index
        self.units = units
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.units)

    @property
    def example_ids(self) -> np.ndarray:
        """Every example of the rows (unit by unit: a conversation's rows are together)."""
        return self.units.members

    def row_units(self, row: int) -> np.ndarray:
        return self.rows[row] if self.rows is not None else np.array([row])

    def row_examples(self, row: int) -> np.ndarray:
        return np.concatenate([self.units.examples(unit) for unit in self.row_units(row)])

    def __getitem__(self, row: int) -> dict[str, np.ndarray]:
        return packed_row(
            [
                [self.index[int(example_id)] for example_id in self.units.examples(unit)]
                for unit in self.row_units(row)
            ]
        )


def rank_units(global_batches: list[np.ndarray], world_size: int, accumulation: int = 1) -> list[np.ndarray]:
    """Split each global batch (the rows of one optimizer step) into micro-batches, one per rank and
    accumulation step, laid out [micro0 rank0, micro0 rank1, ..., micro1 rank0, ...]: with the sampler's
    i ≡ rank (mod world) sharding, a step holds the same rows whether it is split by ranks, accumulation
    or batch size. A short last batch gets as many micro-batches per rank as it has rows for (Lightning
    steps after a partial accumulation window at the end of the epoch); one too small to give every rank
    a row is dropped."""
    units = []
    for rows in global_batches:
        micro_steps = min(accumulation, len(rows) // world_size)
        if micro_steps:
            units.extend(np.array_split(rows, micro_steps * world_size))
    return units


def validation_batches(row_count: int, batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """This rank's validation batches: every row once over all ranks (val loss is a global token mean), and
    the same number of batches on every rank (a sharded model's forward is a collective). A rank with one
    row fewer than the others gets the padding row `row_count` (see ZeroWeightPadded) in its place."""
    mine = list(range(rank, row_count, world_size))
    mine += [row_count] * (-(-row_count // world_size) - len(mine))
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


class ZeroWeightPadded(Dataset):
    """The rows of `dataset`, then one padding row: a copy of row 0 with no trained token (labels all
    IGNORE_INDEX), so it runs through the model like any row and adds nothing to the loss."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset) + 1

    def __getitem__(self, row: int) -> dict[str, np.ndarray]:
        if row < len(self.dataset):
            return self.dataset[row]
        return without_targets(self.dataset[0])


class PackedPlan:
    """Each epoch: shuffle the packed rows, cut them into global batches of batch_size × world_size ×
    accumulation rows, each split into micro-batches (a class, not a lambda: it pickles for spawned ranks)."""

    def __init__(self, row_count: int, batch_size: int, world_size: int, seed: int, accumulation: int = 1):
        self.row_count, self.batch_size, self.world_size, self.seed = row_count, batch_size, world_size, seed
        self.accumulation = accumulation

    def __call__(self, epoch: int) -> list[np.ndarray]:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.row_count)
        step = self.batch_size * self.world_size * self.accumulation
        global_batches = [order[i : i + step] for i in range(0, self.row_count, step)]
        return rank_units(global_batches, self.world_size, self.accumulation)


class LengthGroupedPlan:
    """Each epoch: global batches (batch_size × world_size × accumulation rows) of similar length, so little
    padding, in a seeded order, each split into micro-batches. The one short batch goes last: a partial
    accumulation window anywhere else would shift every later optimizer step."""

    def __init__(
        self, lengths: np.ndarray, batch_size: int, world_size: int, seed: int, accumulation: int = 1
    ):
        self.lengths, self.batch_size, self.world_size, self.seed = lengths, batch_size, world_size, seed
        self.accumulation = accumulation

    def __call__(self, epoch: int) -> list[np.ndarray]:
        step = self.batch_size * self.world_size * self.accumulation
        grouped = group_by_length(self.lengths, step, self.seed, epoch)
        global_batches = [rows for rows in grouped if len(rows) == step]
        global_batches += [rows for rows in grouped if len(rows) < step]
        return rank_units(global_batches, self.world_size, self.accumulation)


def mixed_example_ids(
    index: StoreIndex, example_ids: np.ndarray, weights: Sequence[float], seed: int
) -> np.ndarray:
    """Sample each source's examples (among `example_ids`, the training ones) with replacement so that the
    training set has the requested proportions, same total size, reproducibly."""
    if len(weights) != len(index.stores):
        raise ValueError(f"data.mix has {len(weights)} weights for {len(index.stores)} data.train files")
    proportions = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    counts = np.floor(proportions * len(example_ids)).astype(np.int64)
    source_of = np.searchsorted(index.starts, example_ids, side="right") - 1
    rng = np.random.default_rng([seed, 0x6D1C])
    drawn = []
    for source, count in enumerate(counts):
        candidates = example_ids[source_of == source]
        if count > 0 and len(candidates) == 0:
            raise ValueError(
                f"data.mix gives data.train[{source}] weight {weights[source]} but it has no examples"
            )
        if count > 0:
            drawn.append(rng.choice(candidates, size=count))
    return np.concatenate(drawn)


class SFTDataModule(L.LightningDataModule):
    """Batches of the prepared stores' rows. `config` gives `data`, `protocol.max_seq_len` and `seed`."""

    def __init__(self, config: PrepareConfig, prepared: PreparedData):
        super().__init__()
        self.data_config = config.data
        self.max_seq_len = config.protocol.max_seq_len
        self.seed = config.seed
        self.packing_efficiency: float | None = None
        self._train_sampler: ResumableBatchSampler | None = None
        self._pending_sampler_state: dict[str, Any] | None = None
        self._consumed = (0, 0)  # (epoch, training batches handed to the model in it)
        train_index = StoreIndex(prepared.train)
        train_ids = np.arange(len(train_index))
        if prepared.val:
            val_index = StoreIndex(prepared.val)
            val_ids = np.arange(len(val_index))
        else:  # held out before mixing, so that no drawn duplicate of a val example lands in training
            train_ids, val_ids = split_val(
                train_ids, self.data_config.val_fraction, self.seed, train_index.conversations
            )
            val_index = train_index
        if self.data_config.mix is not None:
            train_ids = mixed_example_ids(train_index, train_ids, self.data_config.mix, self.seed)
        if len(train_ids) == 0:
            raise EmptyDataError(
                "no training examples left after preparation:\n" + prepared.accounting.summary()
            )
        self.train_dataset = self._rows(train_index, train_ids)
        self.val_dataset = self._rows(val_index, val_ids) if len(val_ids) else None

    def held_out_records(self) -> set[tuple[int, int]]:
        """(entry, record) of each conversation data.val_fraction held out of data.train, named as
        sft.data.validation names them, from the stores: generation during training reads them from the
        files without encoding the training data again."""
        if self.val_dataset is None:
            return set()
        return self.val_dataset.index.records(self.val_dataset.example_ids)

    def _rows(self, index: StoreIndex, example_ids: np.ndarray) -> RowDataset:
        units = packing_units(index, example_ids, self.max_seq_len, self.data_config.prefix_sharing)
        if not self.data_config.packing:
            return RowDataset(index, units, None)
        bins = best_fit_decreasing(units.lengths, self.max_seq_len)
        if self.packing_efficiency is None:  # the training rows' figure
            self.packing_efficiency = packing_efficiency(units.lengths, bins, self.max_seq_len)
        return RowDataset(index, units, bins)

    def _plan(self, dataset: RowDataset, world_size: int, accumulation: int = 1):
        batch_size = self.data_config.batch_size
        if dataset.rows is not None:
            return PackedPlan(len(dataset), batch_size, world_size, self.seed, accumulation)
        return LengthGroupedPlan(dataset.units.lengths, batch_size, world_size, self.seed, accumulation)

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        rank, world_size = self._world()
        # Optimizer steps, not micro-batches, are what the plan must keep equal across batch size × ranks ×
        # accumulation.
        accumulation = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        self._train_sampler = ResumableBatchSampler(
            self._plan(self.train_dataset, world_size, accumulation),
            seed=self.seed,
            rank=rank,
            world_size=world_size,
        )
        if self._pending_sampler_state is not None:
            self._train_sampler.load_state_dict(self._pending_sampler_state)
            self._pending_sampler_state = None
        return DataLoader(
            self.train_dataset,
            batch_sampler=self._train_sampler,
            collate_fn=collate_rows,
            num_workers=self.data_config.num_workers,
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None:
            return []
        rank, world_size = self._world()
        batches = validation_batches(len(self.val_dataset), self.data_config.batch_size, rank, world_size)
        return DataLoader(ZeroWeightPadded(self.val_dataset), batch_sampler=batches, collate_fn=collate_rows)

    # ---- resume --------------------------------------------------------------------------------------
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count the training batches handed to the model: the sampler runs ahead of training (Lightning
        fetches one batch early, workers prefetch), and a resume must start at the first one not trained."""
        if self.trainer is not None and self.trainer.training:
            epoch, consumed = self._consumed
            current = self.trainer.current_epoch
            self._consumed = (current, consumed + 1 if epoch == current else 1)
        return batch

    def state_dict(self) -> dict[str, Any]:
        if self._train_sampler is None:
            return {}
        epoch, consumed = self._consumed
        return {"sampler": {**self._train_sampler.state_dict(), "epoch": epoch, "batches_consumed": consumed}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("sampler")
        if state is not None:
            self._pending_sampler_state = state
            self._consumed = (state["epoch"], state["batches_consumed"])
