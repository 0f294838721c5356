"""sft-eval: val loss and perplexity over trained tokens (batching and padding do not change them), the
sample's exact match, user files through the same protocol, and the JSON report."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict

import pytest
import torch
from hydra import compose, initialize_config_module

from sft.checkpoint import load_for_inference
from sft.cli import eval as eval_cli
from sft.config import load_config
from sft.data.validation import validation_examples
from sft.loss import full_logits_loss_sum
from sft.protocol.pipeline import Accounting, ConversationEncoder
from tests.helpers import write_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    return write_checkpoint(tmp_path_factory.mktemp("eval") / "tiny.ckpt", tokenizer)


def eval_config(*overrides: str) -> eval_cli.EvalRunConfig:
    with initialize_config_module("sft.conf", version_base="1.3"):
        cfg = compose("eval", overrides=["device=cpu", *overrides])
    return load_config(cfg, eval_cli.EvalRunConfig)


def test_sample_report_through_the_console_entry(checkpoint, tmp_path, monkeypatch, capsys):
    out = tmp_path / "report.json"
    argv = ["sft-eval", f"ckpt={checkpoint}", "data.num_val=4", "eval.max_items=3", "eval.max_new_tokens=4"]
    monkeypatch.setattr(sys, "argv", [*argv, f"out={out}", "device=cpu"])
    monkeypatch.chdir(tmp_path)
    eval_cli.main()
    report = json.loads(out.read_text())
    metrics = report["metrics"]
    assert report["examples"] == 4 and report["exact_match_items"] == 3
    assert metrics["val/perplexity"] == pytest.approx(math.exp(metrics["val/loss"]))
    assert 0.0 <= metrics["eval/exact_match"] <= 1.0
    assert "val/loss" in capsys.readouterr().out
    assert sorted(path.name for path in tmp_path.iterdir()) == ["report.html", "report.json"]  # no outputs/


def test_loss_is_the_trained_token_mean_whatever_the_batching(checkpoint):
    bundle = load_for_inference(checkpoint)
    config = eval_config(f"ckpt={checkpoint}", "data.num_val=6")
    encoder = ConversationEncoder(bundle.tokenizer, bundle.template, config.protocol)
    examples, _, _ = validation_examples(asdict(config.data), config.seed, encoder, Accounting())
    total, tokens = 0.0, 0
    with torch.no_grad():
        for example in examples:  # one at a time, no padding
            ids, labels = (torch.from_numpy(a)[None] for a in (example.input_ids, example.labels))
            loss_sum, count = full_logits_loss_sum(bundle.model(ids), labels)
            total, tokens = total + float(loss_sum), tokens + int(count)
    for batch_size in (1, 4):
        loss_sum, trained_tokens = eval_cli.trained_token_loss(bundle.model, examples, batch_size)
        assert trained_tokens == tokens
        assert loss_sum == pytest.approx(total, rel=1e-5)
    config.eval.exact_match = config.eval.generate = False
    report = eval_cli.evaluate_checkpoint(config)
    assert report["metrics"]["val/loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert "eval/exact_match" not in report["metrics"]


def test_user_files_go_through_the_protocol_with_accounting(checkpoint, tmp_path):
    path = tmp_path / "held_out.jsonl"
    records = [
        {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there."}]},
        {"prompt": "Reverse: 3 1 2", "completion": "2 1 3"},
        {"no": "conversation here"},
    ]
    path.write_text("\n".join(json.dumps(record) for record in records) + "\n")
    config = eval_config(f"ckpt={checkpoint}", f"data.val=[{path}]", "protocol.on_error=skip")
    report = eval_cli.evaluate_checkpoint(config)
    assert report["examples"] == 2
    assert report["accounting"]["skipped"] == {"unknown_format": 1}
    assert report["metrics"]["val/loss"] > 0 and "eval/exact_match" not in report["metrics"]


def test_scoring_runs_under_the_autocast_validation_ran_under():
    """A bf16-mixed run validated under bf16 autocast: sft-eval must score the same way (1e-4 of the logged
    val/loss); full-precision runs and older checkpoints (no precision recorded) score in fp32."""
    cpu = torch.device("cpu")
    weights = torch.randn(8, 8)
    for precision, dtype in (("bf16-mixed", torch.bfloat16), ("16-mixed", torch.bfloat16)):
        with eval_cli.validation_autocast(precision, cpu):
            assert (weights @ weights).dtype == dtype
    for precision in ("32-true", None):
        with eval_cli.validation_autocast(precision, cpu):
            assert (weights @ weights).dtype == torch.float32
