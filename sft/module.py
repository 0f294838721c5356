"""SFTModule: the assistant-only loss, normalised over the trained tokens of the whole global batch.

The normalisation is the point of this file. One optimizer step's gradient must equal the gradient of

    sum(token losses over every micro-batch and rank) / (trained tokens over every micro-batch and rank)

whatever the accumulation or world size. Lightning's automatic optimisation divides the returned loss by
`accumulate_grad_batches` and DDP averages gradients over ranks, so `training_step` returns the *sum* of
token losses scaled back up by both factors; `on_before_optimizer_step` (after AMP unscaling, before
clipping) all-reduces the window's trained-token count and divides every gradient by it. The trained-token
count lives in a plain attribute, not a buffer, because DDP would broadcast a buffer from rank 0.

Host syncs (a stall on a GPU): counts and sums stay on the device. Each optimizer step reads the host
twice — the all-reduced (loss sum, trained tokens) for the zero-token skip and the divisor, and the
grad norm's finiteness for the non-finite stop — and once more per logging interval
(`trainer.log_every_n_steps`) for the interval's token count and the grad norm. tests/test_module.py
pins the count.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch
from torch.distributed.tensor import DTensor

from sft.hardware import fully_shard_model, is_sharded
from sft.loss import batch_loss_sum
from sft.model import build_model, model_config_from_dict
from sft.optim import OptimConfig, lr_at_step
from sft.protocol.templates import load_template, standalone_config

if TYPE_CHECKING:
    from sft.model.hf import HFModelConfig
    from sft.model.llama import LlamaConfig


class NonFiniteLossError(RuntimeError):
    """Raised instead of taking an optimizer step on a NaN/inf loss or gradient."""


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch generator states as tensors, lists and ints (loadable with weights_only)."""
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), position, has_gauss, cached_gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Resume continues the random streams (sampling, dropout) where the checkpoint left them."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached_gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class SFTModule(L.LightningModule):
    """Wraps a causal LM with the assistant-only loss, AdamW + warmup/cosine, and honest throughput metrics.

    The configs are saved as plain dicts (`hyper_parameters`), so checkpoints load with `weights_only=True`;
    plain dicts are also accepted (a checkpoint's, Lightning's `load_from_checkpoint`).
    """

    def __init__(
        self,
        model_config: LlamaConfig | HFModelConfig | dict[str, Any],
        optim_config: OptimConfig | dict[str, Any],
        peak_flops: float = 0.0,
    ):
        super().__init__()
        model_config = (
            model_config_from_dict(model_config) if isinstance(model_config, dict) else model_config
        )
        optim_config = optim_config if isinstance(optim_config, OptimConfig) else OptimConfig(**optim_config)
        self.save_hyperparameters(
            {
                "model_config": dataclasses.asdict(model_config),
                "optim_config": dataclasses.asdict(optim_config),
                "peak_flops": peak_flops,
            }
        )
        self.model = build_model(model_config)
        self.optim_config = optim_config
        self.peak_flops = peak_flops
        self.skipped_steps = 0  # optimizer steps with no trained token in the whole global batch
        self._reset_window()
        self._interval_tokens: torch.Tensor | float = 0.0  # tokens since the last log (on the device)
        self._interval_trained_tokens = 0.0
        self._logged_at: float | None = None
        self._row_length = 0  # tokens per row of the last micro-batch: the attention term of the FLOPs
        self.tokenizer = None  # set by attach(): saved into every checkpoint so it is usable on its own
        self.template_config: dict[str, Any] | None = None
        self.run_section: dict[str, Any] = {}  # sft.checkpoint.run_section: protocol, data, config, versions
        self.trained_tokens_seen = 0.0

    def attach(
        self, tokenizer, template_config: dict[str, Any], run_section: dict[str, Any] | None = None
    ) -> None:
        """Give the module what chat, evaluation and resume need: the tokenizer and template it was trained
        with, and the run's section of every checkpoint (sft.checkpoint)."""
        self.tokenizer = tokenizer
        self.template_config = standalone_config(load_template(template_config))
        self.run_section = run_section or {}

    @property
    def template(self):
        return load_template(self.template_config)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["sft"] = {
            **self.run_section,
            "tokenizer": self.tokenizer.to_str() if self.tokenizer is not None else None,
            "template": self.template_config,
            "trained_tokens_seen": self.trained_tokens_seen,
            "skipped_steps": self.skipped_steps,
            "rng": rng_state(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("sft", {})
        self.trained_tokens_seen = saved.get("trained_tokens_seen", 0.0)
        self.skipped_steps = saved.get("skipped_steps", 0)
        if "rng" in saved:
            set_rng_state(saved["rng"])

    def configure_model(self) -> None:
        """Under `strategy: fsdp` (ModelParallelStrategy gives the module a device mesh): shard each decoder
        layer, then the root. Lightning may call this again (e.g. validate after fit): shard once."""
        if self.device_mesh is not None and not is_sharded(self.model):
            fully_shard_model(self.model, self.device_mesh["data_parallel"], str(self.trainer.precision))

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss over the batch's trained tokens, their count): logits at trained positions only.
        The model's forward runs (FSDP's hooks with it); its root stays unsharded until the backward, so the
        loss can apply the output head afterwards. A batch of prefix trees (data.prefix_sharing) brings its
        explicit loss pairs; their number is its trained-token count, so normalisation and the zero-token
        skip need nothing else."""
        return batch_loss_sum(self.model, batch, self.optim_config.loss_chunk_tokens)

    # ---- training -------------------------------------------------------------------------------------
    def _reset_window(self) -> None:
        """Per-optimizer-step sums over this rank's micro-batches (detached tensors on the device)."""
        self._window_loss_sum: torch.Tensor | float = 0.0
        self._window_trained_tokens: torch.Tensor | float = 0.0
        self._window_tokens: torch.Tensor | float = 0.0

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self._logged_at is None:
            self._logged_at = time.perf_counter()
        loss_sum, trained_tokens = self.loss_sum(batch)
        self._window_loss_sum = self._window_loss_sum + loss_sum.detach().double()
        self._window_trained_tokens = self._window_trained_tokens + trained_tokens
        self._window_tokens = self._window_tokens + batch["real_tokens"].to(loss_sum.device)
        self._row_length = batch["input_ids"].shape[1]
        # Undo Lightning's 1/accumulate and DDP's 1/world_size: gradients arrive as plain sums.
        return loss_sum * (self.trainer.world_size * self.trainer.accumulate_grad_batches)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        totals = torch.stack(
            [
                torch.as_tensor(value, dtype=torch.float64, device=self.device)
                for value in (self._window_loss_sum, self._window_trained_tokens, self._window_tokens)
            ]
        )
        totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        self._reset_window()
        self._interval_tokens = self._interval_tokens + totals[2]
        loss_sum, trained_tokens = totals[:2].tolist()  # host sync 1: the skip decision and the divisor
        parameters = [p for p in self.parameters() if p.grad is not None]
        if trained_tokens == 0:
            # No trained token anywhere: drop the gradients so AdamW skips every parameter (no momentum or
            # weight-decay drift), and count it.
            for p in parameters:
                p.grad = None
            self.skipped_steps += 1
            self.log("train/skipped_steps", float(self.skipped_steps))
            return
        for p in parameters:
            p.grad.div_(trained_tokens)
        grad_norm = self._clip_gradients(parameters)
        loss = loss_sum / trained_tokens
        self.trained_tokens_seen += trained_tokens
        self._interval_trained_tokens += trained_tokens
        if not (math.isfinite(loss) and bool(torch.isfinite(grad_norm))):  # host sync 2
            if getattr(self.trainer.precision_plugin, "scaler", None):
                # fp16: GradScaler skips this step and lowers its scale; that is not a diverged run
                self.log("train/fp16_overflow", 1.0)
            else:
                self._stop_on_non_finite(loss, float(grad_norm))
        step = self.global_step + 1
        if step % self.trainer.log_every_n_steps == 0 or step == self.trainer.max_steps:
            self._log_interval(loss, grad_norm, optimizer)

    def _clip_gradients(self, parameters: list[torch.nn.Parameter]) -> torch.Tensor:
        """Clip to `optim.grad_clip` by the global norm. Under FSDP each gradient is a DTensor shard: the
        norm over the shards is partial, and `full_tensor()` sums it over the ranks, so every rank clips by
        the same factor as one process would."""
        max_norm = self.optim_config.grad_clip or float("inf")
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, grad_norm)
        return grad_norm

    def _stop_on_non_finite(self, loss: float, grad_norm: float) -> None:
        """Keep the last good weights (no update is applied) in a checkpoint, then stop with a clear error."""
        for p in self.parameters():
            p.grad = None
        path = Path(self.trainer.default_root_dir) / "checkpoints" / "last-finite.ckpt"
        self.trainer.save_checkpoint(path)
        raise NonFiniteLossError(
            f"non-finite training loss {loss} (grad norm {grad_norm}) at step {self.global_step}; no update "
            f"was applied. The last good state is in {path}. Lower optim.lr, check the data, or use bf16."
        )

    def _log_interval(self, loss: float, grad_norm: torch.Tensor, optimizer) -> None:
        """This step's loss and grad norm, and the throughput since the last log (one host sync)."""
        tokens, grad_norm_value = torch.stack(
            [torch.as_tensor(self._interval_tokens), grad_norm.double()]
        ).tolist()
        now = time.perf_counter()
        elapsed = max(now - (self._logged_at or now), 1e-9)
        trained_tokens = self._interval_trained_tokens
        self._logged_at, self._interval_tokens, self._interval_trained_tokens = now, 0.0, 0.0
        tokens_per_s = tokens / elapsed
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", optimizer.param_groups[0]["lr"])
        self.log("train/grad_norm", grad_norm_value)
        self.log("train/trained_tokens", self.trained_tokens_seen)
        self.log("train/tokens_per_s", tokens_per_s)
        self.log("train/trained_tokens_per_s", trained_tokens / elapsed)
        if self.peak_flops > 0:
            flops_per_token = self.model.flops_per_token(self._row_length)
            # tokens are summed over ranks, the peak is one device's
            self.log("train/mfu", flops_per_token * tokens_per_s / self.trainer.world_size / self.peak_flops)

    def on_train_epoch_start(self) -> None:
        efficiency = getattr(self.trainer.datamodule, "packing_efficiency", None)
        if efficiency is not None:
            self.log("data/packing_efficiency", efficiency)

    # ---- validation -----------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._val_tokens = torch.zeros((), dtype=torch.float64, device=self.device)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss_sum, trained_tokens = self.loss_sum(batch)
        self._val_loss_sum += loss_sum.double()
        self._val_tokens += trained_tokens

    def on_validation_epoch_end(self) -> None:
        totals = self.trainer.strategy.reduce(
            torch.stack([self._val_loss_sum, self._val_tokens]), reduce_op="sum"
        )
        loss_sum, trained_tokens = totals.tolist()
        if trained_tokens > 0:
            self.log("val/loss", loss_sum / trained_tokens, prog_bar=True)

    # ---- optimizer ------------------------------------------------------------------------------------
    def configure_optimizers(self):
        config = self.optim_config
        decay = [p for p in self.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.ndim < 2]  # norms: never decayed
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": config.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=config.lr,
            betas=tuple(config.betas),
            eps=config.eps,
        )
        total_steps = (
            self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: lr_at_step(
                step,
                1.0,
                config.warmup_steps or 1,
                int(total_steps),
                config.min_lr_ratio,
            ),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
