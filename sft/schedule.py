"""The run's schedule fitted to its length, decided before any data is read.

A default written for the default run (warmup 30 steps, validation every 350 batches) must not silently
break a short one: `trainer.max_steps=30` would warm up for the whole run and never validate. Defaults
(values not given on the command line) are scaled to the run; explicit values that cannot work are refused
or warned about, naming the keys. Validation also always runs at the end (sft.callbacks.ValidateAtEnd).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sft.config import ConfigError

WARMUP_SHARE = 10  # a default warmup takes at most 1/10 of the run


@dataclass
class FittedSchedule:
    """The values to train with, and one line per value changed or worth a warning."""

    warmup_steps: int
    val_check_interval: int | float | None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def command_line_keys(overrides: list[str]) -> set[str]:
    """The keys set on the command line (`optim.warmup_steps=3`, `+trainer.x=1`): explicit choices."""
    return {override.split("=", 1)[0].lstrip("+~") for override in overrides if "=" in override}


def fit_schedule(
    max_steps: int,
    accumulate_grad_batches: int,
    warmup_steps: int,
    val_check_interval: int | float | None,
    explicit: set[str],
    swept: set[str] = frozenset(),
) -> FittedSchedule:
    """Warmup and validation interval for a run of `max_steps` optimizer steps (-1: epochs; left alone).

    `explicit`: keys given on the command line; `swept`: those a sweeper (Optuna) draws, whose values are
    not the user's choice for this run's length: one that cannot work is scaled like a default.
    `val_check_interval` counts batches (Lightning's unit), so a run has `max_steps × accumulate` of them."""
    fitted = FittedSchedule(warmup_steps, val_check_interval)
    if max_steps <= 0:
        return fitted
    warmup_given = "optim.warmup_steps" in explicit
    if warmup_steps >= max_steps and warmup_given and "optim.warmup_steps" not in swept:
        raise ConfigError(
            f"optim.warmup_steps={warmup_steps} >= trainer.max_steps={max_steps}: the learning rate would "
            f"warm up for the whole run and never decay; give optim.warmup_steps below trainer.max_steps "
            f"(e.g. optim.warmup_steps={max_steps // WARMUP_SHARE})"
        )
    too_long = warmup_steps >= max_steps if warmup_given else warmup_steps > max_steps // WARMUP_SHARE
    if too_long:
        fitted.warmup_steps = max_steps // WARMUP_SHARE
        fitted.notes.append(
            f"optim.warmup_steps: {warmup_steps} -> {fitted.warmup_steps} "
            f"({'drawn by the sweeper' if warmup_given else 'not given on the command line'}: scaled to "
            f"1/{WARMUP_SHARE} of trainer.max_steps={max_steps}; give it to choose)"
        )
    run_batches = max_steps * accumulate_grad_batches
    if isinstance(val_check_interval, int) and val_check_interval > run_batches:
        if "trainer.val_check_interval" in explicit:
            fitted.warnings.append(
                f"trainer.val_check_interval={val_check_interval} batches exceeds the run "
                f"(trainer.max_steps={max_steps} x trainer.accumulate_grad_batches={accumulate_grad_batches}"
                f" = {run_batches} batches): validation runs only at the end"
            )
        else:
            fitted.val_check_interval = max(1, run_batches // 2)
            fitted.notes.append(
                f"trainer.val_check_interval: {val_check_interval} -> {fitted.val_check_interval} batches "
                f"(not given on the command line: scaled to half of this {run_batches}-batch run; "
                "validation also runs at the end; give it to choose)"
            )
    return fitted
