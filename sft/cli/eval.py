"""sft-eval: a checkpoint's val loss and perplexity on trained tokens, generation scores on each trained
assistant turn (sft.generation_eval), and the sample task's exact match.

    sft-eval ckpt=outputs/RUN/checkpoints/last.ckpt                  # the embedded sample's held-out split
    sft-eval ckpt=... data.val=[held_out.jsonl] out=report.json      # your data; report.html beside it
    sft-eval 'ckpt=[a.ckpt,b.ckpt]' data.val=[held_out.jsonl]        # two checkpoints side by side

The loss is the training one: summed cross-entropy over the tokens training would learn (assistant turns
through their end-of-turn token) divided by their count, so it reads like `val/loss` in metrics.csv.
Examples run alone (right-padded), which gives the same per-token losses as the packed validation rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from sft.checkpoint import CheckpointError, follow_checkpoint, load_for_inference
from sft.cli.chat import resolve_device
from sft.cli.entry import run_cli
from sft.cli.schemas import SampleEvalConfig
from sft.config import register_defaults
from sft.data.collate import collate_rows, example_row
from sft.data.config import DataConfig, as_list
from sft.data.sample import generate_conversations
from sft.data.validation import validation_examples
from sft.eval_report import report_items, write_html, write_json
from sft.evaluate import exact_match_counts, sample_eval_items
from sft.generation_eval import GenerationSettings, evaluate_generations, generation_items
from sft.loss import batch_loss_sum
from sft.protocol.pipeline import Accounting, ConversationEncoder, EncodedExample, read_conversations
from sft.protocol.records import record_to_conversation
from sft.protocol.sources import resolve_source
from sft.protocol.types import ProtocolConfig
from sft.schedule import command_line_keys


@dataclass
class EvalDataConfig:
    """What to score: `val` files, else the embedded sample's held-out split (DataConfig's meaning)."""

    val: list[str] | str | None = None  # entries: files, Parquet, save_to_disk folders, hf:// (sources.py)
    columns: dict[str, str] | None = None  # field <- column renames, e.g. {messages: conversation}
    format: str = "auto"  # auto | messages | sharegpt | alpaca | prompt_completion
    num_val: int = 200
    batch_size: int = 8

    def __post_init__(self) -> None:
        DataConfig(val=self.val, format=self.format, num_val=self.num_val, batch_size=self.batch_size)


@dataclass
class EvalRunConfig:
    """conf/eval.yaml."""

    ckpt: str | list[str]  # an sft-train checkpoint (.ckpt), or two to compare side by side
    out: str | None = None  # a path: also write the report as JSON
    html: str | None = None  # a path for the HTML page; None: beside `out`, as .html
    seed: int = 1234  # train's default: the sample's held-out split and protocol.seed
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    eval: SampleEvalConfig = field(default_factory=SampleEvalConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)


register_defaults("sft_eval_defaults", EvalRunConfig)


def eval_conversations(data: EvalDataConfig, seed: int):
    """The conversations to score: the files in `data.val`, else the embedded sample's held-out split."""
    files = as_list(data.val)
    if not files:
        records = generate_conversations(data.num_val, seed, split="val")
        for line, record in enumerate(records, start=1):
            yield record_to_conversation(record, source="sample-val", line=line)
        return
    for path in files:
        yield from read_conversations(resolve_source(path), data.format, data.columns)


