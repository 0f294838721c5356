"""What sft-train shows a person: a progress bar over optimizer steps in a terminal, one line per logging
interval in `train.log` (and on stdout when it is not a terminal: a pipe, a file, a SLURM log), and none
of the Lightning messages that are wrong or irrelevant for this project.

Both the bar and the lines read the logged metrics only every `trainer.log_every_n_steps` optimizer steps
(and at the last), so showing progress adds no per-step host sync.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn

# Messages that sft-train makes wrong or irrelevant, each with the reason it is silenced.
SILENCED_WARNINGS = [
    # Lightning's own use of a torch API deprecated in the torch this project pins; nothing a user can change.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
]
SILENCED_ON_RESUME = [
    # SFTDataModule saves and restores the sampler's position (state_dict), so a mid-epoch resume is exact;
    # Lightning only looks for the interface on the DataLoader.
    r"You're resuming from a checkpoint that ended before the epoch ended and your dataloader is not",
    # The run's own checkpoints, which the resumed run continues.
    r"Checkpoint directory .* exists and is not empty",
]
SILENCED_INFO = [
    "💡 Tip: For seamless cloud logging",  # an advertisement for a logger this project does not use
]


class _DropMessages(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(str(record.msg).startswith(text) for text in SILENCED_INFO)


@contextmanager
def quiet_lightning(resuming: bool) -> Iterator[None]:
    """Within the block, Lightning's messages above are not shown (a log filter is installed once)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _DropMessages) for existing in logger.filters):
            logger.addFilter(_DropMessages())
    with warnings.catch_warnings():
        for message in SILENCED_WARNINGS + (SILENCED_ON_RESUME if resuming else []):
            warnings.filterwarnings("ignore", message=message)
        yield


def model_line(module: L.LightningModule) -> str:
    """One line in place of Lightning's model summary table (whose FLOPs column reads 0 here)."""
    parameters = list(module.parameters())
    total = sum(p.numel() for p in parameters)
    trainable = sum(p.numel() for p in parameters if p.requires_grad)
    model = getattr(module, "model", module)
    return f"model: {type(model).__name__}, {total:,} parameters ({trainable:,} trainable)"


