"""The checkpoint's own section: recorded with absolute paths, and followed by evaluation."""

from __future__ import annotations

from pathlib import Path

import torch

from sft.checkpoint import follow_checkpoint, run_section

RUN = {
    "seed": 7,
    "tokenizer": {"name": "file", "path": "tok.json"},
    "template": {"name": "chatml", "path": None},
    "model": {"name": "gpt-tiny"},
    "protocol": {"max_seq_len": 300, "system_prompt": "Be brief."},
    "data": {"name": "jsonl", "train": ["a.jsonl"], "val": None, "val_fraction": 0.1, "cache_dir": "c"},
}
GIVEN = {
    "seed": 1234,
    "protocol": {"max_seq_len": 2048, "system_prompt": None},
    "data": {"name": "sample", "train": None, "val": None, "val_fraction": 0.0, "cache_dir": ".cache/sft"},
}


def test_the_section_records_paths_absolute_and_versions(tmp_path):
    section = run_section(RUN, "bf16-mixed")
    torch.save({"sft": section}, tmp_path / "c.ckpt")
    assert torch.load(tmp_path / "c.ckpt", weights_only=True)["sft"] == section
    assert section["data"]["train"] == [str(Path("a.jsonl").absolute())]
    assert section["config"]["tokenizer"]["path"] == str(Path("tok.json").absolute())
    assert section["config"]["template"]["path"] is None
    assert {"sft", "python", "torch", "lightning", "protocol"} <= set(section["versions"])
    assert section["precision"] == "bf16-mixed"  # sft-eval scores under validation's autocast
    assert RUN["data"]["train"] == ["a.jsonl"]  # the run's own config is left as it is


def test_evaluation_follows_the_run_unless_told_otherwise():
    section = run_section(RUN, "bf16-mixed")
    followed = follow_checkpoint(section, GIVEN, explicit={"ckpt"})
    assert followed == {"seed": 7, "protocol": section["protocol"], "data": section["data"]}
    given = {**GIVEN, "data": {**GIVEN["data"], "val": ["held_out.jsonl"]}}
    followed = follow_checkpoint(section, given, explicit={"data.val", "protocol.max_seq_len"})
    assert followed["data"]["val"] == ["held_out.jsonl"] and followed["data"]["name"] == "jsonl"
    assert followed["protocol"] == {"max_seq_len": 2048, "system_prompt": "Be brief."}
    assert follow_checkpoint(section, GIVEN, explicit={"data", "seed"})["data"]["name"] == "sample"
    assert follow_checkpoint({}, GIVEN, explicit=set()) is GIVEN
