"""SFTDataModule: packing is invisible, shards are disjoint and complete, resume is exact, mixing and
held-out splits are reproducible."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import asdict
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

from sft.cli.schemas import PrepareConfig
from sft.config import load_config
from sft.data.build import prepare
from sft.data.datamodule import SFTDataModule
from sft.data.sampler import ResumableBatchSampler
from sft.data.validation import validation_examples
from sft.module import SFTModule
from sft.protocol.labels import IGNORE_INDEX
from sft.protocol.pipeline import Accounting, ConversationEncoder
from tests.helpers import TINY_MODEL


def write_conversations(path, count: int, tag: str) -> str:
    with open(path, "w") as handle:
        for i in range(count):
            turns = [{"role": "system", "content": f"{tag} system {i % 3}"}]
            for turn in range(1 + i % 3):
                turns.append({"role": "user", "content": f"{tag} question {i} {turn} " + "x " * (i % 11)})
                turns.append({"role": "assistant", "content": f"{tag} answer {i}-{turn}" + " y" * (i % 7)})
            handle.write(json.dumps({"messages": turns}) + "\n")
    return str(path)


def make_config(tmp_path, files, **data) -> PrepareConfig:
    return load_config(
        {
            "seed": 7,
            "tokenizer": {"name": "bpe", "vocab_size": 300, "path": None},
            "template": {"name": "chatml"},
            "protocol": {"max_seq_len": 256, "seed": 7},
            "data": {
                "name": "jsonl",
                "train": files,
                "val": None,
                "format": "auto",
                "mix": None,
                "val_fraction": 0.0,
                "batch_size": 3,
                "packing": True,
                "num_workers": 0,
                "cache_dir": str(tmp_path / "cache"),
                **data,
            },
        },
        PrepareConfig,
    )


@pytest.fixture
def two_files(tmp_path):
    return [
        write_conversations(tmp_path / "a.jsonl", 40, "alpha"),
        write_conversations(tmp_path / "b.jsonl", 20, "beta"),
    ]


def setup_module_for(config) -> SFTDataModule:
    return SFTDataModule(config, prepare(config))


def examples_of(dataset) -> dict[int, tuple]:
    """{example id: (ids, labels, positions)} reconstructed from the rows a dataset yields."""
    found = {}
    for row in range(len(dataset)):
        item = dataset[row]
        for document, example_id in enumerate(dataset.row_examples(row)):
            where = item["document_ids"] == document
            found[int(example_id)] = tuple(
                item[key][where].tolist() for key in ("input_ids", "labels", "position_ids")
            )
    return found


def test_packed_rows_hold_exactly_the_unpacked_examples(tmp_path, two_files):
    packed = setup_module_for(make_config(tmp_path, two_files, packing=True)).train_dataset
    unpacked = setup_module_for(make_config(tmp_path, two_files, packing=False)).train_dataset
    assert len(packed) < len(unpacked)
    assert examples_of(packed) == examples_of(unpacked)
    for ids, labels, positions in examples_of(packed).values():
        assert positions == list(range(len(ids)))
        assert labels[0] == IGNORE_INDEX  # the first token of an example is never a target
        assert any(label != IGNORE_INDEX for label in labels)


def test_packing_efficiency_is_reported(tmp_path, two_files):
    datamodule = setup_module_for(make_config(tmp_path, two_files))
    assert 0.5 < datamodule.packing_efficiency <= 1.0


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_rank_shards_are_disjoint_and_cover_the_epoch(tmp_path, two_files, packing, world_size):
    datamodule = setup_module_for(make_config(tmp_path, two_files, packing=packing, batch_size=2))
    dataset = datamodule.train_dataset
    seen = Counter()
    for rank in range(world_size):
        sampler = ResumableBatchSampler(
            datamodule._plan(dataset, world_size), seed=7, rank=rank, world_size=world_size
        )
        for batch in sampler:
            seen.update(batch)
    assert max(seen.values()) == 1
    # Only a tail too small to give every rank a row may be left out.
    assert len(dataset) - world_size < len(seen) <= len(dataset)


def test_global_batches_do_not_depend_on_the_number_of_ranks(tmp_path, two_files):
    """batch_size=4 on one process sees the same rows per step as batch_size=2 on each of two ranks."""
    one_rank = setup_module_for(make_config(tmp_path, two_files, batch_size=4))
    two_ranks = setup_module_for(make_config(tmp_path, two_files, batch_size=2))
    one = one_rank._plan(one_rank.train_dataset, 1)(epoch=0)
    two = two_ranks._plan(two_ranks.train_dataset, 2)(epoch=0)
    assert len(two) == 2 * len(one)
    for step, rows in enumerate(one):
        assert sorted(rows.tolist()) == sorted(np.concatenate([two[2 * step], two[2 * step + 1]]).tolist())


def test_mid_epoch_resume_yields_exactly_the_remaining_batches(tmp_path, two_files):
    config = make_config(tmp_path, two_files, batch_size=2)
    reference = setup_module_for(config)
    full = [batch["input_ids"].tolist() for batch in reference.train_dataloader()]
    consumed = 3
    resumed = setup_module_for(config)
    resumed.load_state_dict(
        {"sampler": {"epoch": 0, "batches_consumed": consumed, "seed": 7, "world_size": 1}}
    )
    rest = [batch["input_ids"].tolist() for batch in resumed.train_dataloader()]
    assert rest == full[consumed:]


def test_mix_draws_the_requested_proportions_reproducibly(tmp_path, two_files):
    config = make_config(tmp_path, two_files, mix=[0.25, 0.75])
    first, second = setup_module_for(config), setup_module_for(config)
    ids = first.train_dataset.example_ids
    assert np.array_equal(ids, second.train_dataset.example_ids)
    from_b = np.mean(ids >= 40)
    assert from_b == 0.75 and len(ids) == 60  # 15 draws from a (40 rows), 45 from b (20 rows)


def test_val_fraction_holds_out_a_deterministic_disjoint_split(tmp_path, two_files):
    config = make_config(tmp_path, two_files, val_fraction=0.2)
    first, second = setup_module_for(config), setup_module_for(config)
    train_ids, val_ids = set(first.train_dataset.example_ids), set(first.val_dataset.example_ids)
    assert len(val_ids) == 12 and not train_ids & val_ids and len(train_ids | val_ids) == 60
    assert val_ids == set(second.val_dataset.example_ids)


def test_explicit_val_files_and_their_batches_cover_each_row_once(tmp_path, two_files):
    config = make_config(tmp_path, two_files[:1], val=two_files[1:])
    datamodule = setup_module_for(config)
    rows = [row for batch in datamodule.val_dataloader().batch_sampler for row in batch]
    assert sorted(rows) == list(range(len(datamodule.val_dataset)))


@pytest.mark.parametrize("world_size", [3, 6])
def test_every_rank_runs_the_same_validation_batches_and_padding_trains_nothing(
    tmp_path, two_files, world_size
):
    """A sharded model's forward is a collective: a rank with one batch fewer would hang the others."""
    datamodule = setup_module_for(make_config(tmp_path, two_files[:1], val=two_files[1:], packing=False))
    rows, trained = [], 0
    batch_counts = set()
    for rank in range(world_size):
        datamodule.trainer = SimpleNamespace(global_rank=rank, world_size=world_size)
        loader = datamodule.val_dataloader()
        batches = list(loader)
        batch_counts.add(len(batches))
        rows += [row for batch in loader.batch_sampler for row in batch]
        trained += sum(int((batch["labels"] != IGNORE_INDEX).sum()) for batch in batches)
    row_count = len(datamodule.val_dataset)
    assert row_count % world_size and len(batch_counts) == 1  # uneven rows, yet even batches
    assert sorted(row for row in rows if row < row_count) == list(range(row_count))
    want = sum(int((datamodule.val_dataset[r]["labels"] != IGNORE_INDEX).sum()) for r in range(row_count))
    assert trained == want  # the padding rows add no trained token: val loss is unchanged