class RunLog:
    """`train.log` in the run directory: appended to (a resumed run continues it), timestamped lines."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def record(self, text: str, echo: bool = True, stream: TextIO | None = None) -> None:
        """Append `text` to the log and, with `echo`, print it (to stdout, or `stream`)."""
        if echo:
            print(text, file=stream or sys.stdout, flush=True)
        stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.writelines(f"[{stamp}] {line}\n" for line in text.splitlines())


def logged(trainer: L.Trainer, key: str) -> float | None:
    value = trainer.callback_metrics.get(key)
    return None if value is None else float(value)


class Pace:
    """Elapsed time and the time left, from the steps taken since training (or this resume) started."""

    def __init__(self) -> None:
        self.started_at = time.perf_counter()
        self.first_step = 0

    def start(self, step: int) -> None:
        self.started_at, self.first_step = time.perf_counter(), step

    def elapsed(self) -> float:
        return time.perf_counter() - self.started_at

    def remaining(self, step: int, max_steps: int) -> float | None:
        done = step - self.first_step
        if done <= 0 or max_steps <= 0:
            return None
        return self.elapsed() / done * max(0, max_steps - step)


def clock(seconds: float | None) -> str:
    return "?" if seconds is None else str(timedelta(seconds=round(seconds)))


def steps_of(trainer: L.Trainer) -> str:
    total = trainer.max_steps if trainer.max_steps > 0 else "?"
    return f"step {trainer.global_step}/{total}"


def is_report_step(trainer: L.Trainer, every_n_steps: int) -> bool:
    """A logging step: every `every_n_steps` optimizer steps and the last one."""
    step = trainer.global_step
    return step > 0 and (step % max(1, every_n_steps) == 0 or step == trainer.max_steps)


class ProgressLog(L.Callback):
    """One line per logging interval and one per validation, into train.log; also on stdout when stdout is
    not a terminal (a terminal shows StepProgressBar instead). Rank 0 only."""

    def __init__(self, run_log: RunLog, every_n_steps: int):
        self.run_log = run_log
        self.every_n_steps = every_n_steps
        self.pace = Pace()
        self._last_step = -1

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.pace.start(trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step == self._last_step or not is_report_step(trainer, self.every_n_steps):
            return
        if not trainer.is_global_zero:
            return
        self._last_step = step
        parts = [steps_of(trainer)]
        for key, label, form in (("train/loss", "loss", ".4f"), ("train/lr", "lr", ".2e")):
            if (value := logged(trainer, key)) is not None:
                parts.append(f"{label} {value:{form}}")
        if (tokens_per_s := logged(trainer, "train/tokens_per_s")) is not None:
            parts.append(f"{tokens_per_s:,.0f} tokens/s")
        remaining = self.pace.remaining(step, trainer.max_steps)
        parts.append(f"elapsed {clock(self.pace.elapsed())} · eta {clock(remaining)}")
        self.run_log.record(" · ".join(parts), echo=not sys.stdout.isatty())

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        scores = [
            f"{key} {float(value):.4f}"
            for key, value in sorted(trainer.callback_metrics.items())
            if key.startswith(("val/", "eval/"))
        ]
        if scores:
            line = f"{steps_of(trainer)} · " + " · ".join(scores)
            self.run_log.record(line, echo=not sys.stdout.isatty())


class StepProgressBar(ProgressBar):
    """A terminal bar over optimizer steps: step/max_steps, loss, tokens/s and the time left, refreshed at
    each logging step. Silent when the console is not a terminal (ProgressLog writes lines there)."""

    def __init__(self, every_n_steps: int, console: Console | None = None):
        super().__init__()
        self.every_n_steps = every_n_steps
        self.console = console
        self.pace = Pace()
        self._enabled = True
        self._progress: Progress | None = None
        self._task = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def print(self, *args: Any, **kwargs: Any) -> None:
        (self._progress.console if self._progress else Console()).print(*args, **kwargs)

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        console = self.console or Console()
        self.pace.start(trainer.global_step)
        if not (self._enabled and trainer.is_global_zero and console.is_terminal):
            return
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            TextColumn("step {task.completed}/{task.total}"),
            BarColumn(),
            TextColumn("{task.fields[status]}"),
            console=console,
            refresh_per_second=2,
        )
        self._progress.start()
        total = trainer.max_steps if trainer.max_steps > 0 else None
        self._task = self._progress.add_task(
            "training", total=total, completed=trainer.global_step, status="eta ?"
        )

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        if self._progress is not None and is_report_step(trainer, self.every_n_steps):
            self.refresh(trainer)

    def refresh(self, trainer: L.Trainer) -> None:
        """Read the logged metrics (a host sync on GPU) and redraw: only at logging steps."""
        step = trainer.global_step
        status = []
        if (loss := logged(trainer, "train/loss")) is not None:
            status.append(f"loss {loss:.4f}")
        if (tokens_per_s := logged(trainer, "train/tokens_per_s")) is not None:
            status.append(f"{tokens_per_s:,.0f} tokens/s")
        if (val_loss := logged(trainer, "val/loss")) is not None:
            status.append(f"val/loss {val_loss:.4f}")
        status.append(f"eta {clock(self.pace.remaining(step, trainer.max_steps))}")
        self._progress.update(self._task, completed=step, status=" · ".join(status))

    def on_validation_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self._progress is not None and not trainer.sanity_checking:
            self._progress.update(self._task, description="validating")

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self._progress is not None and not trainer.sanity_checking:
            self._progress.update(self._task, description="training")
            self.refresh(trainer)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        self.on_train_end(trainer, module)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_progress": None, "_task": None, "console": None}  # ddp_spawn pickles it
