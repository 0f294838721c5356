"""W&B helpers (secrets, offline decision, held-out generation items) and the SLURM resume wiring."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from sft.cli.train import cluster_plugins, resume_from
from sft.protocol.labels import IGNORE_INDEX
from sft.redaction import REDACTED, redact_secrets
from sft.wandb_generations import held_out_items
from sft.wandb_logger import offline_reason


def test_secrets_are_redacted_by_key_and_by_value(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123")
    config = {
        "logger": {"api_key": "abc", "name": "wandb"},
        "template": {"eos_token": "<|im_end|>", "bos_token": None},  # vocabulary, not a credential
        "data": {"train": ["https://user:0123456789abcdef0123@host/x.jsonl"]},
        "hf_token": "hf_xyz",
    }
    redacted = redact_secrets(config)
    assert redacted["logger"] == {"api_key": REDACTED, "name": "wandb"}
    assert redacted["template"] == config["template"]
    assert redacted["data"]["train"] == [f"https://user:{REDACTED}@host/x.jsonl"]
    assert redacted["hf_token"] == REDACTED
    assert config["logger"]["api_key"] == "abc"  # a copy


def test_offline_without_credentials_or_when_asked(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert offline_reason(None) == "WANDB_MODE=offline"
    monkeypatch.delenv("WANDB_MODE")
    assert "no W&B credentials" in offline_reason(None)
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password 0123456789\n")
    assert offline_reason(None) is None
    assert offline_reason(True) == "logger.offline=true" and offline_reason(False) is None


class Dataset:
    def __init__(self, examples):
        self.index = examples
        self.example_ids = np.arange(len(examples))


def test_held_out_items_end_the_prompt_where_the_last_answer_starts():
    ids = np.arange(10, 22)
    labels = np.full(12, IGNORE_INDEX)
    labels[3:5] = ids[3:5]  # a first answer, in the prompt
    labels[8:11] = ids[8:11]  # the last answer: the reference
    nothing_trained = (ids, np.full(12, IGNORE_INDEX))
    items = held_out_items(Dataset([(ids, labels), nothing_trained, (ids, labels)]), count=2)
    assert items == [(list(range(10, 18)), [18, 19, 20])]


def test_resume_last_prefers_a_newer_requeue_checkpoint(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert resume_from("last", tmp_path) == "last"  # nothing yet: Lightning's "resume if present"
    last.write_bytes(b"")
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    hpc.write_bytes(b"")
    os.utime(last, (time.time() - 60,) * 2)
    assert resume_from("last", tmp_path) == str(hpc)
    os.utime(hpc, (time.time() - 120,) * 2)
    assert resume_from("last", tmp_path) == "last"
    assert resume_from(None, tmp_path) is None and resume_from("x.ckpt", tmp_path) == "x.ckpt"


def test_slurm_jobs_get_lightnings_auto_requeue_on_sigusr1(monkeypatch):
    for name in [key for key in os.environ if key.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    assert cluster_plugins() == []
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "sft")
    (environment,) = cluster_plugins()
    assert environment.auto_requeue and environment.requeue_signal == signal.SIGUSR1


@pytest.mark.parametrize("job_name", ["bash", "interactive"])
def test_an_interactive_allocation_is_not_a_slurm_job(monkeypatch, job_name):
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", job_name)
    assert cluster_plugins() == []


def test_resumed_csv_logger_keeps_the_rows_before_the_checkpoint(tmp_path):
    from sft.csv_logger import ResumableCSVLogger

    first = ResumableCSVLogger(tmp_path)
    for step in range(5):
        first.log_metrics({"train/loss": float(step)}, step=step)
    first.save()
    resumed = ResumableCSVLogger(tmp_path, resume_step=3)  # steps 3 and 4 will be logged again
    resumed.log_metrics({"train/loss": 30.0, "val/loss": 1.0}, step=3)
    resumed.save()
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",") == ["step", "train/loss", "val/loss"]
    assert [row.split(",")[:2] for row in rows[1:]] == [
        ["0", "0.0"],
        ["1", "1.0"],
        ["2", "2.0"],
        ["3", "30.0"],
    ]


def test_no_credential_value_reaches_wandb_and_env_interpolations_stay_unresolved(tmp_path, monkeypatch):
    """`logger.notes=${oc.env:HF_TOKEN}` resolves for the run, but W&B gets the notes redacted and the
    config with the interpolation itself, never the token."""
    from hydra import compose, initialize_config_module
    from hydra.core.hydra_config import HydraConfig

    from sft.cli.schemas import TrainConfig
    from sft.cli.train import build_logger, config_record
    from sft.config import load_config

    secret = "hf_abcdefgh0123456789"
    monkeypatch.setenv("HF_TOKEN", secret)
    overrides = ["logger=wandb", "logger.notes=run ${oc.env:HF_TOKEN}", "logger.tags=[${oc.env:HF_TOKEN}]"]
    with initialize_config_module("sft.conf", version_base="1.3"):
        HydraConfig.instance().set_config(compose("train", overrides=overrides, return_hydra_config=True))
        cfg = compose("train", overrides=overrides)
    try:
        config = load_config(cfg, TrainConfig)
        assert config.logger.notes == f"run {secret}"  # the run itself may use the value
        logger = build_logger(config, tmp_path, config_record(cfg), resume_step=None)
    finally:
        HydraConfig.instance().cfg = None
    sent = repr(logger._wandb_init)
    assert secret not in sent
    assert logger._wandb_init["notes"] == f"run {REDACTED}"
    assert logger._wandb_init["config"]["logger"]["notes"] == "run ${oc.env:HF_TOKEN}"
