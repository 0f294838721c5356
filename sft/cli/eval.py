"""sft-eval: a checkpoint's val loss and perplexity on trained tokens, generation scores on each trained
assistant turn (sft.generation_eval), and the sample task's exact match.

    sft-eval ckpt=outputs/RUN/checkpoints/last.ckpt              # the run's own validation data and protocol
    sft-eval ckpt=... data.val=[held_out.jsonl] out=report.json  # your data; report.html beside it
    sft-eval 'ckpt=[a.ckpt,b.ckpt]'                              # side by side, on a.ckpt's validation data

Without out=, the report and its page go beside the (first) checkpoint: last.eval.json, last.eval.html.

The loss is the training one: summed cross-entropy over the tokens training would learn (assistant turns
through their end-of-turn token) divided by their count, so it reads like `val/loss` in metrics.csv.
Examples run alone (right-padded), which gives the same per-token losses as the packed validation rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
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
from sft.data.validation import validation_examples, validation_source
from sft.eval_report import report_items, write_html, write_json
from sft.evaluate import exact_match_counts, sample_eval_items
from sft.generation_eval import GenerationItem, GenerationSettings, evaluate_generations, generation_items
from sft.loss import batch_loss_sum
from sft.protocol.pipeline import Accounting, ConversationEncoder, EncodedExample
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
    out: str | None = None  # the JSON report; None: beside the checkpoint, <stem>.eval.json (report_paths)
    html: str | None = None  # the HTML page; None: beside the report, as .html
    seed: int = 1234  # train's default: the sample's held-out split and protocol.seed
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    eval: SampleEvalConfig = field(default_factory=SampleEvalConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)


register_defaults("sft_eval_defaults", EvalRunConfig)


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


def run_settings(config: EvalRunConfig, section: dict[str, Any], explicit: set[str] | None) -> dict[str, Any]:
    """The `seed`, `data` and `protocol` to evaluate with: the run's own (its checkpoint `section`: its
    validation data, max_seq_len, system prompt) under what the command line set (`explicit`); None:
    `config`'s as they are."""
    given = {"seed": config.seed, "data": asdict(config.data), "protocol": asdict(config.protocol)}
    return given if explicit is None else follow_checkpoint(section, given, explicit)


def evaluate_checkpoint(
    config: EvalRunConfig, explicit: set[str] | None = None, settings: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The report: metrics under training's names, what was evaluated, the `settings` it was evaluated with
    (run_settings(config, checkpoint section, explicit) unless given) and the accounting of every line."""
    bundle = load_for_inference(config.ckpt, device=resolve_device(config.device))
    settings = settings or run_settings(config, bundle.section, explicit)
    data, seed = settings["data"], settings["seed"]
    encoder = ConversationEncoder(bundle.tokenizer, bundle.template, ProtocolConfig(**settings["protocol"]))
    accounting = Accounting()
    examples, description, held_out = validation_examples(data, seed, encoder, accounting)
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
        "settings": settings,
    }
    if config.eval.generate:
        streams, _, _ = validation_source(data, seed)
        items = generation_items(streams, encoder, config.eval.max_items, held_out)
        report["items"] = generation_report(bundle, items, config.eval, seed, metrics)
    if data.get("name", "sample") == "sample" and not data.get("val") and config.eval.exact_match:
        items = sample_eval_items(seed, data["num_val"], config.eval.max_items)
        correct, total = exact_match_counts(
            bundle.model,
            items,
            bundle.tokenizer,
            bundle.template,
            config.eval.sample_max_new_tokens,
            config.eval.batch_size,
        )
        metrics["eval/exact_match"] = correct / total
        report["exact_match_items"] = total
    return report


def generation_report(
    bundle, items: list[GenerationItem], section: SampleEvalConfig, seed: int, metrics: dict
) -> list:
    """Generate each item, add the mean scores to `metrics`; returns the report's items."""
    generator = torch.Generator().manual_seed(seed)
    generations, scores = evaluate_generations(
        bundle.model,
        bundle.tokenizer,
        bundle.template.stop_tokens,
        items,
        GenerationSettings.from_section(section),
        generator,
        bundle.template,
    )
    metrics.update(scores)
    return report_items(items, [generations])


def compare_checkpoints(config: EvalRunConfig, explicit: set[str] | None = None) -> dict[str, Any]:
    """Each checkpoint of `ckpt=[a.ckpt,b.ckpt]` on the same items, with the first one's run settings
    (its validation data and protocol, under `explicit`); their generations side by side."""
    first, *others = config.ckpt
    reports = [evaluate_checkpoint(dataclasses.replace(config, ckpt=first), explicit)]
    settings = reports[0]["settings"]
    reports += [evaluate_checkpoint(dataclasses.replace(config, ckpt=c), settings=settings) for c in others]
    return side_by_side(reports)


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


def report_paths(config: EvalRunConfig) -> tuple[Path, Path]:
    """(JSON report, HTML page): `out=`/`html=` when given, else beside the (first) checkpoint, as
    `<stem>.eval.json` (`<a>.vs.<b>.eval.json` for two), inside the run like TRL's eval_results.json; the
    page beside the report, as .html."""
    if config.out:
        out = Path(config.out)
    else:
        checkpoints = [Path(ckpt) for ckpt in as_list(config.ckpt)]
        out = checkpoints[0].with_name(".vs.".join(c.stem for c in checkpoints) + ".eval.json")
    return out, Path(config.html) if config.html else out.with_suffix(".html")


def unwritable_folder(path: Path) -> Path | None:
    """The folder that keeps `path` from being written (its nearest existing one, when that is not
    writable), else None."""
    folder = path.resolve().parent
    while not folder.exists():
        folder = folder.parent
    return None if os.access(folder, os.W_OK) else folder


def run(config: EvalRunConfig, cfg: DictConfig) -> None:
    explicit = command_line_keys(list(HydraConfig.get().overrides.task))
    for path in report_paths(config):  # found before the evaluation, not after it
        if folder := unwritable_folder(path):
            sys.exit(f"sft-eval: cannot write {path.name} in {folder} (not writable); give out=PATH.json")
    try:
        if isinstance(config.ckpt, list):
            report = compare_checkpoints(config, explicit)
            page = report
            print_comparison(report)
        else:
            report = evaluate_checkpoint(config, explicit)
            page = side_by_side([dict(report)])
            print_report(report)
    except CheckpointError as error:
        sys.exit(f"sft-eval: {error}")
    out, html = report_paths(config)
    write_json(report, out)
    print(f"report: {out}")
    if config.eval.generate:
        write_html(page, html)
        print(f"page:   {html}")


def main() -> None:
    run_cli("sft-eval", "eval", EvalRunConfig, run)


if __name__ == "__main__":
    main()
