"""The progress bar and train.log read the logged metrics only at logging steps."""

from __future__ import annotations

import io
import re

import lightning as L
from rich.console import Console

from sft.console import ProgressLog, RunLog, StepProgressBar
from tests.helpers import fit_tiny


def fit(callbacks: list[L.Callback], max_steps: int = 5) -> None:
    fit_tiny(callbacks, max_steps=max_steps, log_every_n_steps=2, enable_checkpointing=False)


def test_the_bar_shows_steps_loss_throughput_and_eta_refreshed_only_at_logging_steps(monkeypatch):
    screen = io.StringIO()
    bar = StepProgressBar(every_n_steps=2, console=Console(file=screen, force_terminal=True, width=150))
    refreshed_at = []
    original = StepProgressBar.refresh

    def refresh(self, trainer):
        refreshed_at.append(trainer.global_step)
        original(self, trainer)

    monkeypatch.setattr(StepProgressBar, "refresh", refresh)
    fit([bar])
    assert refreshed_at == [2, 4, 5]
    final = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue()).split("\r")[-1]
    assert re.search(r"step 5/5 .* loss \d\.\d{4} · [\d,]+ tokens/s · eta 0:00:00", final), final


def test_the_bar_draws_nothing_off_a_terminal():
    screen = io.StringIO()
    fit([StepProgressBar(every_n_steps=2, console=Console(file=screen, force_terminal=False))], max_steps=2)
    assert screen.getvalue() == ""


def test_train_log_gets_one_line_per_logging_step(tmp_path):
    fit([ProgressLog(RunLog(tmp_path / "train.log"), every_n_steps=2)])
    lines = (tmp_path / "train.log").read_text().splitlines()
    assert [re.search(r"\] (step \d+/5) · loss", line).group(1) for line in lines] == [
        "step 2/5",
        "step 4/5",
        "step 5/5",
    ]
