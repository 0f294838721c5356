"""sft-eval follows the run it evaluates: generation scores the run's own validation conversations (its
val files, or the whole conversations its val_fraction held out) with its columns and protocol; a
comparison scores both checkpoints on the first one's; the report and page are written by default."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from sft.checkpoint import load_for_inference, run_section
from sft.cli import eval as eval_cli
from sft.data.config import DataConfig
from sft.data.validation import validation_examples
from sft.protocol.pipeline import Accounting, ConversationEncoder
from sft.protocol.types import ProtocolConfig
from tests.helpers import write_checkpoint

CONVERSATIONS = [
    {
        "conversation": [
            {"role": "user", "content": f"Count to {n}"},
            {"role": "assistant", "content": " ".join(str(i) for i in range(1, n + 1))},
        ]
    }
    for n in range(1, 13)
]


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return str(path)


def run_checkpoint(path: Path, tokenizer, data: DataConfig, protocol: ProtocolConfig, seed: int = 5) -> Path:
    """A checkpoint of a run with these `data` and `protocol` sections (as sft-train records them)."""
    write_checkpoint(path, tokenizer)
    checkpoint = torch.load(path, weights_only=True)
    run = {
        "seed": seed,
        "tokenizer": {"name": "file", "path": None},
        "template": {"name": "chatml", "path": None},
        "model": {"name": "tiny"},
        "data": asdict(data),
        "protocol": asdict(protocol),
    }
    checkpoint["sft"].update(run_section(run, "32-true"))
    torch.save(checkpoint, path)
    return path


def eval_main(monkeypatch, tmp_path: Path, *argv: str) -> None:
    monkeypatch.setattr(sys, "argv", ["sft-eval", *argv, "device=cpu", "eval.exact_match=false"])
    monkeypatch.chdir(tmp_path)
    eval_cli.main()


def test_generation_scores_the_conversations_val_fraction_held_out(tmp_path, tokenizer, monkeypatch):
    """No data.val: the loss and the generation items are the same held-out conversations of the run's
    training file (read through its column mapping), each with the system-prompt draw training made."""
    train = write_jsonl(tmp_path / "train.jsonl", CONVERSATIONS)
    data = DataConfig(name="jsonl", train=[train], val_fraction=0.5, columns={"messages": "conversation"})
    protocol = ProtocolConfig(system_prompt="Be brief.", system_prompt_prob=0.5)
    ckpt = run_checkpoint(tmp_path / "run.ckpt", tokenizer, data, protocol)
    eval_main(monkeypatch, tmp_path, f"ckpt={ckpt}", "eval.max_new_tokens=2", "out=report.json")
    report = json.loads((tmp_path / "report.json").read_text())

    encoder = ConversationEncoder(tokenizer, load_for_inference(ckpt).template, protocol)
    held_out, description, _ = validation_examples(asdict(data), 5, encoder, Accounting())
    assert report["data"] == description and report["examples"] == len(held_out) == 6
    assert [item["where"] for item in report["items"]] == [example.where for example in held_out]
    for item, example in zip(report["items"], held_out, strict=True):
        prompt_ids = tokenizer.encode(item["prompt"], add_special_tokens=False).ids
        assert prompt_ids == example.input_ids[: len(prompt_ids)].tolist()  # training's own prompt
    with_system = sum("Be brief." in item["prompt"] for item in report["items"])
    assert 0 < with_system < len(held_out)  # the draws differ by conversation: each kept its index


def run_with_val_file(tmp_path: Path, tokenizer) -> tuple[Path, str]:
    val = write_jsonl(tmp_path / "val.jsonl", CONVERSATIONS[:3])
    data = DataConfig(name="jsonl", train=[val], val=[val], columns={"messages": "conversation"})
    protocol = ProtocolConfig(system_prompt="Be brief.")
    return run_checkpoint(tmp_path / "a.ckpt", tokenizer, data, protocol), val


def test_two_checkpoints_are_compared_on_the_first_ones_data_and_protocol(tmp_path, tokenizer, monkeypatch):
    first, val = run_with_val_file(tmp_path, tokenizer)
    second = write_checkpoint(tmp_path / "b.ckpt", tokenizer)  # an older checkpoint: no run section
    eval_main(monkeypatch, tmp_path, f"ckpt=[{first},{second}]", "eval.max_new_tokens=2", "out=both.json")
    report = json.loads((tmp_path / "both.json").read_text())
    assert [summary["data"] for summary in report["checkpoints"]] == [val, val]
    assert [item["reference"] for item in report["items"]] == ["1", "1 2", "1 2 3"]
    assert all(item["prompt"].startswith("<|im_start|>system\nBe brief.") for item in report["items"])
    settings = [summary["settings"] for summary in report["checkpoints"]]
    assert settings[0] == settings[1] and settings[0]["seed"] == 5  # the report says what it scored with


def test_the_report_and_page_go_beside_the_checkpoint_by_default(tmp_path, tokenizer, monkeypatch, capsys):
    first, _ = run_with_val_file(tmp_path, tokenizer)
    second = shutil.copy(first, tmp_path / "b.ckpt")
    eval_main(monkeypatch, tmp_path, f"ckpt={first}", "eval.max_new_tokens=2")
    report = json.loads((tmp_path / "a.eval.json").read_text())
    assert "gen/exact_match" in report["metrics"] and "1 2 3" in (tmp_path / "a.eval.html").read_text()
    printed = capsys.readouterr().out
    assert (
        f"report: {tmp_path / 'a.eval.json'}" in printed and f"page:   {tmp_path / 'a.eval.html'}" in printed
    )
    eval_main(monkeypatch, tmp_path, f"ckpt=[{first},{second}]", "eval.max_new_tokens=2", "html=side.html")
    assert len(json.loads((tmp_path / "a.vs.b.eval.json").read_text())["checkpoints"]) == 2
    assert (tmp_path / "side.html").is_file() and not (tmp_path / "a.vs.b.eval.html").exists()


def test_a_report_that_cannot_be_written_is_refused_before_the_evaluation(tmp_path, tokenizer, monkeypatch):
    """The report goes beside the checkpoint by default: a read-only run folder is named at once (with
    out= as the way out), not after the whole evaluation as a traceback."""
    first, _ = run_with_val_file(tmp_path, tokenizer)
    monkeypatch.setattr(eval_cli.os, "access", lambda path, mode: Path(path) != tmp_path)
    monkeypatch.setattr(eval_cli, "evaluate_checkpoint", lambda *args: pytest.fail("evaluated anyway"))
    with pytest.raises(SystemExit, match=r"cannot write a\.eval\.json in .* give out=PATH\.json"):
        eval_main(monkeypatch, tmp_path, f"ckpt={first}")
    (tmp_path / "reports").mkdir()
    monkeypatch.setattr(eval_cli.os, "access", lambda path, mode: True)
    assert eval_cli.unwritable_folder(tmp_path / "reports" / "new" / "r.json") is None  # made when written
