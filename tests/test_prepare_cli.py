"""Preparation: the cache (tokenizer and stores keyed by content), forced formats, and what `sft-prepare`
never imports (its contract command, run as a user runs it, is in tests/e2e/test_prepare_cli.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from sft.data.build import prepare
from sft.protocol.pipeline import DataError
from sft.protocol.tokenizer import load_tokenizer
from tests.helpers import A, make_tokenizer, write_jsonl

# ---- prepare() in process: the cache ----------------------------------------------------------------------


def config(files, tokenizer=None, template="chatml", data_format="auto", **protocol) -> dict:
    return {
        "seed": 0,
        "tokenizer": tokenizer or {"name": "file", "path": files["tok"]},
        "template": {"name": template},
        "protocol": {"max_seq_len": 4096, **protocol},
        "data": {"name": "jsonl", "train": [files["a"]], "format": data_format, "cache_dir": files["cache"]},
    }


def store_dir(cfg: dict):
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
    cfg["data"]["train"] = [alpaca]
    assert prepare(cfg).accounting.kept == 1  # auto would read it as an (empty) messages record
    cfg["data"]["format"] = "auto"
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


def test_preparers_of_one_cache_take_turns(tmp_path):
    """Every rank of a job may call prepare(); the cache lock makes the others wait for the first."""
    import threading

    from sft.data.build import cache_lock

    cache = tmp_path / "cache"
    finished = threading.Event()

    def second_preparer():
        with cache_lock(cache):
            finished.set()

    with cache_lock(cache):
        thread = threading.Thread(target=second_preparer)
        thread.start()
        assert not finished.wait(0.3)
    thread.join(5)
    assert finished.is_set()
