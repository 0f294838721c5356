"""`sft-prepare export=OUT.jsonl`: a process killed mid-export leaves OUT as it was, never a partial file."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import numpy as np

from sft.data.build import export_jsonl
from sft.data.store import StoreWriter, TokenStore

KILLED_MID_EXPORT = """
import os, signal, sys
from sft.data.build import export_jsonl
from sft.data.store import TokenStore

class KilledAtThirdExample(TokenStore):
    def __getitem__(self, index):
        if index == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__getitem__(index)

export_jsonl([KilledAtThirdExample(sys.argv[1])], sys.argv[2])
"""


def write_store(directory) -> TokenStore:
    with StoreWriter(directory, vocab_size=100) as writer:
        for length in (3, 4, 5, 6):
            ids = np.arange(length)
            writer.add(ids, np.where(ids > 1, ids, -100))
    return TokenStore(directory)


def test_export_writes_every_example_in_order(tmp_path):
    store = write_store(tmp_path / "store")
    assert export_jsonl([store, store], tmp_path / "out.jsonl") == 8
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [len(row["input_ids"]) for row in rows] == [3, 4, 5, 6] * 2
    assert rows[0] == {"input_ids": [0, 1, 2], "labels": [-100, -100, 2]}


def test_a_kill_mid_export_leaves_the_previous_file(tmp_path):
    store = write_store(tmp_path / "store")
    out = tmp_path / "out.jsonl"
    out.write_text("previous export\n")
    command = [sys.executable, "-c", KILLED_MID_EXPORT, str(store.store_dir), str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert out.read_text() == "previous export\n"
