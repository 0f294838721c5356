"""Preparation by several ranks at once (each its share, sft.data.ranks) in one cache: a read-only cache
serves what it holds, and leftovers of killed preparers go only when nobody else is preparing there.

The ranks are simulated in one process, one after the other, through their launcher's environment."""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys

import pytest

from sft.data.build import prepare
from sft.data.store import StoreError
from tests.helpers import make_read_only
from tests.test_prepare_cli import config


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
    """(abandoned, alive): temporaries of a dead and of a live writer of this host."""
    stores.mkdir(parents=True, exist_ok=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    host = socket.gethostname()
    abandoned = stores / f"{'0' * 64}.tmp-{host}-{int(dead.stdout)}-0123abcd"
    alive = stores / f"{'1' * 64}.tmp-{host}-{os.getpid()}-0123abcd"
    for directory in (abandoned, alive):
        directory.mkdir()
        (directory / "input_ids.bin").write_bytes(b"\0" * 10)
    return abandoned, alive


def test_ranks_remove_abandoned_stores_only_when_nobody_else_prepares(files, tmp_path, monkeypatch):
    abandoned, alive = leftover_stores(tmp_path / "cache" / "stores")
    cfg = config(files)
    as_rank(monkeypatch, 0)
    with open(tmp_path / "cache" / ".lock", "a") as other:  # another rank (or job) is preparing here
        fcntl.flock(other, fcntl.LOCK_SH)
        prepare(cfg)
    assert abandoned.exists() and alive.exists()  # its pid gone here may be a live writer elsewhere
    as_rank(monkeypatch, 1)
    prepare(cfg)  # alone in the cache
    assert not abandoned.exists() and alive.exists()
