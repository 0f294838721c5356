"""The same conversations as JSONL, Parquet, a save_to_disk folder and a cached hf:// name prepare to the same
bytes; bad rows are located as file:row; renamed columns; the cache key follows the files' content."""

from __future__ import annotations

import pytest

from sft.cli.schemas import PrepareConfig
from sft.config import load_config
from sft.data.build import export_jsonl, prepare
from sft.protocol.pipeline import DataError
from tests.helpers import A, B, arrow_table, cache_hf_dataset, make_tokenizer, write_jsonl

pq = pytest.importorskip("pyarrow.parquet")
datasets = pytest.importorskip("datasets")

# Fields only some records have: Arrow gives the others nulls (train: null would be refused, tools: null
# and system: null would render differently), so these prove the nulls are dropped.
WITH_TOOLS = {
    "messages": [
        {"role": "user", "content": "Call it"},
        {"role": "assistant", "content": "Not this", "train": False},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": "Done"},
    ],
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    "system": "Be brief.",
}
RECORDS = [*A, *B, WITH_TOOLS]


@pytest.fixture
def entries(tmp_path, monkeypatch):
    """One set of conversations under every kind of data entry."""
    make_tokenizer().save(str(tmp_path / "tok.json"))
    parquet = str(tmp_path / "chats.parquet")
    pq.write_table(arrow_table(RECORDS), parquet)
    # Dataset.from_list would take the first record's keys as the columns: build from the unified table.
    datasets.Dataset(datasets.table.InMemoryTable(arrow_table(RECORDS))).save_to_disk(str(tmp_path / "saved"))
    hf_cache = tmp_path / "hf-cache"
    cache_hf_dataset(hf_cache, "org/chats", parquet)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(hf_cache))
    return {
        "jsonl": write_jsonl(tmp_path / "chats.jsonl", RECORDS),
        "parquet": parquet,
        "saved": str(tmp_path / "saved"),
        "hf": "hf://org/chats:train",
        "tok": str(tmp_path / "tok.json"),
        "cache": str(tmp_path / "cache"),
        "hf_cache": str(hf_cache),
    }


def config(entries, train: list[str], on_error: str = "raise", **data) -> PrepareConfig:
    values = {
        "seed": 0,
        "tokenizer": {"name": "file", "path": entries["tok"]},
        "template": {"name": "chatml"},
        "protocol": {"max_seq_len": 4096, "system_prompt": None, "on_error": on_error},
        "data": {"name": "jsonl", "train": train, "format": "auto", "cache_dir": entries["cache"], **data},
    }
    return load_config(values, PrepareConfig)


def exported(entries, tmp_path, name: str) -> bytes:
    out = tmp_path / f"{name}.out.jsonl"
    prepared = prepare(config(entries, [entries[name]]))
    assert prepared.accounting.kept == len(RECORDS), prepared.accounting.summary()
    export_jsonl(prepared.train, out)
    return out.read_bytes()


def test_every_kind_of_entry_gives_byte_identical_examples(entries, tmp_path):
    reference = exported(entries, tmp_path, "jsonl")
    for name in ("parquet", "saved", "hf"):
        assert exported(entries, tmp_path, name) == reference, name


def test_a_bad_row_is_named_by_file_and_row_or_skipped_and_counted(entries, tmp_path):
    bad = str(tmp_path / "bad.parquet")
    rows = RECORDS[:2] + [{"messages": [{"role": "user", "content": "Only a question"}]}]
    pq.write_table(arrow_table(rows), bad)
    with pytest.raises(DataError, match=rf"{bad}:3: no_assistant_turn"):
        prepare(config(entries, [bad]))
    cfg = config(entries, [bad], on_error="skip")
    accounting = prepare(cfg).accounting
    assert (accounting.read, accounting.kept, dict(accounting.skipped)) == (3, 2, {"no_assistant_turn": 1})
    assert accounting.where["no_assistant_turn"] == [f"{bad}:3"]


def test_columns_map_a_differently_named_column_and_change_the_cache_key(entries, tmp_path):
    renamed = str(tmp_path / "renamed.parquet")
    pq.write_table(arrow_table([{"conversation": record["messages"]} for record in A[:1]]), renamed)
    with pytest.raises(DataError, match="unknown_format"):
        prepare(config(entries, [renamed]))
    mapped = prepare(config(entries, [renamed], columns={"messages": "conversation"}))
    plain = prepare(config(entries, [write_jsonl(tmp_path / "a0.jsonl", A[:1])]))
    assert mapped.train[0][0][0].tolist() == plain.train[0][0][0].tolist()
    assert mapped.train[0].store_dir != plain.train[0].store_dir


def test_the_store_follows_the_parquet_files_content(entries, tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    pq.write_table(arrow_table(RECORDS[:3]), str(folder / "0.parquet"))
    first = prepare(config(entries, [str(folder)])).train[0]
    assert len(first) == 3
    pq.write_table(arrow_table(RECORDS[3:]), str(folder / "1.parquet"))
    second = prepare(config(entries, [str(folder)])).train[0]
    assert second.store_dir != first.store_dir and len(second) == len(RECORDS)


def test_a_bad_row_in_a_glob_of_files_is_named_by_its_file_from_the_cache_too(entries, tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    pq.write_table(arrow_table(RECORDS[:2]), str(folder / "0.parquet"))
    rows = RECORDS[2:4] + [{"messages": [{"role": "user", "content": "Only a question"}]}]
    pq.write_table(arrow_table(rows), str(folder / "1.parquet"))
    cfg = config(entries, [str(folder / "*.parquet")], on_error="skip")
    for _ in range(2):  # encoded, then opened from the cache
        assert prepare(cfg).accounting.where["no_assistant_turn"] == [f"{folder / '1.parquet'}:3"]