def test_collate_keeps_document_ids_only_where_a_row_holds_several_examples(tmp_path, two_files):
    packed = setup_module_for(make_config(tmp_path, two_files, packing=True))
    unpacked = setup_module_for(make_config(tmp_path, two_files, packing=False))
    packed_batch = next(iter(packed.train_dataloader()))
    unpacked_batch = next(iter(unpacked.train_dataloader()))
    assert "document_ids" in packed_batch and "document_ids" not in unpacked_batch


def test_mixing_never_draws_held_out_examples(tmp_path, two_files):
    datamodule = setup_module_for(make_config(tmp_path, two_files, mix=[0.5, 0.5], val_fraction=0.25))
    train_ids, val_ids = set(datamodule.train_dataset.example_ids), set(datamodule.val_dataset.example_ids)
    assert len(val_ids) == 15 and not train_ids & val_ids
    assert np.mean(datamodule.train_dataset.example_ids >= 40) == 0.5


def examples_per_optimizer_step(datamodule, world_size: int, accumulation: int) -> list[list[int]]:
    """The example ids each optimizer step trains on, over all ranks and accumulated micro-batches."""
    dataset = datamodule.train_dataset
    per_rank = [
        list(
            ResumableBatchSampler(
                datamodule._plan(dataset, world_size, accumulation),
                seed=7,
                rank=rank,
                world_size=world_size,
            )
        )
        for rank in range(world_size)
    ]
    steps = []
    for start in range(0, len(per_rank[0]), accumulation):
        rows = [
            row for batches in per_rank for batch in batches[start : start + accumulation] for row in batch
        ]
        steps.append(sorted(int(e) for row in rows for e in dataset.row_examples(row)))
    return steps


