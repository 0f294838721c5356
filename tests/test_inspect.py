"""sft-inspect shows the mask exactly: trained markers surround the assistant text and nothing else, in the
terminal and in the HTML page, and the statistics JSON counts what preparation kept, skipped and dropped."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from html import unescape

import numpy as np
import pytest

from sft.cli.inspect import BOUNDARY, TRAINED_CLOSE, TRAINED_OPEN, load_examples, terminal_text, token_texts
from sft.data.stats import dataset_stats, length_histogram
from sft.data.store import StoreWriter, TokenStore
from sft.protocol.labels import build_loss_labels
from sft.protocol.pipeline import Accounting
from tests.helpers import make_tokenizer

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


def trained_runs(text: str) -> list[str]:
    return [
        run.replace(BOUNDARY, "") for run in re.findall(f"{TRAINED_OPEN}(.*?){TRAINED_CLOSE}", text, re.S)
    ]


def expected_runs(conversations) -> list[str]:
    return [
        content + "<|im_end|>" for turns in conversations for role, content in turns if role == "assistant"
    ]


# ---- in process: the rendering itself ---------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_tokenizer():
    return make_tokenizer(["<|im_start|>", "<|im_end|>"], vocab_size=300)


def test_token_texts_concatenate_to_the_decoded_text(chat_tokenizer):
    text = "<|im_start|>user\nÜnïcödé 🙂 中文<|im_end|>\n"
    ids = chat_tokenizer.encode(text, add_special_tokens=False).ids
    texts = token_texts(chat_tokenizer, ids)
    assert len(texts) == len(ids)
    assert "".join(texts) == text
    assert "🙂" in texts  # split over several byte tokens, shown whole on the one completing it


def test_terminal_text_marks_exactly_the_trained_tokens(tmp_path, chat_tokenizer):
    text = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello you<|im_end|>\n"
    encoding = chat_tokenizer.encode(text, add_special_tokens=False)
    reply = text.index("Hello")
    ids = np.asarray(encoding.ids)
    labels = build_loss_labels(ids, encoding.offsets, [(reply, text.index("\n", reply))])
    with StoreWriter(tmp_path / "store", vocab_size=300) as writer:
        writer.add(ids, labels)
        writer.close({"source": "x.jsonl", "accounting": Accounting().to_dict()})
    [example] = load_examples(chat_tokenizer, [TokenStore(tmp_path / "store")], count=5)
    plain = terminal_text(example, colour=False).plain
    assert trained_runs(plain) == ["Hello you<|im_end|>"]
    assert (
        plain.replace(BOUNDARY, "").replace("↵", "").replace(TRAINED_OPEN, "").replace(TRAINED_CLOSE, "")
        == text
    )
    coloured = terminal_text(example, colour=True)
    assert coloured.plain == text.replace("\n", "↵\n")  # colour mode adds no marker characters


def test_length_histogram_covers_every_example():
    lengths = np.array([3, 3, 4, 10, 25, 25, 26])
    histogram = length_histogram(lengths, bins=4)
    assert sum(count for _, _, count in histogram) == len(lengths)
    assert histogram[0][0] == 3 and histogram[-1][1] >= 26
    assert all(high - low == histogram[0][1] - histogram[0][0] for low, high, _ in histogram)


def test_dataset_stats_of_no_stores():
    stats = dataset_stats([], max_seq_len=64).to_dict()
    assert (stats["examples"], stats["tokens"], stats["packing_efficiency"]) == (0, 0, 0.0)


# ---- the Hydra entry point --------------------------------------------------------------------------


@pytest.mark.slow
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


@pytest.mark.slow
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
