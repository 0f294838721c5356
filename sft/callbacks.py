"""The Lightning pieces of training: atomic checkpoint files and the exact-match evaluation hook.

Kept apart from sft.checkpoint and sft.evaluate so that chat, eval and export start without Lightning.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
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

    def __init__(self, items: list[EvalItem], max_new_tokens: int):
        self.items = items
        self.max_new_tokens = max_new_tokens

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        mine = self.items[trainer.global_rank :: trainer.world_size]
        with gathered_parameters(module.model):  # a sharded model: ranks generate different lengths
            correct, total = exact_match_counts(
                module.model, mine, module.tokenizer, module.template, self.max_new_tokens
            )
        counts = trainer.strategy.reduce(
            torch.tensor([correct, total], dtype=torch.float64, device=module.device), reduce_op="sum"
        )
        module.log("eval/exact_match", float(counts[0] / counts[1]), rank_zero_only=True)
