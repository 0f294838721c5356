"""Protocol speed: JSONL → (input_ids, labels) with our pipeline, against transformers and bare encoding.

    .venv/bin/python scripts/bench_protocol.py [--copies 10] [--synthetic 20000] [--hf-rows 3000] \
        [--real-data ../shared/data] [--stages]

On the same data and tokenizer (a byte-level BPE trained here on the real data), whole-process times:
  ours          ConversationEncoder over read_conversations: read, validate, render, encode, label
  transformers  apply_chat_template(tokenize=True, return_assistant_tokens_mask=True) per conversation,
                builtin chatml as Jinja with {% generation %} tags (what sft-export ships: reasoning, tool
                calls and tools too), given the already-parsed messages (reading not timed)
  bare          Tokenizer.encode_batch of the already-rendered texts (chunked as ours) and their ids;
                also encode_batch_fast (no offsets), which ours calls for a byte-level BPE (encoding.py)
The methods take turns for --repeats rounds: rates are each one's best round, ratios the median of the
rounds' side-by-side ratios. transformers runs on the first --hf-rows conversations only (a rate).
Before timing, ours is checked against transformers token for token.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from sft.protocol.labels import IGNORE_INDEX
from sft.protocol.pipeline import ENCODE_CHUNK, Accounting, ConversationEncoder, read_conversations
from sft.protocol.templates import BUILTINS, builtin_jinja_source
from sft.protocol.templates.jinja import jinja_message
from sft.protocol.tokenizer import train_bpe
from sft.protocol.types import Conversation, ProtocolConfig

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data from the project
CHATML_TAGGED = builtin_jinja_source(BUILTINS["chatml"])
WORDS = (
    "the a of to and in is it you that he was for on are with as I his they be at one have this from "
    "or had by hot word but what some we can out other were all there when up use your how said an each "
    'naïve café Straße 東京 数据 привет مرحبا 🙂 🚀 x=1; def f(): return [1, 2, 3] {"k": "v"}'
).split()


def real_records(folder: Path, copies: int) -> list[str]:
    """The shared demo sets (a JSON array and a JSONL file) as JSONL lines, repeated `copies` times;
    none where there is no such folder."""
    lines = []
    for path in sorted(folder.glob("*.json*")):
        if path.suffix == ".json":
            lines += [json.dumps(record, ensure_ascii=False) for record in json.loads(path.read_text())]
        else:
            lines += [line for line in path.read_text().splitlines() if line.strip()]
    return lines * copies


def synthetic_records(count: int, seed: int = 0) -> list[str]:
    """Multi-turn conversations of random words, unicode and whitespace (some with a system prompt)."""
    rng = random.Random(seed)

    def text() -> str:
        words = rng.choices(WORDS, k=rng.randint(1, 40))
        return "".join(word + rng.choice(("", " ", " ", " ", "\n", "  ", ", ", ".\n\n")) for word in words)

    lines = []
    for _ in range(count):
        messages = [{"role": "system", "content": text()}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 4)):
            messages += [{"role": "user", "content": text()}, {"role": "assistant", "content": text()}]
        lines.append(json.dumps({"messages": messages}, ensure_ascii=False))
    return lines


def timed_rounds(repeats: int, runs: dict[str, Callable[[], tuple[int, int]]]) -> dict[str, dict]:
    """{name: {"wall": [...], "cpu": [...], "rows", "tokens"}}: each method's time in each round. The
    methods take turns within a round, in reversed order every other round, so a slow spell of a shared
    machine falls on neighbouring runs of all of them and the per-round ratios cancel it."""
    results: dict[str, dict] = {}
    for round_number in range(repeats):
        order = list(runs.items())
        for name, run in order if round_number % 2 == 0 else reversed(order):
            started, cpu_started = time.perf_counter(), time.process_time()
            rows, tokens = run()
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
            result = results.setdefault(name, {"wall": [], "cpu": [], "rows": rows, "tokens": tokens})
            result["wall"].append(elapsed)
            result["cpu"].append(cpu)
    return results


def run_ours(encoder: ConversationEncoder, path: str) -> tuple[int, int]:
    accounting = Accounting()
    tokens = sum(len(example.input_ids) for example in encoder.encode_file(path, "auto", accounting))
    return accounting.kept, tokens


def run_bare(tokenizer: Tokenizer, texts: list[str], method: str = "encode_batch") -> tuple[int, int]:
    tokens, encode = 0, getattr(tokenizer, method)
    for first in range(0, len(texts), ENCODE_CHUNK):
        for encoding in encode(texts[first : first + ENCODE_CHUNK], add_special_tokens=False):
            tokens += len(encoding.ids)
    return len(texts), tokens


def hf_labels(hf_tokenizer, conversation: tuple[list[dict], list | None]) -> tuple[np.ndarray, np.ndarray]:
    messages, tools = conversation
    output = hf_tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids = np.asarray(output["input_ids"], dtype=np.int64)
    return ids, np.where(np.asarray(output["assistant_masks"], dtype=bool), ids, IGNORE_INDEX)


def run_transformers(hf_tokenizer, conversations: list[tuple[list[dict], list | None]]) -> tuple[int, int]:
    tokens = sum(len(hf_labels(hf_tokenizer, messages)[0]) for messages in conversations)
    return len(conversations), tokens


def bench(name: str, path: str, tokenizer: Tokenizer, hf_tokenizer, args: argparse.Namespace) -> list[dict]:
    config = ProtocolConfig(max_seq_len=1 << 30, on_error="skip")
    encoder = ConversationEncoder(tokenizer, BUILTINS["chatml"], config)
    prepared = [
        encoder.prepare(item, index)
        for index, item in enumerate(read_conversations(path))
        if isinstance(item, Conversation)
    ]
    texts = [row.rendered.text for _, rows in prepared for row in rows]  # builtin chatml: one row each
    messages = [([jinja_message(m) for m in conv.messages], conv.tools) for conv, _ in prepared]

    # Same ids and labels as transformers before anything is timed.
    ours = list(encoder.encode_file(path, "auto", Accounting()))
    for example, conversation in zip(ours[: args.check_rows], messages, strict=False):
        ids, labels = hf_labels(hf_tokenizer, conversation)
        assert np.array_equal(example.input_ids, ids) and np.array_equal(example.labels, labels), (
            example.where
        )

    hf_subset = messages[: args.hf_rows]
    results = timed_rounds(
        args.repeats,
        {
            "ours": lambda: run_ours(encoder, path),
            "transformers": lambda: run_transformers(hf_tokenizer, hf_subset),
            "bare encode_batch": lambda: run_bare(tokenizer, texts),
            "bare encode_batch_fast": lambda: run_bare(tokenizer, texts, "encode_batch_fast"),
        },
    )
    return [{"data": name, "method": method, **times} for method, times in results.items()]


class Replay:
    """A tokenizer whose encode_batch hands back encodings made beforehand: the whole pipeline run with it
    measures the pipeline's own work, with no tokenizer threads competing for the cores."""

    def __init__(self, tokenizer: Tokenizer, texts: list[str]):
        self.tokenizer = tokenizer
        self.encodings = dict(
            zip(texts, tokenizer.encode_batch(texts, add_special_tokens=False), strict=True)
        )

    def __getattr__(self, name: str):
        return getattr(self.tokenizer, name)

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list:
        return [self.encodings[text] for text in texts]

    encode_batch_fast = encode_batch  # what the pipeline calls for a byte-level BPE


