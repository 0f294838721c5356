"""Hermetic fixtures: tiny tokenizers trained in-process, no network, no cache (helpers: tests/helpers.py)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tokenizer():
    """A byte-level BPE that knows the control tokens of every builtin template."""
    from tests.helpers import make_tokenizer  # after the environment above is set

    return make_tokenizer()


@pytest.fixture
def synced(monkeypatch) -> list[str]:
    """The paths os.fsync is called on, in order (the calls still happen)."""
    paths: list[str] = []
    fsync = os.fsync

    def recording_fsync(descriptor: int) -> None:
        paths.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return paths


@pytest.fixture
def files(tmp_path):
    """sft-prepare's inputs in tmp_path: a.jsonl and b.jsonl (helpers.A, helpers.B), a tokenizer, a cache."""
    from tests.helpers import A, B, make_tokenizer, write_jsonl

    make_tokenizer().save(str(tmp_path / "tok.json"))
    return {
        "a": write_jsonl(tmp_path / "a.jsonl", A),
        "b": write_jsonl(tmp_path / "b.jsonl", B),
        "tok": str(tmp_path / "tok.json"),
        "cache": str(tmp_path / "cache"),
    }
