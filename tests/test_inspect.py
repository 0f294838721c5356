"""sft-inspect shows the mask exactly: trained markers surround the assistant text and nothing else. The
entry point itself (terminal, HTML page, statistics JSON) runs in tests/e2e/test_inspect_cli.py."""

from __future__ import annotations

import numpy as np
import pytest

from sft.cli.inspect import BOUNDARY, TRAINED_CLOSE, TRAINED_OPEN, load_examples, terminal_text, token_texts
from sft.data.stats import dataset_stats, length_histogram
from sft.data.store import StoreWriter, TokenStore
from sft.protocol.labels import build_loss_labels
from sft.protocol.pipeline import Accounting
from tests.helpers import make_tokenizer, trained_runs

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
