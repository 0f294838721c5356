"""sft.data.validation rebuilds training's validation data through training's own path (prepare + the
datamodule): each entry numbered on its own (the system-prompt draw), held-out conversations named by
their entry and record (an entry listed twice is two), and generation during training finds them from the
datamodule's stores without encoding the training data again."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest

from sft.cli.schemas import PrepareConfig, SampleEvalConfig
from sft.config import load_config
from sft.data.build import prepare
from sft.data.datamodule import SFTDataModule
from sft.data.validation import validation_examples, validation_source
from sft.generation_callback import GenerationEvalCallback
from sft.generation_eval import generation_items
from sft.protocol.pipeline import Accounting, ConversationEncoder
from tests.helpers import make_tokenizer

SYSTEM_PROMPTS = ["Be brief.", "Answer in full sentences."]


def write_conversations(path: Path, count: int, tag: str, bad_first: bool = False) -> str:
    """Single-turn conversations without a system message (each gets training's draw); `bad_first`: a
    record that is skipped first, so a conversation's record differs from its number among those kept."""
    lines = ['{"no": "conversation"}'] if bad_first else []
    for n in range(count):
        turns = [{"role": "user", "content": f"{tag} {n}?"}, {"role": "assistant", "content": f"{tag} {n}."}]
        lines.append(json.dumps({"messages": turns}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def run_config(tmp_path: Path, **data) -> PrepareConfig:
    make_tokenizer().save(str(tmp_path / "tok.json"))
    return load_config(
        {
            "seed": 11,
            "tokenizer": {"name": "file", "path": str(tmp_path / "tok.json")},
            "template": {"name": "chatml"},
            "protocol": {
                "system_prompt": SYSTEM_PROMPTS,
                "system_prompt_prob": 0.5,
                "seed": 3,
                "on_error": "skip",
            },
            "data": {"name": "jsonl", "packing": False, "cache_dir": str(tmp_path / "cache"), **data},
        },
        PrepareConfig,
    )


def training_validation(config: PrepareConfig) -> tuple[SFTDataModule, list[list[int]], ConversationEncoder]:
    """The datamodule of a run, its validation examples' ids (as training encoded them), an encoder like
    training's."""
    prepared = prepare(config)
    datamodule = SFTDataModule(config, prepared)
    dataset = datamodule.val_dataset
    ids = [dataset.index[int(example_id)][0].tolist() for example_id in dataset.example_ids]
    return datamodule, ids, ConversationEncoder(prepared.tokenizer, prepared.template, config.protocol)


def sft_eval_items(config: PrepareConfig, encoder: ConversationEncoder):
    """What sft-eval scores: the loss examples and the generation items (sft.cli.eval's calls)."""
    data = asdict(config.data)
    examples, _, held_out = validation_examples(data, config.seed, encoder, Accounting())
    items = generation_items(validation_source(data, config.seed)[0], encoder, 1000, held_out)
    return examples, items, held_out


@pytest.mark.parametrize("split", ["val", "val_fraction"])
def test_each_entry_draws_system_prompts_as_its_training_store_did(tmp_path, split):
    """Before, sft-eval numbered the second entry's conversations after the first's: they drew other
    system prompts than training had."""
    entries = [write_conversations(tmp_path / f"{tag}.jsonl", 12, tag) for tag in ("alpha", "beta")]
    data = {"val": entries} if split == "val" else {"val_fraction": 0.5}
    config = run_config(tmp_path, train=entries, **data)
    _, trained, encoder = training_validation(config)
    examples, items, _ = sft_eval_items(config, encoder)

    assert [example.input_ids.tolist() for example in examples] == trained
    assert len(items) == len(trained) > 4  # one trained turn each, in the same order
    for item, ids in zip(items, trained, strict=True):
        assert item.prompt_ids == ids[: len(item.prompt_ids)]  # training's own prompt and system prompt
    second_entry = [item.prompt for item in items if item.where.startswith(entries[1])]
    assert any(prompt in text for text in second_entry for prompt in SYSTEM_PROMPTS)  # the draw counts


def test_an_entry_listed_twice_generates_only_its_held_out_conversations(tmp_path):
    """Before, held-out conversations were matched by file:line, so a conversation held out of one copy
    was generated from both."""
    path = write_conversations(tmp_path / "a.jsonl", 16, "alpha")
    config = run_config(tmp_path, train=[path, path], val_fraction=0.5)
    datamodule, trained, encoder = training_validation(config)
    examples, items, held_out = sft_eval_items(config, encoder)

    assert held_out == datamodule.held_out_records()
    assert {record for entry, record in held_out if entry == 0} != {r for e, r in held_out if e == 1}
    assert len(items) == len(examples) == len(trained) == len(held_out) == 16
    for item, ids in zip(items, trained, strict=True):
        assert item.prompt_ids == ids[: len(item.prompt_ids)]


def test_training_generation_reads_the_held_out_conversations_without_encoding_the_training_data(
    tmp_path, monkeypatch
):
    """Before, rank 0 encoded the whole training data again (minutes per million rows) while the other
    ranks waited at the barrier. A skipped first record makes a conversation's record differ from its
    number among the kept ones, which the stores keep apart."""
    entries = [
        write_conversations(tmp_path / "a.jsonl", 12, "alpha", bad_first=True),
        write_conversations(tmp_path / "b.jsonl", 10, "beta"),
    ]
    config = run_config(tmp_path, train=[*entries, entries[0]], val_fraction=0.4)
    datamodule, _, encoder = training_validation(config)
    _, expected, _ = sft_eval_items(config, encoder)

    def no_encoding(*args, **kwargs):
        raise AssertionError("generation during training encoded conversations")

    monkeypatch.setattr(ConversationEncoder, "encode_conversations", no_encoding)
    callback_config = SimpleNamespace(
        data=config.data, seed=config.seed, protocol=config.protocol, eval=SampleEvalConfig(max_items=1000)
    )
    module = SimpleNamespace(tokenizer=encoder.tokenizer, template=encoder.template)
    trainer = SimpleNamespace(datamodule=datamodule)
    items = GenerationEvalCallback(callback_config)._load_items(trainer, module)
    assert items == expected and len(items) > 4
    assert {item.where.rsplit(":", 1)[0] for item in items} == set(entries)