def stage_cpu(encoder: ConversationEncoder, path: str, repeats: int) -> dict[str, float]:
    """CPU seconds of each stage on its own, single-threaded (best of `repeats`), beside bare encode_batch
    (all of the Rust tokenizer's threads): where the time goes that the pipeline adds to tokenizing.
    "ours, replayed tokens" is the whole pipeline with the tokenizer's results made beforehand."""
    conversations = list(read_conversations(path))
    prepared = [encoder.prepare(item, index) for index, item in enumerate(conversations)]
    rows = [row.rendered for _, item_rows in prepared for row in item_rows]
    texts = [rendered.text for rendered in rows]
    encodings = encoder.encode_rows(prepared)
    replaying = ConversationEncoder(Replay(encoder.tokenizer, texts), encoder.template, encoder.config)
    stages = {
        "read + parse records": lambda: list(read_conversations(path)),
        "normalize + render": lambda: [
            encoder.prepare(item, index) for index, item in enumerate(conversations)
        ],
        "labels": lambda: [
            encoder.row_encoder.labels(rendered, encoding)
            for encoding, rendered in zip(encodings, rows, strict=True)
        ],
        "bare encode_batch": lambda: run_bare(encoder.tokenizer, texts),
        "ours, whole": lambda: run_ours(encoder, path),
        "ours, replayed tokens": lambda: run_ours(replaying, path),
    }
    best = {}
    for name, run in stages.items():
        for _ in range(repeats):
            started = time.process_time()
            run()
            best[name] = min(best.get(name, float("inf")), time.process_time() - started)
    return best


