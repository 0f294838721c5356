"""The Lightning pieces of training: atomic checkpoint files and the exact-match evaluation hook.

Kept apart from sft.checkpoint and sft.evaluate so that chat, eval and export start without Lightning.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from sft.atomic import atomic_file
from sft.checkpoint import load_checkpoint
from sft.evaluate import EvalItem, exact_match_counts
from sft.hardware import gathered_parameters


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints through sft.atomic and sft.checkpoint. Lightning's stock IO also renames a temporary into
    place, but never fsyncs (a machine crash can leave `last.ckpt` empty) and first builds the whole file in
    memory; this one streams into a synced temporary in the same directory. Loading refuses anything but
    plain tensors and containers, with one clear CheckpointError."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        with atomic_file(path, "wb") as handle:
            torch.save(checkpoint, handle)

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint(path)


class ExactMatchCallback(L.Callback):
    """Logs `eval/exact_match` after each validation; items are split across ranks and the counts summed."""

    def __init__(self, items: list[EvalItem], max_new_tokens: int, batch_size: int = 16):
        self.items = items
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        mine = self.items[trainer.global_rank :: trainer.world_size]
        with gathered_parameters(module.model):  # a sharded model: ranks generate different lengths
            correct, total = exact_match_counts(
                module.model, mine, module.tokenizer, module.template, self.max_new_tokens, self.batch_size
            )
        counts = trainer.strategy.reduce(
            torch.tensor([correct, total], dtype=torch.float64, device=module.device), reduce_op="sum"
        )
        module.log("eval/exact_match", float(counts[0] / counts[1]), rank_zero_only=True)


class ValidateAtEnd(L.Callback):
    """Validation also runs after the last optimizer step, so every run with validation data ends with a
    `val/loss` and a best checkpoint, whatever `trainer.val_check_interval` is. Lightning validates when
    `should_stop` is set at a batch's end; at `max_steps` that is where the run stops anyway."""

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True


class LastCheckpoint(ModelCheckpoint):
    """`last.ckpt` every `every_n_train_steps` optimizer steps and always at the end of training. Lightning's
    `save_last` skips the final step when the interval does not divide `max_steps`, which left `last.ckpt`
    behind the run's final weights and its final `val/loss`."""

    def __init__(self, dirpath: Path, every_n_train_steps: int | None):
        super().__init__(dirpath, save_top_k=0, save_last=True, every_n_train_steps=every_n_train_steps)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class TrainingInterrupted(Exception):
    """Ctrl-C (SIGINT) or SIGTERM stopped training after `path` saved the last completed optimizer step."""

    def __init__(self, signal_name: str, step: int, path: Path):
        super().__init__(f"{signal_name} at step {step}: saved {path}")
        self.signal_name, self.step, self.path = signal_name, step, path

    @property
    def exit_code(self) -> int:
        return 128 + signal.Signals[self.signal_name].value  # what the shell reports for that signal


class CheckpointOnInterrupt(L.Callback):
    """On SIGINT or SIGTERM: finish the optimizer step in flight, save `path` (the run's last.ckpt) where
    Lightning saves its step checkpoints, and stop with TrainingInterrupted before the next batch. A second
    Ctrl-C stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, path: Path):
        self.path = path
        self._received: str | None = None
        self._stop: TrainingInterrupted | None = None
        self._step = 0
        self._previous: dict[int, Any] = {}

    def _note(self, signum: int, frame: Any) -> None:
        if self._received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._received = signal.Signals(signum).name

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._step = trainer.global_step
        self._previous = {signum: signal.signal(signum, self._note) for signum in self.SIGNALS}

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        stepped, self._step = trainer.global_step != self._step, trainer.global_step
        if not stepped:
            return  # inside an accumulation window: the step is not finished
        received = self._received is not None
        if trainer.world_size > 1:  # a signal may reach one rank only; every rank must stop at this step
            received = trainer.strategy.reduce_boolean_decision(received, all=False)
        if received:
            trainer.save_checkpoint(self.path, weights_only=False)  # the full state: optimizer too
            self._stop = TrainingInterrupted(self._received or "SIGTERM", trainer.global_step, self.path)

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        if self._stop is not None:  # raised here, once the saved step's metrics are logged
            raise self._stop

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        self._restore()
