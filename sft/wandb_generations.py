"""What W&B shows beyond the metrics: the model's parameter count, and after each validation a table of
greedy generations on held-out examples next to the answers they were trained towards."""

from __future__ import annotations

import lightning as L
import numpy as np

from sft.model.generate import generate_batch
from sft.protocol.labels import IGNORE_INDEX


def held_out_items(dataset, count: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reference ids) for the last trained span of the first `count` held-out examples: the
    prompt is everything the model saw before its last answer, rendered exactly as in training."""
    items = []
    for example_id in dataset.example_ids[:count]:
        ids, labels = dataset.index[int(example_id)]
        trained = np.flatnonzero(labels != IGNORE_INDEX)
        if len(trained) == 0 or trained[0] == 0:
            continue
        breaks = np.flatnonzero(np.diff(trained) > 1)
        start = int(trained[breaks[-1] + 1] if len(breaks) else trained[0])
        items.append((ids[:start].tolist(), ids[start : int(trained[-1]) + 1].tolist()))
    return items


class WandbExtras(L.Callback):
    """The model's parameter count at the start of fit, and after each validation a `wandb.Table` of
    (step, prompt, expected, generated) on up to `count` held-out examples, greedy, `batch_size` prompts
    decoded together, on rank 0."""

    def __init__(self, count: int, max_new_tokens: int, batch_size: int = 16):
        self.count = count
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self._items: list[tuple[list[int], list[int]]] | None = None

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        parameters = sum(p.numel() for p in module.model.parameters())
        trainer.logger.log_hyperparams({"model/parameters": parameters})
        if trainer.is_global_zero:
            trainer.logger.experiment.summary["model/parameters"] = parameters

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        if trainer.sanity_checking or not trainer.is_global_zero or self.count <= 0:
            return
        if isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy)):
            return  # a sharded model generates only with every rank taking part
        dataset = getattr(trainer.datamodule, "val_dataset", None)
        if dataset is None:
            return
        if self._items is None:
            self._items = held_out_items(dataset, self.count)
        tokenizer = module.tokenizer
        stop_ids = {tokenizer.token_to_id(token) for token in module.template.stop_tokens}
        was_training = module.model.training
        module.model.eval()
        prompts = [prompt for prompt, _ in self._items]
        generated = generate_batch(module.model, prompts, self.max_new_tokens, stop_ids, self.batch_size)
        module.model.train(was_training)
        rows = [
            [
                trainer.global_step,
                tokenizer.decode(prompt, skip_special_tokens=False),
                tokenizer.decode([i for i in reference if i not in stop_ids], skip_special_tokens=False),
                tokenizer.decode([i for i in new_ids if i not in stop_ids], skip_special_tokens=False),
            ]
            for (prompt, reference), new_ids in zip(self._items, generated, strict=True)
        ]
        columns = ["step", "prompt", "expected", "generated"]
        trainer.logger.log_table("eval/generations", columns=columns, data=rows, step=trainer.global_step)