def print_table(rows: list[dict]) -> None:
    print(
        "| data | method | rows | rows/s | tokens/s | CPU s per 1M tokens "
        "| time per token, ours / this | CPU per token, ours / this |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for data in dict.fromkeys(row["data"] for row in rows):
        group = [row for row in rows if row["data"] == data]
        ours = group[0]
        for row in group:
            wall, cpu = (statistics.median(values) for values in ratios(ours, row))
            shown = ("—", "—") if row is ours else (f"{wall:.2f}", f"{cpu:.2f}")
            seconds, cpu_seconds = min(row["wall"]), min(row["cpu"])
            print(
                f"| {data} | {row['method']} | {row['rows']:,} | {row['rows'] / seconds:,.0f} "
                f"| {row['tokens'] / seconds:,.0f} | {cpu_seconds / row['tokens'] * 1e6:.2f} "
                f"| {shown[0]} | {shown[1]} |"
            )
    by_method = {(row["data"], row["method"]): row for row in rows}
    for data in dict.fromkeys(row["data"] for row in rows):
        wall, cpu = ratios(by_method[data, "ours"], by_method[data, "bare encode_batch"])
        print(
            f"{data}: ours / bare encode_batch = {statistics.median(wall):.2f}x wall time "
            f"(rounds {min(wall):.2f}-{max(wall):.2f}), {statistics.median(cpu):.2f}x CPU time per token "
            f"(rounds {min(cpu):.2f}-{max(cpu):.2f}); median of {len(wall)} rounds"
        )


def ratios(ours: dict, other: dict) -> tuple[list[float], list[float]]:
    """(wall, CPU) time per token of ours over `other`'s in each round (measured side by side)."""
    return tuple(
        [a / ours["tokens"] / (b / other["tokens"]) for a, b in zip(ours[key], other[key], strict=True)]
        for key in ("wall", "cpu")
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--copies", type=int, default=10, help="repeats of the 350 real conversations")
    parser.add_argument("--synthetic", type=int, default=20_000, help="synthetic conversations")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--hf-rows", type=int, default=3000, help="conversations timed with transformers")
    parser.add_argument(
        "--check-rows", type=int, default=300, help="conversations compared with transformers"
    )
    parser.add_argument("--repeats", type=int, default=5, help="rounds; ratios are their median")
    parser.add_argument("--real-data", type=Path, default=REAL_DATA, help="the dev data sets' folder")
    parser.add_argument(
        "--stages", action="store_true", help="also the CPU time of each stage beside bare encode_batch"
    )
    args = parser.parse_args()

    from transformers import PreTrainedTokenizerFast  # an optional dependency: only the benchmark needs it

    with tempfile.TemporaryDirectory() as directory:
        datasets = {
            f"real ×{args.copies}": real_records(args.real_data, args.copies),
            "synthetic": synthetic_records(args.synthetic),
        }
        datasets = {name: lines for name, lines in datasets.items() if lines}
        paths = {}
        for name, lines in datasets.items():
            paths[name] = os.path.join(directory, f"{len(paths)}.jsonl")
            Path(paths[name]).write_text("\n".join(lines) + "\n", encoding="utf-8")

        chatml = BUILTINS["chatml"]
        training_encoder = ConversationEncoder(None, chatml, ProtocolConfig(special_in_content="allow"))
        first = next(iter(paths.values()))
        texts = [
            row.rendered.text
            for item in read_conversations(first)
            if isinstance(item, Conversation)
            for row in training_encoder.prepare(item, 0)[1]
        ]
        tokenizer = train_bpe(texts, args.vocab_size, chatml.special_tokens)
        hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, chat_template=CHATML_TAGGED)

        rows = []
        for name, path in paths.items():
            rows += bench(name, path, tokenizer, hf_tokenizer, args)
        if args.stages:
            encoder = ConversationEncoder(
                tokenizer, chatml, ProtocolConfig(max_seq_len=1 << 30, on_error="skip")
            )
            for name, path in paths.items():
                cpu = stage_cpu(encoder, path, args.repeats)
                bare = cpu["bare encode_batch"]
                print(f"CPU seconds, {name}:")
                for stage, seconds in cpu.items():
                    print(f"  {stage:22s} {seconds:7.3f}  {seconds / bare:5.2f}× bare encode_batch")
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(
        f"tokenizer: byte-level BPE, vocab {tokenizer.get_vocab_size()}; template chatml; "
        f"{os.cpu_count()} cores; load average {load} (other processes share the cores)"
    )
    print_table(rows)


if __name__ == "__main__":
    main()
