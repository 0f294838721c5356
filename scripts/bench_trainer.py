"""Lightning's overhead: SFTModule under `lightning.Trainer` vs a plain PyTorch loop on the same batches.

    python scripts/bench_trainer.py [--steps 40] [--rounds 4] [overrides for conf/train.yaml ...]

Both sides run the identical work per step (forward, assistant-only token-mean loss, backward, clipping,
AdamW); the batches are materialised once from the embedded default's data module, so data loading is not
part of either figure. Rounds alternate the two so machine noise hits both. Prints steps/s, tokens/s, MFU.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import lightning as L
import torch
from hydra import compose, initialize_config_module

from sft.cli.schemas import TrainConfig
from sft.config import load_config
from sft.data.build import prepare
from sft.data.datamodule import SFTDataModule
from sft.loss import masked_token_loss_sum
from sft.module import SFTModule


def materialise_batches(datamodule: SFTDataModule, steps: int) -> list[dict[str, torch.Tensor]]:
    batches = []
    while len(batches) < steps:
        batches.extend(datamodule.train_dataloader())
    return batches[:steps]


def new_module(config: TrainConfig, vocab_size: int) -> SFTModule:
    torch.manual_seed(0)
    return SFTModule(dataclasses.replace(config.model, vocab_size=vocab_size), config.optim)


def plain_loop(config: TrainConfig, vocab_size: int, batches: list) -> float:
    """Seconds for the steps after the first (the same warm-up is excluded on both sides)."""
    module = new_module(config, vocab_size)
    optim = config.optim
    decay = [p for p in module.parameters() if p.ndim >= 2]
    no_decay = [p for p in module.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=optim.lr,
        betas=tuple(optim.betas),
    )
    started = None
    for step, batch in enumerate(batches):
        if step == 1:
            started = time.perf_counter()
        loss_sum, trained = masked_token_loss_sum(module(batch), batch["labels"])
        (loss_sum / trained.clamp_min(1)).backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


class StepTimer(L.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == 1:
            self.started = time.perf_counter()

    def on_train_end(self, trainer, module):
        self.seconds = time.perf_counter() - self.started


def lightning_loop(config: TrainConfig, vocab_size: int, batches: list) -> float:
    module = new_module(config, vocab_size)
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=len(batches),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    trainer.fit(module, train_dataloaders=loader)
    return timer.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=4)
    args, overrides = parser.parse_known_args()
    with initialize_config_module("sft.conf", version_base="1.3"):
        config = load_config(compose("train", overrides=overrides), TrainConfig)
    prepared = prepare(config)
    vocab_size = prepared.tokenizer.get_vocab_size()
    batches = materialise_batches(SFTDataModule(config, prepared), args.steps)
    tokens = sum(int(batch["real_tokens"]) for batch in batches[1:])
    model = new_module(config, vocab_size).model
    flops_per_token = model.flops_per_token(config.protocol.max_seq_len)
    peak = config.hardware.peak_flops["fp32"]  # both loops run in fp32
    print(
        f"model {type(config.model).__name__}: {model.num_parameters():,} parameters; {args.steps} steps of "
        f"{config.data.batch_size} rows x {config.protocol.max_seq_len} tokens; torch threads "
        f"{torch.get_num_threads()}"
    )
    print(f"{'round':>5} {'loop':>10} {'steps/s':>8} {'tokens/s':>9} {'MFU':>6}")
    totals = {"plain": 0.0, "lightning": 0.0}
    for round_index in range(args.rounds):
        for name, loop in (("plain", plain_loop), ("lightning", lightning_loop)):
            seconds = loop(config, vocab_size, batches)
            totals[name] += seconds
            rate = tokens / seconds
            print(
                f"{round_index:>5} {name:>10} {(args.steps - 1) / seconds:8.2f} {rate:9.0f} "
                f"{flops_per_token * rate / peak:6.1%}"
            )
    overhead = totals["lightning"] / totals["plain"] - 1
    print(
        f"Lightning overhead over the plain loop: {overhead:+.1%} (total {totals['lightning']:.1f}s vs "
        f"{totals['plain']:.1f}s)"
    )


if __name__ == "__main__":
    main()
