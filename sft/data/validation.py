"""Which examples a run validates on, shared by SFTDataModule and sft-eval (no torch, no Lightning).

The entries of `data.val`; else the embedded sample's held-out split (`data=sample`); else a seeded
`data.val_fraction` of the training examples, held out before mixing. sft-eval rebuilds exactly these from
a checkpoint's `data` section, so `sft-eval ckpt=...` scores what training's `val/loss` scored.

Each entry is read as its own stream, its conversations numbered from 0 as training numbers them in the
entry's own store: the number seeds the system-prompt draw (maybe_add_system_prompt). A held-out
conversation is named by (entry, record): the entry's place in `data.train` and the conversation's number
in it, so an entry listed twice is two entries, each with its own held-out conversations.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from sft.data.config import as_list
from sft.data.sample import generate_conversations
from sft.protocol.pipeline import Accounting, ConversationEncoder, EncodedExample, read_conversations
from sft.protocol.records import record_to_conversation
from sft.protocol.sources import resolve_source
from sft.protocol.types import Conversation, ProtocolError


def split_val(
    example_ids: np.ndarray, fraction: float, seed: int, conversations: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic held-out split (train, val) of `fraction` of the conversations: `conversations`
    gives each example's conversation (None: one each), so the per-turn rows of a split conversation, which
    share their history, are held out together and never straddle train and val."""
    if fraction <= 0:
        return example_ids, example_ids[:0]  # no copy of the ids: memory must not scale with the data twice
    if conversations is None:
        conversations = np.arange(len(example_ids))
    starts = np.r_[True, conversations[1:] != conversations[:-1]]  # a conversation's rows are consecutive
    count = int(np.count_nonzero(starts))
    held_conversation = np.zeros(count, dtype=bool)
    held_conversation[np.random.default_rng([seed, 0x5E1]).permutation(count)[: int(count * fraction)]] = True
    held_out = held_conversation[np.cumsum(starts) - 1]
    return example_ids[~held_out], example_ids[held_out]


def sample_val_conversations(count: int, seed: int) -> Iterator[Conversation]:
    """The embedded sample's held-out conversations, as training writes them to its val file."""
    for line, record in enumerate(generate_conversations(count, seed, split="val"), start=1):
        yield record_to_conversation(record, source="sample-val", line=line)


def entry_conversations(
    entry: str, fmt: str, columns: Mapping[str, str] | None
) -> Iterator[Conversation | ProtocolError]:
    """One data entry's conversations, read when iterated."""
    yield from read_conversations(resolve_source(entry), fmt, columns)


Streams = list[Iterable[Conversation | ProtocolError]]  # one per data entry


def validation_source(data: Mapping[str, Any], seed: int) -> tuple[Streams, str, float]:
    """(the conversations a run with this `data` section and `seed` validates from, one stream per entry,
    what they are, the fraction of them held out: 0 when all of them are validation data)."""
    fmt, columns = data.get("format", "auto"), data.get("columns")
    if val_files := as_list(data.get("val")):
        streams = [entry_conversations(entry, fmt, columns) for entry in val_files]
        return streams, ", ".join(val_files), 0.0
    if data.get("name", "sample") == "sample":
        description = f"sample held-out split (seed {seed}, {data['num_val']} conversations)"
        return [sample_val_conversations(data["num_val"], seed)], description, 0.0
    fraction = data.get("val_fraction") or 0.0
    if fraction <= 0:
        raise ValueError(
            "the run had no validation data (no data.val, data.val_fraction=0); give files: data.val=[...]"
        )
    train_files = as_list(data.get("train"))
    description = f"data.val_fraction={fraction} of {', '.join(train_files)} (seed {seed})"
    streams = [entry_conversations(entry, fmt, columns) for entry in train_files]
    return streams, description, fraction


def validation_examples(
    data: Mapping[str, Any], seed: int, encoder: ConversationEncoder, accounting: Accounting
) -> tuple[list[EncodedExample], str, set[tuple[int, int]] | None]:
    """(the validation examples of a run with this `data` section and `seed`, what they are, the (entry,
    record) of each held-out conversation: None when every conversation read is validation data), encoded
    in memory; `accounting` covers every line read (for a val_fraction split: the whole training data)."""
    streams, description, fraction = validation_source(data, seed)
    per_entry = [list(encoder.encode_conversations(stream, accounting)) for stream in streams]
    examples = [example for entry_examples in per_entry for example in entry_examples]
    if fraction <= 0:
        return examples, description, None
    entries = np.repeat(np.arange(len(per_entry)), [len(entry_examples) for entry_examples in per_entry])
    # Each entry's first example starts a conversation: the numbers are unique over the entries, as the
    # datamodule's StoreIndex makes them, so split_val draws the same conversations.
    first_rows = [example.split is None or example.split[0] == 1 for example in examples]
    _, held_out = split_val(np.arange(len(examples)), fraction, seed, np.cumsum(first_rows))
    records = {(int(entries[i]), examples[i].record) for i in held_out}
    return [examples[i] for i in held_out], description, records