def validation_autocast(precision: str | None, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast Lightning's validation ran under for this precision flag (`16-mixed` is bf16 on a CPU),
    so the val/loss sft-eval reports is the one training logged; none for full-precision runs."""
    if precision == "bf16-mixed" or (precision == "16-mixed" and device.type == "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "16-mixed":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


@torch.inference_mode()
def trained_token_loss(
    model: torch.nn.Module, examples: list[EncodedExample], batch_size: int, precision: str | None = None
) -> tuple[float, int]:
    """(summed loss, trained tokens) over the examples, in length-sorted right-padded batches, under the
    autocast of the run's `precision`."""
    device = next(model.parameters()).device
    ordered = sorted(examples, key=lambda example: len(example.input_ids))
    loss_sum, trained_tokens = 0.0, 0
    for start in range(0, len(ordered), batch_size):
        batch = collate_rows(
            [example_row(e.input_ids, e.labels) for e in ordered[start : start + batch_size]]
        )
        # Causal attention: right padding is never seen by the real tokens, and its labels are ignored.
        with validation_autocast(precision, device):
            batch_loss, batch_tokens = batch_loss_sum(
                model, {"input_ids": batch["input_ids"].to(device), "labels": batch["labels"].to(device)}
            )
        loss_sum += float(batch_loss)
        trained_tokens += int(batch_tokens)
    return loss_sum, trained_tokens


def evaluate_checkpoint(config: EvalRunConfig, explicit: set[str] | None = None) -> dict[str, Any]:
    """The report: metrics under training's names, what was evaluated, and the accounting of every line.

    `explicit`: the keys the command line set; the rest of `data`, `protocol` and `seed` follow the run
    (its checkpoint's section: its own validation data, max_seq_len, system prompt). None: `config` as is."""
    bundle = load_for_inference(config.ckpt, device=resolve_device(config.device))
    given = {"seed": config.seed, "data": asdict(config.data), "protocol": asdict(config.protocol)}
    followed = given if explicit is None else follow_checkpoint(bundle.section, given, explicit)
    data, seed = followed["data"], followed["seed"]
    encoder = ConversationEncoder(bundle.tokenizer, bundle.template, ProtocolConfig(**followed["protocol"]))
    accounting = Accounting()
    examples, description = validation_examples(data, seed, encoder, accounting)
    if not examples:
        raise ValueError("nothing to evaluate: no example kept\n" + accounting.summary())
    precision = bundle.section.get("precision")  # older checkpoints: fp32
    loss_sum, trained_tokens = trained_token_loss(bundle.model, examples, config.data.batch_size, precision)
    val_loss = loss_sum / trained_tokens
    metrics: dict[str, float] = {
        "val/loss": val_loss,
        "val/perplexity": math.exp(val_loss),
        "val/trained_tokens": trained_tokens,
    }
    report: dict[str, Any] = {
        "ckpt": config.ckpt,
        "data": description,
        "examples": len(examples),
        "metrics": metrics,
        "accounting": accounting.to_dict(),
    }
    if config.eval.generate:
        report["items"] = generation_report(bundle, encoder, config, metrics)
    if data.get("name", "sample") == "sample" and not data.get("val") and config.eval.exact_match:
        items = sample_eval_items(seed, data["num_val"], config.eval.max_items)
        correct, total = exact_match_counts(
            bundle.model,
            items,
            bundle.tokenizer,
            bundle.template,
            config.eval.max_new_tokens,
            config.eval.batch_size,
        )
        metrics["eval/exact_match"] = correct / total
        report["exact_match_items"] = total
    return report


def generation_report(bundle, encoder: ConversationEncoder, config: EvalRunConfig, metrics: dict) -> list:
    """Generate each trained assistant turn (up to eval.max_items), add the mean scores to `metrics`;
    returns the report's items."""
    conversations = eval_conversations(config.data, config.seed)
    items = generation_items(conversations, encoder, config.eval.max_items)
    generator = torch.Generator().manual_seed(config.seed)
    generations, scores = evaluate_generations(
        bundle.model,
        bundle.tokenizer,
        bundle.template.stop_tokens,
        items,
        GenerationSettings.from_section(config.eval),
        generator,
        bundle.template,
    )
    metrics.update(scores)
    return report_items(items, [generations])


def compare_checkpoints(config: EvalRunConfig) -> dict[str, Any]:
    """Each checkpoint of `ckpt=[a.ckpt,b.ckpt]` on the same items; their generations side by side."""
    return side_by_side([evaluate_checkpoint(dataclasses.replace(config, ckpt=ckpt)) for ckpt in config.ckpt])


def side_by_side(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report per checkpoint → {"checkpoints": summaries, "items": each with every generation}."""
    item_lists = [report.pop("items", []) for report in reports]
    keys = [[(item["where"], item["turn"]) for item in items] for items in item_lists]
    if any(other != keys[0] for other in keys[1:]):
        raise ValueError("the checkpoints' protocols give different items: compare checkpoints of one setup")
    items = [
        {**first, "generations": [items[index]["generations"][0] for items in item_lists]}
        for index, first in enumerate(item_lists[0])
    ]
    return {"checkpoints": reports, "items": items}


def print_comparison(comparison: dict[str, Any]) -> None:
    summaries = comparison["checkpoints"]
    names = [str(summary["ckpt"]) for summary in summaries]
    print(f"{len(comparison['items'])} items, {len(names)} checkpoints on {summaries[0]['data']}")
    print(f"  {'metric':28s} " + " ".join(f"{chr(ord('A') + i):>10s}" for i in range(len(names))))
    for metric in sorted({name for summary in summaries for name in summary["metrics"]}):
        values = [summary["metrics"].get(metric) for summary in summaries]
        print(f"  {metric:28s} " + " ".join(f"{v:10.4f}" if v is not None else " " * 10 for v in values))
    for index, name in enumerate(names):
        print(f"  {chr(ord('A') + index)}: {name}")


def print_report(report: dict[str, Any]) -> None:
    print(f"{report['ckpt']} on {report['data']}: {report['examples']} examples")
    print(Accounting.from_dict(report["accounting"]).summary())
    for key, value in report["metrics"].items():
        print(f"  {key:22s} {value:.4f}" if isinstance(value, float) else f"  {key:22s} {value}")
    if "exact_match_items" in report:
        print(f"  {'exact_match_items':22s} {report['exact_match_items']}")


def run(config: EvalRunConfig, cfg: DictConfig) -> None:
    try:
        if isinstance(config.ckpt, list):
            report = compare_checkpoints(config)
            page = report
            print_comparison(report)
        else:
            report = evaluate_checkpoint(config, command_line_keys(list(HydraConfig.get().overrides.task)))
            page = side_by_side([dict(report)])
            print_report(report)
    except CheckpointError as error:
        sys.exit(f"sft-eval: {error}")
    if config.out:
        write_json(report, config.out)
        print(f"report: {config.out}")
    html = config.html or (config.out and str(Path(config.out).with_suffix(".html")))
    if html and config.eval.generate:
        write_html(page, html)
        print(f"page:   {html}")


def main() -> None:
    run_cli("sft-eval", "eval", EvalRunConfig, run)


if __name__ == "__main__":
    main()
