"""sft-train through Hydra end to end: config errors, W&B offline, multirun sweeps, the submitit launcher,
a SLURM requeue, and the Optuna sweeper (when its optional extra is installed)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import SMALL, metric_rows, run_cli, summary, train

pytestmark = pytest.mark.slow

QUICK = ["trainer.max_steps=2", "trainer.val_check_interval=2"]


def wandb_records(run_dir: Path) -> list:
    """The records of the one offline W&B run under `run_dir` (its .wandb file is a LevelDB-style log of
    protobuf records: 7-byte header, then 32 KiB blocks of checksummed chunks)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, position, pending, records = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a chunk header is padding
            position += 32768 - position % 32768
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0:
            break
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_run(run_dir: Path) -> dict:
    """The run's identity, config, history rows and summary, decoded."""
    run, config, history, summary_values = None, {}, [], {}
    for record in wandb_records(run_dir):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            config.update({item.key: json.loads(item.value_json) for item in run.config.update})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            items = record.history.item
            history.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}
            )
        elif kind == "summary":
            items = [item for item in record.summary.update if item.key]
            summary_values.update({item.key: json.loads(item.value_json) for item in items})
    identity = {"id": run.run_id, "name": run.display_name, "group": run.run_group}
    return {**identity, "config": config, "history": history, "summary": summary_values}


def logged(history: list[dict], metric: str) -> list[float]:
    return [row[metric] for row in history if metric in row]


def test_a_typo_or_wrong_type_fails_fast_naming_the_key(tmp_path, cache_dir):
    started = time.perf_counter()
    result = train(tmp_path / "run", cache_dir, "+optim.lrr=1", "trainer.max_steps=abc", check=False)
    assert result.returncode != 0
    assert "optim.lrr: unknown key; did you mean optim.lr?" in result.stderr
    assert "trainer.max_steps='abc': expected int" in result.stderr
    assert "AttributeError" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing was trained
    # Without `+`, Hydra's struct mode refuses the key itself, also by name.
    hydra_refusal = train(tmp_path / "run2", cache_dir, "optim.lrr=1", check=False)
    assert hydra_refusal.returncode != 0 and "optim.lrr" in hydra_refusal.stderr
    assert time.perf_counter() - started < 120  # two start-ups, no data preparation


