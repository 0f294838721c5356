"""Preparation on two ranks at once (as torchrun or srun start them) gives the stores, rows, order and
accounting of one process, each rank encoding its own share; a BPE tokenizer is trained once."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import A, B, write_jsonl

pytestmark = pytest.mark.slow

RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS")


def prepare_command(tmp_path: Path, files: list[str], cache: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "sft.prepare",
        f"hydra.run.dir={tmp_path / 'runs' / out.stem}",
        f"data.train=[{','.join(files[:-1])}]",
        f"data.val=[{files[-1]}]",
        "tokenizer=bpe",
        "tokenizer.vocab_size=300",
        "protocol.system_prompt=null",
        "protocol.on_error=skip",
        f"data.cache_dir={cache}",
        f"export={out}",
    ]


def environment(**ranks: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in RANK_VARIABLES}
    return {**env, **ranks}


def test_two_ranks_prepare_disjoint_shares_into_the_stores_of_one_process(tmp_path):
    bad = {"messages": [{"role": "user", "content": "no answer"}]}
    files = [
        write_jsonl(tmp_path / f"{index}.jsonl", records)
        for index, records in enumerate([A * 30, B * 20, A + [bad] + B, B * 5, A * 3])
    ]
    single = subprocess.run(
        prepare_command(tmp_path, files, tmp_path / "single-cache", tmp_path / "single.jsonl"),
        capture_output=True, text=True, env=environment(), cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr
    ranks = [
        subprocess.Popen(
            prepare_command(tmp_path, files, tmp_path / "shared-cache", tmp_path / f"rank{rank}.jsonl"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
            env=environment(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2"),
        )  # fmt: skip
        for rank in (0, 1)
    ]
    outputs = [process.communicate(timeout=300) for process in ranks]
    assert [process.returncode for process in ranks] == [0, 0], [err for _, err in outputs]

    expected = (tmp_path / "single.jsonl").read_bytes()
    assert (tmp_path / "rank0.jsonl").read_bytes() == expected == (tmp_path / "rank1.jsonl").read_bytes()
    summary = single.stdout.splitlines()[0]  # read N = kept + skipped + dropped
    assert "skipped 1" in summary and all(out.splitlines()[0] == summary for out, _ in outputs)
    shares = [next(line for line in err.splitlines() if "data entries on rank" in line) for _, err in outputs]
    counts = [
        int(re.search(rf"preparing (\d) of 5 data entries on rank {rank} of 2", line)[1])
        for rank, line in enumerate(shares)
    ]
    assert sum(counts) == 5 and min(counts) > 0  # disjoint shares, every rank working

    def store_bytes(cache: Path) -> dict[str, bytes]:
        return {
            f"{path.parent.name}/{path.name}": path.read_bytes()
            for path in sorted((cache / "stores").glob("*/*"))
            if path.name != "manifest.json"
        }

    assert store_bytes(tmp_path / "shared-cache") == store_bytes(tmp_path / "single-cache")
    assert len(list((tmp_path / "shared-cache" / "tokenizers").glob("*.json"))) == 1
    manifests = [
        json.loads(p.read_text()) for p in (tmp_path / "shared-cache" / "stores").glob("*/manifest.json")
    ]
    assert sum(manifest["accounting"]["read"] for manifest in manifests) == 30 * 2 + 20 * 3 + 6 + 15 + 6
