"""A resume reuses the run's config and refuses, before anything is written, what would change it."""

from __future__ import annotations

import pytest
import yaml

from sft.config import ConfigError
from sft.resume import RUN_FILE, SAVED_CONFIG, compose_train, resume_arguments


@pytest.fixture
def run_dir(tmp_path):
    """A run of `data.num_train=240 trainer.max_steps=30` whose warmup sft-train fitted from 30 to 3."""
    config = compose_train(["data.num_train=240", "trainer.max_steps=30"])
    config["optim"]["warmup_steps"] = 3
    del config["model"]["name"]  # a Llama preset's label: the typed config does not keep it
    record = {"config": config, "fitted": {"optim.warmup_steps": 30}}
    (tmp_path / RUN_FILE).write_text(yaml.safe_dump(record))
    return tmp_path


def test_a_bare_resume_composes_the_saved_config(run_dir):
    arguments = resume_arguments(["ckpt_path=last", f"hydra.run.dir={run_dir}"])
    assert arguments == [
        "--config-name",
        SAVED_CONFIG,
        "ckpt_path=last",
        f"hydra.run.dir={run_dir}",
        "hydra.output_subdir=null",
    ]


def test_resumable_keys_pass_and_a_longer_run_is_warned_about(run_dir, capsys):
    arguments = resume_arguments(["ckpt_path=last", f"hydra.run.dir={run_dir}", "trainer.max_steps=60"])
    assert "trainer.max_steps=60" in arguments
    assert "trainer.max_steps: 30 -> 60 on resume" in capsys.readouterr().err


def test_the_original_command_line_repeated_is_a_resume(run_dir):
    """A requeued job repeats its command; the fitted warmup accepts the value it was composed with."""
    command = ["data.num_train=240", "trainer.max_steps=30", "optim.warmup_steps=30", "model=gpt-tiny"]
    arguments = resume_arguments([*command, "ckpt_path=last", f"hydra.run.dir={run_dir}"])
    assert arguments[:2] == ["--config-name", SAVED_CONFIG] and "model=gpt-tiny" not in arguments


@pytest.mark.parametrize(
    ("change", "keys"),
    [
        ("model=gpt-small", "model.hidden_size"),
        ("data.num_train=999", "data.num_train"),
        ("protocol.max_seq_len=128", "protocol.max_seq_len"),
        ("optim.lr=1.0", "optim.lr"),
    ],
)
def test_a_change_to_the_model_or_data_is_refused_naming_the_key(run_dir, change, keys):
    with pytest.raises(ConfigError, match=rf"{keys} \(the run has .*Keys a resume may set: ckpt_path"):
        resume_arguments(["ckpt_path=last", f"hydra.run.dir={run_dir}", change])


def test_a_new_run_directory_or_no_ckpt_path_is_a_fresh_run(run_dir, tmp_path):
    fresh = ["ckpt_path=last", f"hydra.run.dir={tmp_path / 'new'}", "model=gpt-small"]
    assert resume_arguments(fresh) == fresh
    assert resume_arguments([f"hydra.run.dir={run_dir}", "model=gpt-small"])[-1] == "model=gpt-small"
    assert resume_arguments(["-m", "ckpt_path=last", f"hydra.run.dir={run_dir}", "optim.lr=1,2"])[0] == "-m"
