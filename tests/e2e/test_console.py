"""What a person sees: a run and its resume print only the lines listed here, piped stdout gets one line
per logging interval, and train.log keeps them."""

from __future__ import annotations

import re

import pytest

from tests.helpers import train

pytestmark = pytest.mark.slow

NUMBER = r"[\d,.e+-]+"
ALLOWED = [
    r"note: (optim\.warmup_steps|trainer\.val_check_interval): .* give it to choose\)",
    r"read \d+ = kept \d+ \+ skipped 0 \+ dropped 0",
    rf"model: LlamaForCausalLM, {NUMBER} parameters \({NUMBER} trainable\)",
    r"precision \S+ \(.*\)(; \S+ peak: .* FLOP/s)?",
    r"Using bfloat16 Automatic Mixed Precision \(AMP\)",
    r"warning: trainer\.max_steps: 4 -> 6 on resume: the learning-rate schedule is reshaped from here on .*",
    r"Seed set to 1234",
    r"GPU available: False, used: False",
    r"TPU available: False, using: 0 TPU cores",
    r"Restoring states from the checkpoint path at .*/checkpoints/last\.ckpt",
    r"Restored all states from the checkpoint at .*/checkpoints/last\.ckpt",
    rf"step \d+/\d+ · loss {NUMBER} · lr {NUMBER} · {NUMBER} tokens/s · elapsed [\d:]+ · eta [\d:]+",
    rf"step \d+/\d+ · eval/exact_match {NUMBER} · val/loss {NUMBER}",
    r"`Trainer\.fit` stopped: `max_steps=\d+` reached\.",
    r"run directory: .*",
    r"checkpoint: +.*/checkpoints/last\.ckpt",
    r"metrics: +.*/metrics\.csv",
    r"summary: +.*/summary\.json",
    rf"  [a-z_/]+ +{NUMBER}",
]


def unexpected_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if not any(re.fullmatch(p, line) for p in ALLOWED)]


def test_a_run_and_its_resume_print_only_the_expected_lines(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    common = ["trainer.enable_progress_bar=true", "checkpoint.every_n_train_steps=3"]
    first = train(run_dir, cache_dir, "trainer.max_steps=4", *common)
    resumed = train(run_dir, cache_dir, "trainer.max_steps=6", "ckpt_path=last", *common)  # mid-epoch
    for result in (first, resumed):
        assert unexpected_lines(result.stdout + result.stderr) == []
    assert [line.split(" · ")[0] for line in first.stdout.splitlines() if " · loss " in line] == [
        f"step {step}/4" for step in range(1, 5)
    ]
    log = (run_dir / "train.log").read_text()
    for line in ["step 4/4 · loss", "step 4/4 · eval/exact_match", "step 6/6 · loss", "run directory:"]:
        assert line in log
