"""The token store: exact roundtrip, lazy reads, atomic publication, content-keyed caching."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sft.data.store import (
    IDS_FILE,
    MANIFEST,
    OFFSETS_FILE,
    TRAINED_FILE,
    StoreError,
    StoreWriter,
    TokenStore,
    cache_key,
    is_complete,
)
from sft.protocol.labels import IGNORE_INDEX


def make_examples(count: int, vocab_size: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(count):
        ids = rng.integers(0, vocab_size, size=int(rng.integers(0, 40)))
        labels = np.where(rng.random(len(ids)) < 0.5, ids, IGNORE_INDEX)
        examples.append((ids, labels))
    return examples


def write_store(path: Path, examples, vocab_size: int | None, extra: dict | None = None) -> Path:
    with StoreWriter(path, vocab_size=vocab_size) as writer:
        for ids, labels in examples:
            writer.add(ids, labels)
        writer.close(extra)
    return path


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name)


@pytest.mark.parametrize(
    ("vocab_size", "dtype"), [(400, np.uint16), (1 << 16, np.uint16), (100_000, np.uint32), (None, np.uint32)]
)
def test_roundtrip_is_exact_and_picks_the_smallest_dtype(tmp_path, vocab_size, dtype):
    examples = make_examples(50, vocab_size or 100_000)
    store = TokenStore(write_store(tmp_path / "store", examples, vocab_size, {"cache_key": "abc"}))
    assert store.input_ids.dtype == dtype
    assert store.manifest["dtype"] == np.dtype(dtype).name
    assert len(store) == len(examples)
    for index, (ids, labels) in enumerate(examples):
        got_ids, got_labels = store[index]
        assert got_ids.dtype == got_labels.dtype == np.int64
        np.testing.assert_array_equal(got_ids, ids)
        np.testing.assert_array_equal(got_labels, labels)
    np.testing.assert_array_equal(store.lengths, [len(ids) for ids, _ in examples])


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, 65535), st.booleans()), max_size=12), max_size=8))
def test_roundtrip_of_arbitrary_examples(tmp_path_factory, raw_examples):
    examples = [
        (np.array([t for t, _ in ex], dtype=np.int64), np.array([t if on else IGNORE_INDEX for t, on in ex]))
        for ex in raw_examples
    ]
    store = TokenStore(write_store(tmp_path_factory.mktemp("s") / "store", examples, 65536))
    assert [tuple(map(list, store[i])) for i in range(len(store))] == [tuple(map(list, e)) for e in examples]


def test_manifest_records_counts_dtype_and_caller_fields(tmp_path):
    examples = make_examples(20, 400)
    extra = {"cache_key": "k", "accounting": {"kept": 20, "skipped": {}}, "versions": {"protocol": 3}}
    store = TokenStore(write_store(tmp_path / "store", examples, 400, extra))
    assert store.manifest["counts"] == {
        "examples": 20,
        "tokens": sum(len(ids) for ids, _ in examples),
        "trained_tokens": sum(int((labels != IGNORE_INDEX).sum()) for _, labels in examples),
    }
    assert {key: store.manifest[key] for key in extra} == extra
    assert store.manifest["dtype"] == "uint16"


def test_reads_are_memory_mapped_and_pickle_without_the_data(tmp_path):
    store = TokenStore(write_store(tmp_path / "store", make_examples(200, 400), 400))
    assert isinstance(store.input_ids, np.memmap) and isinstance(store.trained, np.memmap)
    assert isinstance(store.offsets, np.memmap)
    assert not store.input_ids.flags.writeable
    payload = pickle.dumps(store)
    assert len(payload) < 500  # a path, not the tokens
    clone = pickle.loads(payload)
    np.testing.assert_array_equal(clone[7][1], store[7][1])


def test_empty_store_is_valid(tmp_path):
    store = TokenStore(write_store(tmp_path / "store", [], 400))
    assert len(store) == 0 and store.lengths.tolist() == []


def test_exception_mid_write_leaves_nothing(tmp_path):
    final = tmp_path / "store"
    with pytest.raises(RuntimeError, match="killed"):
        with StoreWriter(final, vocab_size=400) as writer:
            for ids, labels in make_examples(10, 400):
                writer.add(ids, labels)
            raise RuntimeError("killed")
    assert not final.exists() and not is_complete(final)
    assert leftovers(tmp_path) == []
    with pytest.raises(StoreError):
        TokenStore(final)


def test_leaving_the_block_without_close_publishes(tmp_path):
    with StoreWriter(tmp_path / "store", vocab_size=400) as writer:
        writer.add(np.array([1, 2]), np.array([IGNORE_INDEX, 2]))
    assert TokenStore(tmp_path / "store")[0][1].tolist() == [IGNORE_INDEX, 2]


def test_a_store_published_first_by_another_process_is_kept(tmp_path):
    final = tmp_path / "store"
    with StoreWriter(final, vocab_size=400) as ours:
        ours.add(np.array([1, 2, 3]), np.array([1, 2, 3]))
        write_store(final, make_examples(5, 400), 400, {"winner": "other"})  # the other rank finishes first
        assert ours.close({"winner": "ours"}) == final
    assert TokenStore(final).manifest["winner"] == "other"
    assert leftovers(tmp_path) == []


def test_a_foreign_directory_in_the_way_is_an_error(tmp_path):
    final = tmp_path / "store"
    final.mkdir()
    (final / "junk").write_text("not a store")
    with pytest.raises(StoreError, match="not a complete store"):
        write_store(final, make_examples(3, 400), 400)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("broken", [IDS_FILE, TRAINED_FILE, OFFSETS_FILE, MANIFEST])
def test_truncated_arrays_are_incomplete(tmp_path, broken):
    final = write_store(tmp_path / "store", make_examples(30, 400), 400)
    assert is_complete(final)
    data = (final / broken).read_bytes()
    (final / broken).write_bytes(data[: len(data) - 3])
    assert not is_complete(final)
    with pytest.raises(StoreError):
        TokenStore(final)


def test_missing_manifest_is_incomplete(tmp_path):
    final = write_store(tmp_path / "store", make_examples(3, 400), 400)
    (final / MANIFEST).unlink()
    assert not is_complete(final)


def test_add_rejects_what_the_store_cannot_represent(tmp_path):
    with StoreWriter(tmp_path / "store", vocab_size=400) as writer:
        with pytest.raises(ValueError, match="labels must equal"):
            writer.add(np.array([1, 2]), np.array([1, 5]))
        with pytest.raises(ValueError, match="token ids"):
            writer.add(np.array([70_000]), np.array([IGNORE_INDEX]))
        with pytest.raises(ValueError, match="token ids"):
            writer.add(np.array([-1]), np.array([IGNORE_INDEX]))
        with pytest.raises(ValueError, match="equal-length"):
            writer.add(np.array([1, 2]), np.array([1]))
        writer.add(np.array([3]), np.array([3]))
    assert len(TokenStore(tmp_path / "store")) == 1


def test_manifest_extra_cannot_overwrite_counts(tmp_path):
    with pytest.raises(ValueError, match="override"):
        write_store(tmp_path / "store", [], 400, {"counts": {}})
    assert not (tmp_path / "store").exists() and leftovers(tmp_path) == []


def test_cache_key_changes_with_every_input_and_nothing_else(tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_bytes(b'{"messages": []}\n' * 1000)
    second.write_bytes(b'{"text": "x"}\n')
    parts = {"template": "chatml", "tokenizer": "sha:1", "protocol": {"max_seq_len": 512, "system": None}}
    key = cache_key(parts, [first, second])
    assert len(key) == 64
    assert cache_key(json.loads(json.dumps(parts)), [str(first), str(second)]) == key
    reordered = {"protocol": {"system": None, "max_seq_len": 512}, "tokenizer": "sha:1", "template": "chatml"}
    assert cache_key(reordered, [first, second]) == key

    copies = tmp_path / "copies"
    copies.mkdir()
    assert cache_key(parts, [shutil.copy(first, copies / "x"), shutil.copy(second, copies / "y")]) == key

    assert cache_key({**parts, "template": "llama3"}, [first, second]) != key
    assert cache_key({**parts, "protocol": {"max_seq_len": 513, "system": None}}, [first, second]) != key
    assert cache_key({**parts, "protocol_version": 2}, [first, second]) != key
    assert cache_key(parts, [second, first]) != key
    assert cache_key(parts, [first]) != key

    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 1
    first.write_bytes(bytes(data))
    assert cache_key(parts, [first, second]) != key
