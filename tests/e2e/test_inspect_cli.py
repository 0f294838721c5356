"""sft-inspect as a user runs it: trained markers surround exactly the assistant text in the terminal and in
the HTML page, and the statistics JSON counts what preparation kept, skipped and dropped."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from html import unescape

import pytest

from sft.cli.inspect import BOUNDARY, TRAINED_CLOSE, TRAINED_OPEN
from tests.helpers import trained_runs

pytestmark = pytest.mark.slow

CONVERSATIONS = [
    [("user", "What is two plus two?"), ("assistant", "Four, of course.")],
    [("user", "Say hello in French."), ("assistant", "Bonjour, ça va? 🙂")],
    [
        ("system", "Answer briefly."),
        ("user", "Name a colour."),
        ("assistant", "Blue."),
        ("user", "Another one?"),
        ("assistant", "Green."),
    ],
]
LONG = [("user", "word " * 200), ("assistant", "too long to keep")]


def write_jsonl(path, conversations, bad_lines=0):
    with open(path, "w", encoding="utf-8") as handle:
        for turns in conversations:
            messages = [{"role": role, "content": content} for role, content in turns]
            handle.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
        handle.write("{not json\n" * bad_lines)


def run_inspect(tmp_path, *overrides):
    """The Hydra entry point as a user runs it, without colour, caching and running in tmp_path;
    returns the output after the legend line (which shows the markers themselves)."""
    env = {**os.environ, "NO_COLOR": "1", "TERM": "dumb"}
    env.pop("FORCE_COLOR", None)
    # hydra.run.dir stays inspect.yaml's "." (here tmp_path): the tests check that nothing else is written.
    command = [sys.executable, "-m", "sft.cli.inspect", f"data.cache_dir={tmp_path / 'cache'}", *overrides]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    legend, _, view = result.stdout.partition(f"{TRAINED_OPEN}trained tokens{TRAINED_CLOSE}")
    assert view, result.stdout
    return view


def expected_runs(conversations) -> list[str]:
    return [
        content + "<|im_end|>" for turns in conversations for role, content in turns if role == "assistant"
    ]


def test_inspect_jsonl_terminal_html_and_stats(tmp_path):
    data = tmp_path / "chats.jsonl"
    write_jsonl(data, [*CONVERSATIONS, LONG], bad_lines=1)
    output = run_inspect(
        tmp_path, "data=jsonl", f"data.train=[{data}]", "tokenizer=bpe", "tokenizer.vocab_size=300",
        "protocol.max_seq_len=96", "protocol.truncation=drop", "protocol.on_error=skip",
        "n=10", "html=view.html", "stats=stats.json",
    )  # fmt: skip

    # Terminal: the trained markers surround exactly each assistant reply and its end-of-turn token.
    assert trained_runs(output) == expected_runs(CONVERSATIONS)
    outside = re.sub(f"{TRAINED_OPEN}.*?{TRAINED_CLOSE}", "", output, flags=re.S).replace(BOUNDARY, "")
    for turns in CONVERSATIONS:
        for role, content in turns:
            assert (content in outside) == (role != "assistant")

    # HTML: consecutive trained spans spell the assistant replies; the other text is outside them.
    page = (tmp_path / "view.html").read_text(encoding="utf-8")
    assert "<link" not in page and "<script" not in page and "src=" not in page
    runs, untrained, current = [], "", None
    tokens = "".join(re.findall(r'<div class="tokens">(.*?)</div>', page, re.S))
    for classes, text in re.findall(r'<span class="(t [^"]*)"[^>]*>(.*?)</span>', tokens, re.S):
        text = unescape(text).replace("↵", "")
        if "trained" in classes.split():
            current = (current or "") + text
            continue
        if current is not None:
            runs.append(current)
            current = None
        untrained += text
    assert runs == expected_runs(CONVERSATIONS)
    assert "What is two plus two?" in untrained and "Answer briefly." in untrained

    # Stats: three kept, the broken line skipped, the long one dropped; trained tokens match the markers.
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["examples"] == 3 and stats["kept"] == 3 and stats["read"] == 5
    assert stats["skipped"]["total"] == 1 and sum(stats["skipped"]["by_reason"].values()) == 1
    assert stats["dropped"] == {"total": 1, "by_reason": {"too_long": 1}}
    trained_in_output = sum(
        run.count(BOUNDARY) + 1 for run in re.findall(f"{TRAINED_OPEN}(.*?){TRAINED_CLOSE}", output, re.S)
    )
    assert stats["trained_tokens"] == trained_in_output
    assert 0 < stats["trained_tokens"] < stats["tokens"] and 0 < stats["packing_efficiency"] <= 1
    assert sorted(os.listdir(tmp_path)) == ["cache", "chats.jsonl", "stats.json", "view.html"]


def test_inspect_embedded_sample(tmp_path):
    output = run_inspect(
        tmp_path, "data=sample", "data.num_train=50", "data.num_val=5", "n=2", "stats=train.json"
    )
    assert output.count("example ") == 2 and "packing" in output and "read 50 = kept 50" in output
    assert all(run.endswith("<|im_end|>") for run in trained_runs(output))
    stats = json.loads((tmp_path / "train.json").read_text())
    assert (stats["examples"], stats["skipped"]["total"], stats["dropped"]["total"]) == (50, 0, 0)
    assert sum(bin_["count"] for bin_ in stats["length_histogram"]) == 50
    assert stats["packing_efficiency"] > 0.8  # 50 short examples fill few 512-token rows

    run_inspect(
        tmp_path, "data=sample", "data.num_train=50", "data.num_val=5", "split=val", "n=0", "stats=val.json"
    )
    assert json.loads((tmp_path / "val.json").read_text())["examples"] == 5
    assert sorted(os.listdir(tmp_path)) == ["cache", "train.json", "val.json"]
