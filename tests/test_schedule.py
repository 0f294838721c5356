"""The schedule fitted to the run's length: defaults scale, explicit values that cannot work are named."""

from __future__ import annotations

import pytest

from sft.config import ConfigError
from sft.schedule import command_line_keys, fit_schedule


def test_defaults_scale_to_a_short_run():
    fitted = fit_schedule(30, 1, warmup_steps=30, val_check_interval=350, explicit={"trainer.max_steps"})
    assert (fitted.warmup_steps, fitted.val_check_interval) == (3, 15)
    keys = [note.split(":")[0] for note in fitted.notes]
    assert keys == ["optim.warmup_steps", "trainer.val_check_interval"]
    assert not fitted.warnings


def test_the_default_run_is_left_as_it_is():
    fitted = fit_schedule(700, 1, warmup_steps=30, val_check_interval=350, explicit=set())
    assert (fitted.warmup_steps, fitted.val_check_interval, fitted.notes) == (30, 350, [])


def test_an_explicit_warmup_as_long_as_the_run_is_refused_naming_both_keys():
    with pytest.raises(ConfigError, match=r"optim.warmup_steps=30 >= trainer.max_steps=30"):
        fit_schedule(30, 1, warmup_steps=30, val_check_interval=10, explicit={"optim.warmup_steps"})


def test_a_swept_warmup_that_cannot_fit_is_scaled_not_refused():
    keys = {"optim.warmup_steps"}
    fitted = fit_schedule(2, 1, warmup_steps=30, val_check_interval=2, explicit=keys, swept=keys)
    assert fitted.warmup_steps == 0 and "drawn by the sweeper" in fitted.notes[0]
    assert fit_schedule(700, 1, 100, 350, explicit=keys, swept=keys).warmup_steps == 100


def test_an_explicit_interval_beyond_the_run_is_kept_with_a_warning():
    explicit = {"trainer.val_check_interval"}
    fitted = fit_schedule(30, 2, warmup_steps=0, val_check_interval=100, explicit=explicit)
    assert fitted.val_check_interval == 100
    assert fitted.warnings == [
        "trainer.val_check_interval=100 batches exceeds the run (trainer.max_steps=30 x "
        "trainer.accumulate_grad_batches=2 = 60 batches): validation runs only at the end"
    ]


def test_an_epoch_based_run_or_a_fractional_interval_is_left_alone():
    assert fit_schedule(-1, 1, 30, 350, set()).notes == []
    assert fit_schedule(30, 1, 0, 0.5, set()).val_check_interval == 0.5


def test_command_line_keys():
    assert command_line_keys(["optim.lr=1", "+trainer.x=2", "~eval", "model=hf"]) == {
        "optim.lr",
        "trainer.x",
        "model",
    }
