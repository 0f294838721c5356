"""sft-train as a user meets it: data that prepares to nothing ends with the reason, not a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import make_tokenizer

pytestmark = pytest.mark.slow


def test_an_empty_training_set_ends_with_its_accounting_and_no_traceback(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"oops\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    make_tokenizer().save(str(tmp_path / "tok.json"))
    command = [
        sys.executable,
        "-m",
        "sft.cli.train",
        "data=jsonl",
        "data.train=[bad.jsonl]",
        "protocol.on_error=skip",
        "tokenizer=file",
        "tokenizer.path=tok.json",
        "data.cache_dir=cache",
        "hydra.run.dir=run",
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 1
    assert "sft-train: no training examples left after preparation" in result.stderr
    assert "skipped 1 no_assistant_turn: bad.jsonl:2" in result.stderr and "Traceback" not in result.stderr
