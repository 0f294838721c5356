"""The pre-Hydra entry of every CLI: the command line is checked against the schema before Hydra composes
and writes `.hydra/`; a refused command line leaves no file behind and no credential anywhere."""

from __future__ import annotations

import sys

import pytest

from sft.cli import chat, eval, export, inspect, prepare, train

SECRET = "hf_s3cr3t_value_0123456789"


def run_main(main, tmp_path, monkeypatch, *overrides: str) -> str:
    """The message a refused command line ends with; nothing may be written under tmp_path."""
    monkeypatch.chdir(tmp_path)
    argv = ["sft", *overrides, f"hydra.run.dir={tmp_path / 'run'}"]
    if main in (train.main, prepare.main, inspect.main):
        argv.append(f"data.cache_dir={tmp_path / 'cache'}")
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert list(tmp_path.iterdir()) == [], "a refused command line wrote files"
    return str(exit_info.value.code)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["optim.lrr=1"], "sft-train: optim.lrr: unknown key; did you mean optim.lr?"),
        (["protocol.mask=last"], "protocol.mask='last': expected one of all_assistant, last_turn, all_tokens"),  # noqa: E501
        (["model.hidden_szie=3"], "model.hidden_szie: unknown key; did you mean model.hidden_size?"),
        (["trainer.gradient_clip_val=1.0"], "trainer.gradient_clip_val: set by sft-train; use optim.grad_clip"),  # noqa: E501
        (["trainer.max_stepz=3"], "trainer.max_stepz: not an argument of lightning.Trainer; did you mean"),
        (["logger=wandb", "logger.projct=x"], "logger.projct: unknown key; did you mean logger.project?"),
        (["optim.lr=-1"], "optim.lr=-1.0: expected > 0"),
        (["data.batch_size=0"], "data.batch_size=0: expected >= 1"),
        (["optim.warmup_steps=-3"], "optim.warmup_steps=-3: expected >= 0"),
        (["data.val_fraction=-0.2"], "data.val_fraction=-0.2: expected 0 <= val_fraction < 1"),
        (["data=jsonl", "data.train=[a.jsonl]", "data.mix=[-1,2]"], "data.mix=[-1.0, 2.0]: expected non-negative"),  # noqa: E501
        (["data=jsonl", "data.train=[a.jsonl,b.jsonl]", "data.mix=[0,0]"], "with a positive sum"),
        (["data=jsonl", "data.train=[a.jsonl]", "data.mix=[1,2]"], "data.mix has 2 weights for 1 data.train files"),  # noqa: E501
    ],
)  # fmt: skip
def test_sft_train_refuses_a_bad_command_line_before_hydra_writes_or_data_is_read(
    overrides, message, tmp_path, monkeypatch
):
    refusal = run_main(train.main, tmp_path, monkeypatch, *overrides)
    assert message in refusal
    assert "Traceback" not in refusal and "is not in struct" not in refusal


def test_a_wrong_choice_is_one_line(tmp_path, monkeypatch):
    refusal = run_main(train.main, tmp_path, monkeypatch, "protocol.mask=last")
    assert refusal.count("\n") == 0 and refusal.startswith("sft-train: protocol.mask=")


def test_every_problem_of_a_command_line_is_named_at_once(tmp_path, monkeypatch):
    refusal = run_main(train.main, tmp_path, monkeypatch, "optim.lr=-1", "data.batch_size=0")
    assert "optim.lr=-1.0" in refusal and "data.batch_size=0" in refusal


@pytest.mark.parametrize(
    "main,overrides,message",
    [
        (prepare.main, ["protocol.maks=last_turn"], "sft-prepare: protocol.maks: unknown key; did you mean"),
        (inspect.main, ["spilt=val"], "sft-inspect: spilt: unknown key; did you mean split?"),
        (chat.main, ["ckpt=x", "temprature=1"], "sft-chat: temprature: unknown key; did you mean temperature?"),  # noqa: E501
        (eval.main, ["ckpt=x", "data.vall=[a]"], "sft-eval: data.vall: unknown key; did you mean data.val?"),
        (export.main, ["ckpt=x", "out=y", "dtype=fp8"], "sft-export: dtype='fp8': expected one of float32"),
    ],
)  # fmt: skip
def test_every_cli_checks_its_command_line_before_hydra(main, overrides, message, tmp_path, monkeypatch):
    program, problem = message.split(": ", 1)
    refusal = run_main(main, tmp_path, monkeypatch, *overrides)
    assert refusal.startswith(f"{program}: ") and problem in refusal


@pytest.mark.parametrize(
    "overrides",
    [
        ["logger=wandb", f"+logger.api_key={SECRET}"],
        ["+wandb_api_key=whatever"],
        ["logger=wandb", f"logger.notes={SECRET}"],  # the value of a credential variable, typed out
    ],
)
def test_credentials_on_the_command_line_are_refused_before_anything_is_written(
    overrides, tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    refusal = run_main(train.main, tmp_path, monkeypatch, *overrides)
    assert SECRET not in refusal and ("credential" in refusal)
