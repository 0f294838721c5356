"""`eval.generate_every_n_steps`: during training, generate data.val's trained assistant turns and log the
scores (`gen/exact_match`, `gen/token_f1`, ...; with logger=wandb a `wandb.Table` of the items, their
texts and every score).

Generation runs on one process whatever the strategy: a sharded (FSDP2) model is gathered into a full copy
on rank 0 (every rank takes part in the gather), DDP's rank 0 uses its own replica; the other ranks wait.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import lightning as L
import torch

from sft.data.validation import validation_source
from sft.generation_eval import (
    Generation,
    GenerationItem,
    GenerationSettings,
    evaluate_generations,
    generation_items,
)
from sft.protocol.pipeline import ConversationEncoder
from sft.scoring import SCORE_NAMES

if TYPE_CHECKING:
    from sft.config import TrainConfig


def generations_table(
    step: int, items: list[GenerationItem], generations: list[Generation]
) -> tuple[list[str], list[list[Any]]]:
    """(columns, rows) of the items' table: each item's text and every score (None where an item has no
    such score: the tool-call scores of a turn that calls no tool)."""
    columns = ["step", "where", "prompt", "reference", "generation", "stopped", *SCORE_NAMES]
    rows = [
        [step, item.where, item.prompt, item.reference, generation.text, generation.stopped]
        + [generation.scores.get(name) for name in SCORE_NAMES]
        for item, generation in zip(items, generations, strict=True)
    ]
    return columns, rows


class GenerationEvalCallback(L.Callback):
    def __init__(self, config: TrainConfig):
        self.config = config
        self.every_n_steps = config.eval.generate_every_n_steps
        self.settings = GenerationSettings.from_section(config.eval)
        self._items: list[GenerationItem] | None = None
        self._last_step = -1
        self._single_process_model = SingleProcessModel()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps or step == self._last_step:
            return  # after accumulation, several micro-batches end on the same optimizer step
        self._last_step = step
        with self._single_process_model(module) as model:
            if trainer.is_global_zero:
                self._generate(trainer, module, model, step)
        trainer.strategy.barrier("generation_eval")

    def _generate(self, trainer: L.Trainer, module: L.LightningModule, model: torch.nn.Module, step: int):
        items = self._load_items(trainer, module)
        if not items:
            return
        generator = torch.Generator().manual_seed(self.config.seed)
        generations, metrics = evaluate_generations(
            model,
            module.tokenizer,
            module.template.stop_tokens,
            items,
            self.settings,
            generator,
            module.template,
        )
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            if hasattr(logger, "log_table"):  # W&B
                columns, rows = generations_table(step, items, generations)
                logger.log_table("gen/items", columns=columns, data=rows, step=step)

    def _load_items(self, trainer: L.Trainer, module: L.LightningModule) -> list[GenerationItem]:
        """The run's validation conversations' items, read once, chosen as sft-eval chooses them
        (sft.data.validation): data.val, the sample's held-out split, or the whole conversations that
        data.val_fraction holds out, which the run's SFTDataModule names (so rank 0 encodes no training
        data again while the other ranks wait)."""
        if self._items is None:
            section, seed = dataclasses.asdict(self.config.data), self.config.seed
            encoder = ConversationEncoder(module.tokenizer, module.template, self.config.protocol)
            try:
                streams, _, fraction = validation_source(section, seed)
            except ValueError:
                warnings.warn(
                    "eval.generate_every_n_steps needs validation data (data.val or data.val_fraction): "
                    "nothing to generate",
                    stacklevel=2,
                )
                self._items = []
                return self._items
            only = trainer.datamodule.held_out_records() if fraction > 0 else None
            self._items = generation_items(streams, encoder, self.config.eval.max_items, only)
        return self._items


class SingleProcessModel:
    """A model that one process can run alone, on the module's device: the module's own, or, when its
    parameters are sharded (DTensor), a full copy gathered to rank 0 (a collective: enter it on every rank).

    The copy is built once (model=hf: one from_pretrained) and kept on the CPU between evaluations; each
    use loads the gathered weights into it, moves it to the module's device (a GPU) for generation and
    back afterwards, so the device holds the second model only while it generates."""

    def __init__(self) -> None:
        self._copy: torch.nn.Module | None = None

    @contextmanager
    def __call__(self, module: L.LightningModule) -> Iterator[torch.nn.Module]:
        from torch.distributed.tensor import DTensor

        model = module.model
        if not any(isinstance(parameter, DTensor) for parameter in model.parameters()):
            yield model
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # one full copy, rank 0's
        state = get_model_state_dict(model, options=options)
        if not state:  # only rank 0 receives the gathered weights, and only rank 0 generates
            yield model
            return
        if self._copy is None:
            from sft.model import build_model

            self._copy = build_model(dict(module.hparams["model_config"])).eval()
        self._copy.load_state_dict(state)
        del state
        try:
            yield self._copy.to(module.device)
        finally:
            self._copy.to("cpu")  # moves keep tied weights tied and buffers (HF's rotary) as they are
