"""Runs of the real entry points in subprocesses, sharing one data cache per test session."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

SMALL = [
    "data.num_train=240",
    "data.num_val=16",
    "data.batch_size=4",
    "eval.max_items=8",
    "eval.max_new_tokens=8",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sft-cache")


def run_cli(args: list[str], cwd: Path | None = None, timeout: int = 600, check: bool = True, script=None):
    """`python -m sft.<entry> args` (or a given script); returns the completed process."""
    command = [sys.executable, *(["-c", script] if script else ["-m", "sft.train"]), *args]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{command} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    return result


def train(run_dir: Path, cache_dir: Path, *overrides: str, script: str | None = None, check: bool = True):
    args = [*SMALL, f"data.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}", *overrides]
    return run_cli(args, script=script, check=check)


def metric_rows(run_dir: Path, name: str) -> dict[int, float]:
    """{step: value} of one metric in metrics.csv."""
    with open(run_dir / "metrics.csv") as handle:
        return {int(row["step"]): float(row[name]) for row in csv.DictReader(handle) if row.get(name)}


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())
