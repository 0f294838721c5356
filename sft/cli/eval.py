"""sft-eval: a checkpoint's val loss and perplexity on trained tokens, and the sample task's exact match.

    sft-eval ckpt=outputs/RUN/checkpoints/last.ckpt                  # the embedded sample's held-out split
    sft-eval ckpt=... data.val=[held_out.jsonl] out=report.json      # your files, through the same protocol

The loss is the training one: summed cross-entropy over the tokens training would learn (assistant turns
through their end-of-turn token) divided by their count, so it reads like `val/loss` in metrics.csv.
Examples run alone (right-padded), which gives the same per-token losses as the packed validation rows.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from sft.checkpoint import CheckpointError, load_for_inference
from sft.cli.chat import resolve_device
from sft.data.build import protocol_config
from sft.data.sample import generate_conversations
from sft.evaluate import exact_match_counts, sample_eval_items
from sft.loss import masked_token_loss_sum
from sft.protocol.labels import IGNORE_INDEX
from sft.protocol.pipeline import Accounting, ConversationEncoder, EncodedExample, read_conversations
from sft.protocol.records import record_to_conversation


def eval_conversations(data: dict[str, Any], seed: int):
    """The conversations to score: the files in `data.val`, else the embedded sample's held-out split."""
    files = data.get("val")
    if not files:
        records = generate_conversations(data["num_val"], seed, split="val")
        for line, record in enumerate(records, start=1):
            yield record_to_conversation(record, source="sample-val", line=line)
        return
    for path in [files] if isinstance(files, str) else files:
        if not Path(path).is_file():
            raise FileNotFoundError(f"data.val: no file at {path}")
        yield from read_conversations(path, data.get("format", "auto"))


@torch.inference_mode()
def trained_token_loss(
    model: torch.nn.Module, examples: list[EncodedExample], batch_size: int
) -> tuple[float, int]:
    """(summed loss, trained tokens) over the examples, in length-sorted right-padded batches."""
    device = next(model.parameters()).device
    ordered = sorted(examples, key=lambda example: len(example.input_ids))
    loss_sum, trained_tokens = 0.0, 0
    for start in range(0, len(ordered), batch_size):
        batch = ordered[start : start + batch_size]
        width = max(len(example.input_ids) for example in batch)
        input_ids = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        for row, example in enumerate(batch):
            input_ids[row, : len(example.input_ids)] = torch.from_numpy(example.input_ids)
            labels[row, : len(example.labels)] = torch.from_numpy(example.labels)
        # Causal attention: right padding is never seen by the real tokens, and its labels are ignored.
        batch_loss, batch_tokens = masked_token_loss_sum(model(input_ids.to(device)), labels.to(device))
        loss_sum += float(batch_loss)
        trained_tokens += int(batch_tokens)
    return loss_sum, trained_tokens


def evaluate_checkpoint(config: dict[str, Any]) -> dict[str, Any]:
    """The report: metrics under training's names, what was evaluated, and the accounting of every line."""
    bundle = load_for_inference(config["ckpt"], device=resolve_device(config["device"]))
    data = config["data"]
    encoder = ConversationEncoder(bundle.tokenizer, bundle.template, protocol_config(config["protocol"]))
    accounting = Accounting()
    examples = list(encoder.encode_conversations(eval_conversations(data, config["seed"]), accounting))
    if not examples:
        raise ValueError("nothing to evaluate: no example kept\n" + accounting.summary())
    loss_sum, trained_tokens = trained_token_loss(bundle.model, examples, data["batch_size"])
    val_loss = loss_sum / trained_tokens
    metrics: dict[str, float] = {
        "val/loss": val_loss,
        "val/perplexity": math.exp(val_loss),
        "val/trained_tokens": trained_tokens,
    }
    report: dict[str, Any] = {
        "ckpt": str(config["ckpt"]),
        "data": data["val"]
        or f"sample held-out split (seed {config['seed']}, {data['num_val']} conversations)",
        "examples": len(examples),
        "metrics": metrics,
        "accounting": accounting.to_dict(),
    }
    if not data["val"] and config["eval"]["exact_match"]:
        items = sample_eval_items(config["seed"], data["num_val"], config["eval"]["max_items"])
        correct, total = exact_match_counts(
            bundle.model, items, bundle.tokenizer, bundle.template, config["eval"]["max_new_tokens"]
        )
        metrics["eval/exact_match"] = correct / total
        report["exact_match_items"] = total
    return report


def print_report(report: dict[str, Any]) -> None:
    print(f"{report['ckpt']} on {report['data']}: {report['examples']} examples")
    print(Accounting.from_dict(report["accounting"]).summary())
    for key, value in report["metrics"].items():
        print(f"  {key:22s} {value:.4f}" if isinstance(value, float) else f"  {key:22s} {value}")
    if "exact_match_items" in report:
        print(f"  {'exact_match_items':22s} {report['exact_match_items']}")


@hydra.main(version_base="1.3", config_path="pkg://sft.conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    config = OmegaConf.to_container(cfg, resolve=True)
    try:
        report = evaluate_checkpoint(config)
    except CheckpointError as error:
        sys.exit(f"sft-eval: {error}")
    print_report(report)
    if config["out"]:
        Path(config["out"]).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"report: {config['out']}")


if __name__ == "__main__":
    main()
