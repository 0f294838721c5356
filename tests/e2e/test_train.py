"""sft-train end to end: outputs, DDP on CPU, and kill-and-resume."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from sft.cli.schemas import TrainConfig
from sft.cli.train import checkpoint_step
from sft.config import load_config
from sft.hardware import plan_hardware
from tests.helpers import SMALL, metric_rows, run_cli, summary, train

pytestmark = pytest.mark.slow

METRICS = (
    "train/loss",
    "val/loss",
    "train/tokens_per_s",
    "train/trained_tokens",
    "train/mfu",
    "eval/exact_match",
)


def test_a_run_writes_checkpoint_metrics_and_summary(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    result = train(run_dir, cache_dir, "trainer.max_steps=4", "trainer.val_check_interval=4")
    result_summary = summary(run_dir)
    assert set(METRICS) <= set(result_summary["metrics"])
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "tokenizer.json").is_file() and (run_dir / "template.json").is_file()
    assert set(metric_rows(run_dir, "train/loss")) == {0, 1, 2, 3}
    assert "summary:" in result.stdout and str(run_dir) in result.stdout
    assert result_summary["data"]["read"] == result_summary["data"]["kept"] == 256
    # The precision `auto` picked on this CPU, why, and the peak of that precision as MFU's denominator.
    hardware = plan_hardware(
        load_config(OmegaConf.load(run_dir / ".hydra/config.yaml"), TrainConfig).hardware
    )
    assert result_summary["hardware"] == hardware.record()
    assert 0 < result_summary["metrics"]["train/mfu"] <= 1


def test_a_30_step_run_with_the_default_schedule_validates_and_keeps_a_best_checkpoint(tmp_path, cache_dir):
    """The defaults (warmup 30, validation every 350) are written for 700 steps: scaled to this run."""
    run_dir = tmp_path / "run"
    # bf16 autocast: sft-eval scores under the run's own precision, so its val/loss matches to 1e-4
    bf16 = "hardware.precision=bf16-mixed"
    result = train(run_dir, cache_dir, "trainer.max_steps=30", "eval.exact_match=false", bf16)
    assert "note: optim.warmup_steps: 30 -> 3" in result.stdout
    assert "note: trainer.val_check_interval: 350 -> 15 batches" in result.stdout
    assert set(metric_rows(run_dir, "val/loss")) == {14, 29}
    assert summary(run_dir)["best_checkpoint"].endswith("best-step30.ckpt")
    lr = metric_rows(run_dir, "train/lr")
    assert lr[2] == max(lr.values()) and lr[29] < lr[2]  # warmed up, then decayed

    # sft-eval with the checkpoint alone scores the run's own validation data with its protocol
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "sft.cli.eval", f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}"]
    subprocess.run([*command, f"out={report}", "device=cpu"], check=True, capture_output=True, timeout=600)
    logged = summary(run_dir)["metrics"]["val/loss"]
    assert math.isclose(json.loads(report.read_text())["metrics"]["val/loss"], logged, rel_tol=1e-4)


def test_two_cpu_processes_match_one_process_over_the_same_global_batch(tmp_path, cache_dir):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    common = ["trainer.max_steps=2", "trainer.val_check_interval=2", "eval.exact_match=false"]
    train(single, cache_dir, "hardware=cpu", "hardware.precision=32-true", "data.batch_size=4", *common)
    train(ddp, cache_dir, "hardware=ddp_cpu", "data.batch_size=2", *common)
    for metric in ("train/loss", "train/grad_norm", "train/trained_tokens"):
        one, two = metric_rows(single, metric), metric_rows(ddp, metric)
        assert one.keys() == two.keys() == {0, 1}
        for step in one:
            assert math.isclose(one[step], two[step], rel_tol=1e-5), (metric, step, one[step], two[step])
    assert math.isclose(
        summary(single)["metrics"]["val/loss"], summary(ddp)["metrics"]["val/loss"], rel_tol=1e-5
    )


KILL_AT_STEP = """
import os, sys
from sft.module import SFTModule
original = SFTModule.on_train_batch_end
def on_train_batch_end(self, outputs, batch, batch_idx):
    if self.global_step == int(os.environ["SFT_TEST_KILL_AT"]):
        os._exit(17)  # a hard kill: no cleanup, no final checkpoint
    return original(self, outputs, batch, batch_idx)
SFTModule.on_train_batch_end = on_train_batch_end
sys.argv[0] = "sft-train"
from sft.cli.train import main
main()
"""


@pytest.mark.parametrize("kill_at", [7, 24], ids=["first-epoch", "second-epoch"])
def test_kill_and_resume_continues_with_identical_losses(tmp_path, cache_dir, monkeypatch, kill_at):
    """Checkpoints every 11 steps; an epoch is ~20 steps: killing at 24 resumes from step 22, in epoch 2."""
    common = ["trainer.max_steps=28", "trainer.val_check_interval=14", "checkpoint.every_n_train_steps=11"]
    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    train(uninterrupted, cache_dir, *common)
    monkeypatch.setenv("SFT_TEST_KILL_AT", str(kill_at))
    killed = train(resumed, cache_dir, *common, script=KILL_AT_STEP, check=False)
    assert killed.returncode == 17, killed.stderr[-2000:]
    train(resumed, cache_dir, *common, "ckpt_path=last")
    want, got = metric_rows(uninterrupted, "train/loss"), metric_rows(resumed, "train/loss")
    assert got.keys() == want.keys() == set(range(28))  # metrics.csv keeps the rows from before the kill
    for step in range(28):
        assert math.isclose(want[step], got[step], rel_tol=1e-6), (step, want[step], got[step])
    resumed_from = kill_at // 11 * 11
    assert metric_rows(uninterrupted, "epoch")[resumed_from] == (0 if kill_at < 11 else 1)


def files_of(directory) -> dict[str, bytes]:
    return {str(path): path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file()}


def test_ctrl_c_saves_a_checkpoint_and_the_bare_resume_command_continues_the_run(tmp_path, cache_dir):
    """SIGINT after step 3's line: the step in flight finishes, last.ckpt saves it, the exit code is the
    shell's for SIGINT. A resume that would change the model is refused with no file in the run directory
    changed; the printed command alone (no original overrides) continues to an uninterrupted run's losses."""
    common = ["trainer.max_steps=12", "trainer.val_check_interval=6", "eval.exact_match=false"]
    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    train(uninterrupted, cache_dir, *common)
    args = [*SMALL, f"data.cache_dir={cache_dir}", f"hydra.run.dir={interrupted}", *common]
    command = [sys.executable, "-m", "sft.train", *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("step 3/12 · loss"):
            process.send_signal(signal.SIGINT)
    assert process.wait(timeout=600) == 130, "".join(lines)
    (resume,) = [line.split()[2:] for line in lines if line.startswith("resume with:")]
    assert resume == ["sft-train", "ckpt_path=last", f"hydra.run.dir={interrupted}"]
    assert 3 <= checkpoint_step(str(interrupted / "checkpoints" / "last.ckpt")) < 12

    before = files_of(interrupted)
    refused = run_cli([*resume[1:], "model=gpt-small"], check=False)
    assert refused.returncode != 0 and "model.hidden_size (the run has 128)" in refused.stderr
    assert files_of(interrupted) == before

    run_cli(resume[1:])
    want, got = metric_rows(uninterrupted, "train/loss"), metric_rows(interrupted, "train/loss")
    assert got.keys() == want.keys() == set(range(12))
    for step in range(12):
        assert math.isclose(want[step], got[step], rel_tol=1e-6), (step, want[step], got[step])