@pytest.mark.parametrize("packing", [True, False])
def test_batch_size_accumulation_and_ranks_give_the_same_optimizer_steps(tmp_path, two_files, packing):
    """batch_size 4 = batch_size 1 × 4 accumulated = 2 × 2 = 1 × 2 ranks × 2 accumulated, step for step."""
    steps = {
        (batch_size, world_size, accumulation): examples_per_optimizer_step(
            setup_module_for(make_config(tmp_path, two_files, packing=packing, batch_size=batch_size)),
            world_size,
            accumulation,
        )
        for batch_size, world_size, accumulation in ((4, 1, 1), (1, 1, 4), (2, 1, 2), (1, 2, 2))
    }
    reference = steps.pop((4, 1, 1))
    assert len(reference) > 3
    for other in steps.values():
        assert other == reference


def first_step_loss(tmp_path, files, batch_size: int, accumulation: int) -> float:
    config = make_config(tmp_path, files, packing=False, batch_size=batch_size)
    prepared = prepare(config)
    datamodule = SFTDataModule(config, prepared)
    torch.manual_seed(0)
    model = {
        "vocab_size": prepared.tokenizer.get_vocab_size(),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
    }
    module = SFTModule(model, {"lr": 1e-3, "weight_decay": 0.0, "warmup_steps": 1, "min_lr_ratio": 0.1})
    trainer = L.Trainer(
        max_steps=1,
        accumulate_grad_batches=accumulation,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(module, datamodule=datamodule)
    return float(trainer.callback_metrics["train/loss"])


def test_unpacked_first_step_loss_is_the_same_whether_batched_or_accumulated(tmp_path, two_files):
    batched = first_step_loss(tmp_path, two_files, batch_size=4, accumulation=1)
    assert first_step_loss(tmp_path, two_files, batch_size=1, accumulation=4) == pytest.approx(
        batched, rel=1e-5
    )


# ---- sft-eval's validation examples are the ones training validated on -------------------------------


@pytest.mark.parametrize("split", ["val_fraction", "val_files"])
def test_validation_examples_are_the_datamodules_held_out_examples(tmp_path, two_files, split):
    data = {"val_fraction": 0.25} if split == "val_fraction" else {"val": two_files[1:]}
    files = two_files if split == "val_fraction" else two_files[:1]
    config = make_config(tmp_path, files, packing=False, **data)
    prepared = prepare(config)
    dataset = SFTDataModule(config, prepared).val_dataset
    trained = [dataset.index[int(i)] for i in dataset.example_ids]
    encoder = ConversationEncoder(prepared.tokenizer, prepared.template, config.protocol)
    examples, description, _ = validation_examples(asdict(config.data), config.seed, encoder, Accounting())
    assert len(examples) == len(trained) > 0
    for example, (ids, labels) in zip(examples, trained, strict=True):
        assert example.input_ids.tolist() == ids.tolist() and example.labels.tolist() == labels.tolist()
    assert ("val_fraction=0.25" in description) == (split == "val_fraction")


def test_a_run_without_validation_data_says_how_to_give_some(tmp_path, two_files):
    config = make_config(tmp_path, two_files)
    with pytest.raises(ValueError, match=r"no validation data .* data\.val=\[\.\.\.\]"):
        validation_examples(asdict(config.data), 7, None, Accounting())


# ---- split conversations: grouped in the store, packed as prefix trees ---------------------------------


def per_turn_config(tmp_path, files, **data) -> PrepareConfig:
    """Every conversation split into one row per trained turn (protocol.turns=per_turn)."""
    config = make_config(tmp_path, files, **data)
    return dataclasses.replace(config, protocol=dataclasses.replace(config.protocol, turns="per_turn"))


def test_the_store_groups_a_split_conversations_rows_and_its_cache_keeps_them(
    tmp_path, two_files, monkeypatch
):
    config = per_turn_config(tmp_path, two_files)
    store = prepare(config).train[0]
    cached = prepare(config).train[0]
    assert cached.store_dir == store.store_dir
    # write_conversations gives conversation i 1 + i % 3 trained turns, each its own row, consecutive.
    assert np.bincount(cached.conversations).tolist() == [1 + i % 3 for i in range(40)]
    assert np.array_equal(cached.conversations, np.repeat(np.arange(40), [1 + i % 3 for i in range(40)]))
    monkeypatch.setattr("sft.data.build.FORMAT_VERSION", 1)  # a store of another layout is never reused
    assert prepare(config).train[0].store_dir != store.store_dir


def validation_loss_and_tokens(config) -> tuple[float, int]:
    prepared = prepare(config)
    datamodule = SFTDataModule(config, prepared)
    torch.manual_seed(0)
    model = {"vocab_size": prepared.tokenizer.get_vocab_size(), **TINY_MODEL}
    module = SFTModule(model, {"lr": 1e-3, "loss_chunk_tokens": 7})
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.validate(module, datamodule=datamodule, verbose=False)
    computed = sum(int(batch["real_tokens"]) for batch in datamodule.val_dataloader())
    return float(trainer.callback_metrics["val/loss"]), computed


@pytest.mark.parametrize("packing", [True, False])
def test_val_loss_is_the_same_with_prefix_sharing_on_and_off(tmp_path, two_files, packing):
    """The same rows, trained tokens and losses (fp32, 1e-6), with the shared history computed once."""
    shared, separate = (
        validation_loss_and_tokens(
            per_turn_config(tmp_path, two_files, val_fraction=0.5, packing=packing, prefix_sharing=sharing)
        )
        for sharing in (True, False)
    )
    assert shared[0] == pytest.approx(separate[0], rel=1e-6)
    assert shared[1] < separate[1]


def test_val_fraction_holds_out_whole_split_conversations_and_sft_eval_rebuilds_them(tmp_path, two_files):
    """The rows of one split conversation share their history: one in train and another in val would
    leak the held-out turns' context into training."""
    config = per_turn_config(tmp_path, two_files, val_fraction=0.25, packing=False)
    prepared = prepare(config)
    datamodule = SFTDataModule(config, prepared)
    conversations = datamodule.train_dataset.index.conversations
    train_conversations = set(conversations[datamodule.train_dataset.example_ids].tolist())
    val_conversations = set(conversations[datamodule.val_dataset.example_ids].tolist())
    assert not train_conversations & val_conversations
    assert len(val_conversations) == 15 and len(train_conversations | val_conversations) == 60
    assert any(np.count_nonzero(conversations == c) > 1 for c in val_conversations)
    encoder = ConversationEncoder(prepared.tokenizer, prepared.template, config.protocol)
    examples, _, _ = validation_examples(asdict(config.data), config.seed, encoder, Accounting())
    held_out = [datamodule.val_dataset.index[int(i)][0].tolist() for i in datamodule.val_dataset.example_ids]
    assert [example.input_ids.tolist() for example in examples] == held_out
