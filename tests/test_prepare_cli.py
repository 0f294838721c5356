"""Preparation: the cache (tokenizer and stores keyed by content), forced formats, and what `sft-prepare`
never imports (its contract command, run as a user runs it, is in tests/e2e/test_prepare_cli.py)."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from sft.cli.schemas import PrepareConfig
from sft.config import load_config
from sft.data.build import prepare
from sft.data.store import StoreError
from sft.protocol.pipeline import DataError
from sft.protocol.tokenizer import load_tokenizer
from tests.helpers import A, B, contract, make_read_only, make_tokenizer, run_prepare, write_jsonl

# ---- prepare() in process: the cache ----------------------------------------------------------------------


def config(files, tokenizer=None, template="chatml", data_format="auto", **protocol) -> PrepareConfig:
    values = {
        "seed": 0,
        "tokenizer": tokenizer or {"name": "file", "path": files["tok"]},
        "template": {"name": template},
        "protocol": {"max_seq_len": 4096, **protocol},
        "data": {"name": "jsonl", "train": [files["a"]], "format": data_format, "cache_dir": files["cache"]},
    }
    return load_config(values, PrepareConfig)


def store_dir(cfg: PrepareConfig):
    return prepare(cfg).train[0].store_dir


def test_bpe_tokenizer_is_trained_once_and_cached(files, tmp_path):
    bpe = {"name": "bpe", "vocab_size": 300}
    first = prepare(config(files, tokenizer=bpe))
    [saved] = (tmp_path / "cache" / "tokenizers").glob("*.json")
    written = saved.stat().st_mtime_ns
    second = prepare(config(files, tokenizer=bpe, max_seq_len=100))  # not a rendering key: no retraining
    assert list((tmp_path / "cache" / "tokenizers").glob("*.json")) == [saved]
    assert saved.stat().st_mtime_ns == written
    assert second.tokenizer.to_str() == first.tokenizer.to_str() == load_tokenizer(saved).to_str()
    assert store_dir(config(files, tokenizer=bpe)) == first.train[0].store_dir  # trained or loaded: one key


def test_store_cache_hits_when_nothing_changes_and_misses_on_any_change(files, tmp_path):
    baseline = store_dir(config(files))
    manifest = (baseline / "manifest.json").stat().st_mtime_ns
    started = time.perf_counter()
    assert store_dir(config(files)) == baseline
    assert time.perf_counter() - started < 2.0 and (baseline / "manifest.json").stat().st_mtime_ns == manifest

    make_tokenizer(vocab_size=350).save(str(tmp_path / "other-tok.json"))
    changed = {
        "template": store_dir(config(files, template="microlm")),
        "tokenizer": store_dir(
            config(files, tokenizer={"name": "file", "path": str(tmp_path / "other-tok.json")})
        ),
        "protocol": store_dir(config(files, max_seq_len=2048)),
    }
    with open(files["a"], "a", encoding="utf-8") as file:
        file.write(json.dumps(A[0]) + "\n")
    changed["data"] = store_dir(config(files))
    assert len({baseline, *changed.values()}) == 1 + len(changed)


def test_data_format_forces_the_reader(files, tmp_path):
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Hi", "output": "Yo", "messages": []}])
    cfg = config(files, data_format="alpaca")
    cfg.data.train = [alpaca]
    assert prepare(cfg).accounting.kept == 1  # auto would read it as an (empty) messages record
    cfg.data.format = "auto"
    with pytest.raises(DataError, match=rf"{alpaca}:1: no_assistant_turn"):
        prepare(cfg)


# ---- what sft-prepare never does ------------------------------------------------------------------------


def test_prepare_never_imports_torch_or_lightning():
    check = (
        "import sys, sft.cli.prepare, sft.data.build, sft.protocol.pipeline; "
        "heavy = sorted(m for m in ('torch', 'lightning', 'pytorch_lightning') if m in sys.modules); "
        "assert not heavy, heavy"
    )
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("holders", [[False], [True, True]], ids=["another-alone", "two-ranks-sharing"])
def test_preparers_of_one_cache_take_turns(tmp_path, holders):
    """A preparer alone waits for the one before it, or for all the ranks preparing their shares at once
    (they hold the cache lock together)."""
    import threading
    from contextlib import ExitStack

    from sft.data.build import cache_lock

    cache = tmp_path / "cache"
    finished = threading.Event()

    def second_preparer():
        with cache_lock(cache):
            finished.set()

    with ExitStack() as held:
        for shared in holders:
            held.enter_context(cache_lock(cache, shared=shared))
        thread = threading.Thread(target=second_preparer)
        thread.start()
        assert not finished.wait(0.3)
    thread.join(5)
    assert finished.is_set()


# ---- several ranks preparing their shares at once (simulated one after the other, through their environment)


def as_rank(monkeypatch, rank: int, world_size: int = 2) -> None:
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(world_size))


def test_two_ranks_open_a_read_only_cache_and_name_what_it_lacks(files, monkeypatch):
    cfg = config(files)
    cfg.data.train = [files["a"], files["b"]]
    single = prepare(cfg)
    make_read_only(monkeypatch)
    for rank in (0, 1):
        as_rank(monkeypatch, rank)
        shared = prepare(cfg)
        assert [store.store_dir for store in shared.train] == [store.store_dir for store in single.train]
        assert shared.accounting == single.accounting
    cfg.protocol.max_seq_len = 100  # another key: a store the cache lacks, which nobody may write
    with pytest.raises(StoreError, match=rf"data.cache_dir={files['cache']} is read-only and lacks a store"):
        prepare(cfg)


def leftover_stores(stores) -> tuple:
    """(abandoned, alive, elsewhere): temporaries of a dead and of a live writer of this host, and of a
    writer on another host (whose pid says nothing here)."""
    stores.mkdir(parents=True, exist_ok=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    host = socket.gethostname()
    abandoned = stores / f"{'0' * 64}.tmp-{host}-{int(dead.stdout)}-0123abcd"
    alive = stores / f"{'1' * 64}.tmp-{host}-{os.getpid()}-0123abcd"
    elsewhere = stores / f"{'2' * 64}.tmp-other-host-{int(dead.stdout)}-0123abcd"
    for directory in (abandoned, alive, elsewhere):
        directory.mkdir()
        (directory / "input_ids.bin").write_bytes(b"\0" * 10)
    return abandoned, alive, elsewhere


def test_ranks_remove_abandoned_stores_only_when_nobody_else_prepares(files, tmp_path, monkeypatch):
    abandoned, alive, _ = leftover_stores(tmp_path / "cache" / "stores")
    cfg = config(files)
    as_rank(monkeypatch, 0)
    with open(tmp_path / "cache" / ".lock", "a") as other:  # another rank (or job) is preparing here
        fcntl.flock(other, fcntl.LOCK_SH)
        prepare(cfg)
    assert abandoned.exists() and alive.exists()  # its pid gone here may be a live writer elsewhere
    as_rank(monkeypatch, 1)
    prepare(cfg)  # alone in the cache
    assert not abandoned.exists() and alive.exists()


# ---- hostile and careless input ----------------------------------------------------------------------------

LONE_SURROGATE = (
    '{"messages": [{"role": "user", "content": "lone \\ud800"}, {"role": "assistant", "content": "x"}]}'
)


def test_a_lone_surrogate_with_a_tokenizer_file_is_raised_with_its_line_or_skipped(files, tmp_path):
    with open(files["b"], "a", encoding="utf-8") as file:
        file.write(LONE_SURROGATE + "\n")
    with pytest.raises(DataError, match=rf"^{files['b']}:4: invalid_text: 'messages\[0\]\.content'"):
        cfg = config(files)
        cfg.data.train = [files["b"]]
        prepare(cfg)
    skipped = run_prepare(tmp_path, *contract(files, tmp_path, "protocol.on_error=skip"))
    assert skipped.returncode == 0, skipped.stderr
    assert "read 6 = kept 5 + skipped 1 + dropped 0" in skipped.stdout
    assert f"skipped 1 invalid_text: {files['b']}:4" in skipped.stdout


def test_files_with_the_same_bytes_are_reported_under_the_names_given_in_this_run(files, tmp_path):
    bad = write_jsonl(tmp_path / "first.jsonl", A) + ""
    with open(bad, "a", encoding="utf-8") as file:
        file.write("{oops\n")
    copy = tmp_path / "renamed.jsonl"
    copy.write_bytes((tmp_path / "first.jsonl").read_bytes())
    cfg = config(files, on_error="skip")
    cfg.data.train = [bad, str(copy)]
    prepared = prepare(cfg)
    assert prepared.train[0].store_dir == prepared.train[1].store_dir  # one store: keyed by content
    assert prepared.accounting.where["invalid_json"] == [f"{bad}:3", f"{copy}:3"]
    assert [store.source for store in prepared.train] == [bad, str(copy)]
    moved = tmp_path / "moved.jsonl"
    (tmp_path / "first.jsonl").rename(moved)
    cfg.data.train = [str(moved)]
    assert prepare(cfg).accounting.where["invalid_json"] == [f"{moved}:3"]


def test_a_directory_or_an_unset_data_train_is_named_for_what_it_is(files, tmp_path):
    cfg = config(files)
    cfg.data.train = [str(tmp_path)]
    with pytest.raises(ValueError, match=rf"data.train: {tmp_path} is a directory, not a data file"):
        prepare(cfg)
    for unset in (None, []):  # `???` left unset is named by the config loader before any of this
        cfg.data.train = unset
        with pytest.raises(ValueError, match="data.train is not set"):
            prepare(cfg)
    cfg.data.train = [str(tmp_path / "missing.jsonl")]
    with pytest.raises(FileNotFoundError, match="data.train: data file not found"):
        prepare(cfg)


def test_a_truncated_json_array_is_located_and_its_whole_records_counted(files, tmp_path):
    truncated = tmp_path / "cut.json"
    truncated.write_text(json.dumps(A + B, indent=1)[:-40])
    cfg = config(files, on_error="skip")
    cfg.data.train = [str(truncated)]
    accounting = prepare(cfg).accounting
    assert (accounting.read, accounting.kept, dict(accounting.skipped)) == (5, 4, {"invalid_json": 1})
    assert accounting.where["invalid_json"] == [f"{truncated} record 5"]


def test_stores_left_half_written_by_dead_preparers_are_removed(files, tmp_path):
    abandoned, alive, elsewhere = leftover_stores(tmp_path / "cache" / "stores")
    prepare(config(files))
    assert not abandoned.exists() and alive.exists() and elsewhere.exists()


def test_a_corrupted_cached_tokenizer_is_trained_again_and_a_bad_file_is_named(files, tmp_path):
    bpe = {"name": "bpe", "vocab_size": 300}
    first = prepare(config(files, tokenizer=bpe))
    [saved] = (tmp_path / "cache" / "tokenizers").glob("*.json")
    saved.write_text(saved.read_text()[:100])  # a half-written file
    assert prepare(config(files, tokenizer=bpe)).tokenizer.to_str() == first.tokenizer.to_str()
    assert load_tokenizer(saved).to_str() == first.tokenizer.to_str()
    (tmp_path / "tok.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(ValueError, match=rf"the tokenizer file {tmp_path / 'tok.json'} cannot be read"):
        prepare(config(files))


def test_a_read_only_cache_serves_what_it_holds(files, tmp_path, monkeypatch):
    first = prepare(config(files))
    make_read_only(monkeypatch)
    again = prepare(config(files))
    assert again.train[0].store_dir == first.train[0].store_dir and again.accounting == first.accounting
    with pytest.raises(StoreError, match=rf"data.cache_dir={files['cache']} is read-only and lacks a store"):
        prepare(config(files, max_seq_len=100))
