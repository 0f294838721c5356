"""Preparation on two ranks at once (as torchrun or srun start them) gives the stores, rows, order and
accounting of one process, each rank encoding its own share; a BPE tokenizer is trained once; a read-only
cache (a real read-only mount) is opened by both ranks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import A, B, summary, train, write_jsonl

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


def read_only_view(source: Path, view: Path) -> list[str]:
    """A prefix that runs a command with `view` a read-only mount of `source`, in a mount namespace of its
    own (no privileges needed where user namespaces are allowed; as root, a mode would not stop writes)."""
    mount = 'mount --bind "$1" "$2" && mount -o remount,bind,ro "$2" && shift 2 && exec "$@"'
    return ["unshare", "-rm", "sh", "-c", mount, "sh", str(source), str(view)]


def test_two_ranks_open_a_read_only_cache_and_name_what_it_lacks(tmp_path):
    """A prepared data set shared read-only: every rank opens every store, taking no lock there."""
    files = [write_jsonl(tmp_path / f"{index}.jsonl", records) for index, records in enumerate([A * 3, B, A])]
    cache, view = tmp_path / "cache", tmp_path / "read-only"
    single = prepare_command(tmp_path, files, cache, tmp_path / "single.jsonl")
    assert subprocess.run(single, capture_output=True, env=environment(), cwd=tmp_path).returncode == 0
    view.mkdir()
    if subprocess.run([*read_only_view(cache, view), "true"], capture_output=True).returncode:
        pytest.skip("no unprivileged mount namespace here (unshare -rm) for a read-only mount")

    def on_two_ranks(*overrides: str) -> list[tuple[int, str]]:
        ranks = [
            subprocess.Popen(
                [
                    *read_only_view(cache, view),
                    *prepare_command(tmp_path, files, view, tmp_path / f"rank{rank}.jsonl"),
                    *overrides,
                ],
                stderr=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                text=True,
                cwd=tmp_path,
                env=environment(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2"),
            )
            for rank in (0, 1)
        ]
        errors = [process.communicate(timeout=300)[1] for process in ranks]
        return [(process.returncode, error) for process, error in zip(ranks, errors, strict=True)]

    assert [code for code, _ in on_two_ranks()] == [0, 0]
    expected = (tmp_path / "single.jsonl").read_bytes()
    assert (tmp_path / "rank0.jsonl").read_bytes() == expected == (tmp_path / "rank1.jsonl").read_bytes()
    for code, stderr in on_two_ranks("protocol.max_seq_len=100"):  # another key: stores the cache lacks
        assert code != 0 and f"data.cache_dir={view} is read-only and lacks a store" in stderr


def test_hardware_ddp_cpu_prepares_on_both_ranks_at_once_what_one_process_prepares(tmp_path):
    """sft-train hardware=ddp_cpu: the two ranks Lightning is about to start prepare disjoint entries at
    once (each store says which rank wrote it), the BPE tokenizer is trained once, and stores, accounting
    and `sft-prepare export=` are those of one process."""
    bad = {"messages": [{"role": "user", "content": "no answer"}]}
    files = [
        write_jsonl(tmp_path / f"{index}.jsonl", records)
        for index, records in enumerate([A * 30, B * 20, A + [bad] + B, B * 5, A * 3])
    ]
    same = [
        f"data.train=[{','.join(files[:-1])}]", f"data.val=[{files[-1]}]", "tokenizer=bpe",
        "tokenizer.vocab_size=300", "protocol.system_prompt=null", "protocol.on_error=skip",
    ]  # fmt: skip
    ddp_cache, single_cache = tmp_path / "ddp-cache", tmp_path / "single-cache"
    trained = train(
        tmp_path / "run", ddp_cache, "data=jsonl", *same, "hardware=ddp_cpu", "data.batch_size=2",
        "trainer.max_steps=1", "trainer.val_check_interval=1", "eval.exact_match=false",
    )  # fmt: skip
    assert trained.stderr.count("sft: training the BPE tokenizer") == 1
    assert len(list((ddp_cache / "tokenizers").glob("*.json"))) == 1
    shares = sorted(re.findall(r"preparing (\d) of 5 data entries on rank (\d) of 2", trained.stderr))
    assert [rank for _, rank in shares] == ["0", "1"] and sum(int(count) for count, _ in shares) == 5

    def prepare_and_export(cache: Path, out: Path) -> subprocess.CompletedProcess:
        command = [
            sys.executable, "-m", "sft.prepare", f"hydra.run.dir={tmp_path / out.stem}", *same,
            f"data.cache_dir={cache}", f"export={out}",
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, env=environment(), timeout=300)
        assert result.returncode == 0, result.stderr
        return result

    single = prepare_and_export(single_cache, tmp_path / "single.jsonl")
    stores = sorted(path.name for path in (ddp_cache / "stores").iterdir())
    prepare_and_export(ddp_cache, tmp_path / "ddp.jsonl")  # opens the ranks' stores: builds none
    assert sorted(path.name for path in (ddp_cache / "stores").iterdir()) == stores
    assert (tmp_path / "ddp.jsonl").read_bytes() == (tmp_path / "single.jsonl").read_bytes()

    def store_files(cache: Path) -> dict[str, bytes]:
        return {
            f"{path.parent.name}/{path.name}": path.read_bytes()
            for path in sorted((cache / "stores").glob("*/*"))
            if path.name != "manifest.json"
        }

    def manifests(cache: Path) -> dict[str, dict]:
        return {
            path.parent.name: json.loads(path.read_text())
            for path in (cache / "stores").glob("*/manifest.json")
        }

    assert store_files(ddp_cache) == store_files(single_cache) and len(stores) == 5
    ddp_manifests, single_manifests = manifests(ddp_cache), manifests(single_cache)
    for key, manifest in ddp_manifests.items():
        assert manifest["accounting"] == single_manifests[key]["accounting"]
    assert {manifest["prepared_by"]["rank"] for manifest in ddp_manifests.values()} == {0, 1}
    accounting = single.stdout.splitlines()[0]  # read N = kept + skipped + dropped
    assert "skipped 1" in accounting and accounting in trained.stdout.splitlines()
    assert summary(tmp_path / "run")["data"]["read"] == 30 * 2 + 20 * 3 + 6 + 15 + 6