def test_wandb_offline_run_has_config_metrics_parameter_count_and_generations(tmp_path, cache_dir):
    secret = "sk-test-0123456789abcdef"
    run_dir = tmp_path / "run"
    environment = {**os.environ, "WANDB_MODE": "offline", "WANDB_API_KEY": secret}
    args = [*SMALL, f"data.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}", "logger=wandb", *QUICK]
    command = [sys.executable, "-m", "sft.train", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    run = wandb_run(run_dir)
    (offline_dir,) = run_dir.glob("wandb/offline-run-*")
    assert f"wandb: offline run written to {offline_dir}" in result.stdout
    assert run["name"] == str(run_dir) and run["group"] == ""  # a single run: no sweep group
    assert run["config"]["optim"]["lr"] == 3.0e-3  # the resolved config
    assert run["config"]["model/parameters"] == run["summary"]["model/parameters"] > 0
    for metric in ("train/loss", "val/loss", "eval/exact_match", "train/lr"):
        assert logged(run["history"], metric), metric
    (table,) = logged(run["history"], "eval/generations/path")
    rows = json.loads((offline_dir / "files" / table).read_text())
    assert rows["columns"] == ["step", "prompt", "expected", "generated"]
    assert len(rows["data"]) == 8
    assert all(row[0] == 2 and row[1].endswith("<|im_start|>assistant\n") for row in rows["data"])
    for path in [*run_dir.rglob("*")]:
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    assert secret not in result.stdout + result.stderr


def test_a_multirun_gives_each_job_its_directory_metrics_and_wandb_run_in_one_group(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    args = ["-m", *SMALL, f"data.cache_dir={cache_dir}", f"hydra.sweep.dir={sweep}", *QUICK]
    run_cli([*args, "optim.lr=1e-3,3e-3", "logger=wandb"])
    runs = {job: wandb_run(sweep / job) for job in ("0", "1")}
    for job, lr in (("0", 1e-3), ("1", 3e-3)):
        assert set(summary(sweep / job)["metrics"]) >= {"train/loss", "val/loss"}
        assert runs[job]["config"]["optim"]["lr"] == lr
        assert max(logged(runs[job]["history"], "train/lr")) == pytest.approx(
            lr
        )  # its own metrics, its own run
        assert runs[job]["name"] == str(sweep / job) and runs[job]["group"] == str(sweep)
    assert runs["0"]["id"] != runs["1"]["id"]


def test_the_submitit_local_launcher_runs_a_ddp_job_whose_directory_survives_a_requeue(tmp_path, cache_dir):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep-${now:%H-%M-%S-%f}"  # a timestamp, as in the default sweep directory
    args = ["-m", *SMALL, f"data.cache_dir={cache_dir}", f"hydra.sweep.dir={sweep}", *QUICK]
    run_cli(
        [*args, "hydra/launcher=local", "hardware=ddp_cpu", "data.batch_size=2", "eval.exact_match=false"]
    )
    (job_dir,) = tmp_path.glob("sweep-*/0")
    assert "val/loss" in summary(job_dir)["metrics"]
    assert set(metric_rows(job_dir, "train/loss")) == {0, 1}
    # A requeued SLURM job re-runs this pickle in a new process: the timestamp must resolve as at submission.
    (submitted,) = job_dir.parent.glob(".submitit/*/*_submitted.pkl")
    script = (
        "import pickle, sys; from hydra.core.utils import setup_globals; setup_globals(); "
        "job = pickle.load(open(sys.argv[1], 'rb')); print(job.function.config.hydra.sweep.dir)"
    )
    resolved = run_cli([str(submitted)], script=script).stdout.strip()
    assert resolved == str(job_dir.parent)


SIGNAL_AT_STEP_2 = """
import os, signal, sys
from sft.module import SFTModule
original = SFTModule.on_train_batch_end
def on_train_batch_end(self, outputs, batch, batch_idx):
    result = original(self, outputs, batch, batch_idx)
    if self.global_step == 2:
        os.kill(os.getpid(), signal.SIGUSR1)  # what SLURM sends signal_delay_s before the time limit
    return result
SFTModule.on_train_batch_end = on_train_batch_end
sys.argv[0] = "sft-train"
from sft.cli.train import main
main()
"""

# Stands in for SLURM: records the requeue and kills the job, as SLURM does before re-running it.
FAKE_SCONTROL = """#!/bin/sh
echo "$@" >> "$(dirname "$0")/requeued"
kill -9 $PPID
"""


def test_a_slurm_requeue_signal_checkpoints_requeues_and_the_job_resumes(tmp_path, cache_dir):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_JOB_NAME": "sft",
        "SLURM_JOB_ID": "4242",
    }
    slurm |= {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}
    environment = {**os.environ, **slurm, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    run_dir = tmp_path / "run"  # deterministic: the requeued job finds its checkpoint here
    args = [*SMALL, f"data.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}", "ckpt_path=last"]
    args += ["trainer.max_steps=4", "trainer.val_check_interval=4", "checkpoint.every_n_train_steps=100"]
    args += ["data.batch_size=2", "eval.exact_match=false"]

    def job(script: str | None = None) -> subprocess.CompletedProcess:
        entry = ["-c", script] if script else ["-m", "sft.train"]
        command = [sys.executable, *entry, *args]
        return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)

    signalled = job(SIGNAL_AT_STEP_2)
    assert signalled.returncode == -9, signalled.stderr[-3000:]
    assert (bin_dir / "requeued").read_text().split() == ["requeue", "4242"]
    assert (run_dir / "hpc_ckpt_1.ckpt").is_file() and not (run_dir / "checkpoints" / "last.ckpt").exists()
    requeued = job()
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert str(run_dir / "hpc_ckpt_1.ckpt") in requeued.stdout + requeued.stderr  # restored from it
    assert summary(run_dir)["steps"] == 4
    assert {2, 3} <= set(metric_rows(run_dir, "train/loss"))  # steps 0 and 1 ran before the signal


def test_the_optuna_sweeper_minimises_the_returned_val_loss(tmp_path, cache_dir):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "sweep"
    args = ["-m", *SMALL, f"data.cache_dir={cache_dir}", f"hydra.sweep.dir={sweep}", *QUICK]
    run_cli([*args, "hydra/sweeper=optuna_lr", "hydra.sweeper.n_trials=2", "eval.exact_match=false"])
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    val_losses = [summary(sweep / job)["metrics"]["val/loss"] for job in ("0", "1")]
    assert results["best_value"] == pytest.approx(min(val_losses))
