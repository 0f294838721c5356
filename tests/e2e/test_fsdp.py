"""hardware=fsdp_cpu (FSDP2 over gloo) matches one process step for step, clips by the global gradient norm,
evaluates with a sharded model, generates during training with its gathered copy, and resumes from its
checkpoint with identical losses.

Run as the `sft-train` console script: ModelParallelStrategy re-launches the command line for each extra
process, which `python -c` cannot be."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sft.checkpoint import load_for_inference
from tests.helpers import SMALL, metric_rows, summary

pytestmark = pytest.mark.slow

SFT_TRAIN = str(Path(sys.executable).with_name("sft-train"))
# Tight clipping (every step clips, so a per-rank norm would diverge at once), fp32 (sums equal to 1e-5),
# and an odd number of exact-match items and validation rows (ranks get different amounts of work).
COMMON = [
    "trainer.max_steps=4",
    "trainer.val_check_interval=4",
    "optim.grad_clip=0.05",
    "hardware.precision=32-true",
    "data.num_val=15",
    "eval.max_items=7",
]


KILL_AT_STEP = """
import os
from sft.module import SFTModule
original = SFTModule.on_train_batch_end
def on_train_batch_end(self, outputs, batch, batch_idx):
    if self.global_step == int(os.environ["SFT_TEST_KILL_AT"]):
        os._exit(17)  # a hard kill of every rank: no cleanup, no final checkpoint
    return original(self, outputs, batch, batch_idx)
SFTModule.on_train_batch_end = on_train_batch_end
"""


def sft_train(run_dir: Path, cache_dir: Path, *overrides: str, env: dict | None = None) -> int:
    command = [
        SFT_TRAIN,
        *SMALL,
        *COMMON,
        f"data.cache_dir={cache_dir}",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]
    # A session of its own: on a timeout (a hung collective) the re-launched rank is killed too.
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env
    )
    try:
        stdout, stderr = process.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
    if process.returncode != 0 and env is None:
        raise AssertionError(f"{command} failed ({process.returncode}):\n{stdout[-3000:]}\n{stderr[-5000:]}")
    return process.returncode


def assert_same_steps(want: Path, got: Path, steps: set[int]) -> None:
    for metric in ("train/loss", "train/grad_norm", "train/trained_tokens"):
        one, two = metric_rows(want, metric), metric_rows(got, metric)
        assert one.keys() == two.keys() == steps, metric
        for step in steps:
            assert math.isclose(one[step], two[step], rel_tol=1e-5), (metric, step, one[step], two[step])


@pytest.fixture(scope="module")
def single(tmp_path_factory, cache_dir) -> Path:
    """The reference: one process over the same global batch (4 rows = 2 ranks x 2)."""
    run_dir = tmp_path_factory.mktemp("fsdp") / "single"
    sft_train(run_dir, cache_dir, "hardware=cpu", "data.batch_size=4", "eval.generate_every_n_steps=2")
    return run_dir


def test_two_sharded_processes_match_one_process(tmp_path, cache_dir, single):
    sharded = tmp_path / "sharded"
    sft_train(sharded, cache_dir, "hardware=fsdp_cpu", "data.batch_size=2", "eval.generate_every_n_steps=2")
    assert_same_steps(single, sharded, {0, 1, 2, 3})
    for metric in ("gen/exact_match", "gen/token_f1"):  # generated on rank 0 by the gathered full model
        assert (
            metric_rows(sharded, metric) == metric_rows(single, metric)
            and len(metric_rows(single, metric)) == 2
        )
    assert all(norm > 0.05 for norm in metric_rows(single, "train/grad_norm").values())  # clipping ran
    want, got = summary(single)["metrics"], summary(sharded)["metrics"]
    for metric in ("val/loss", "eval/exact_match"):
        assert math.isclose(want[metric], got[metric], rel_tol=1e-5), (metric, want[metric], got[metric])
    # One consolidated checkpoint file (not shards), read like any other: resume, sft-chat, eval, export.
    assert summary(sharded)["steps"] == 4
    full = load_for_inference(summary(single)["checkpoint"]).model.state_dict()
    gathered = load_for_inference(summary(sharded)["checkpoint"]).model.state_dict()
    assert {k: v.shape for k, v in full.items()} == {k: v.shape for k, v in gathered.items()}


def test_a_killed_sharded_run_resumes_with_identical_losses(tmp_path, cache_dir, single):
    """Checkpoint at step 2, every rank killed at step 3, resumed from the checkpoint by `ckpt_path=last`."""
    resumed, hook = tmp_path / "resumed", tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_AT_STEP)  # imported by every rank, re-launched ones too
    env = {**os.environ, "PYTHONPATH": f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    common = ["hardware=fsdp_cpu", "data.batch_size=2", "checkpoint.every_n_train_steps=2"]
    killed = sft_train(resumed, cache_dir, *common, env={**env, "SFT_TEST_KILL_AT": "3"})
    assert killed == 17
    sft_train(resumed, cache_dir, *common, "ckpt_path=last")
    assert_same_steps(single, resumed, {0, 1, 2, 3})
