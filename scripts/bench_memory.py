"""Resident memory of a training process's data path against dataset size: it must not grow with the data.

    .venv/bin/python scripts/bench_memory.py [--sizes 10000 100000 1000000] [--format parquet] [--trace]

For each size, short synthetic conversations (~60 tokens) are written to a JSONL (or Parquet) file, then a
FRESH subprocess imports torch and lightning, and runs SFTDataModule as training does: prepare_data() (BPE
training, encoding, the store) → setup() (memory maps, best-fit packing at max_seq_len 512) → one full
epoch of train_dataloader() (batch size 32). It reads /proc/self/status: RSS after the imports (the fixed
cost), the peak of each phase (VmHWM, reset between phases via /proc/self/clear_refs), RSS after setup and
after the epoch. RSS is split into anonymous memory (the process's own) and file pages (the memory-mapped
store: page cache, shared between ranks and workers and reclaimable), since only the first is a budget.
--trace adds tracemalloc's largest Python allocation sites after setup and after the epoch (slow).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

WORDS = (
    "the a of to and in is it you that was for on are with as his they be at one have this from or had by "
    "hot word but what some we can out other were all there when up use your how said an each which she do"
).split()
PHASES = ("prepare", "setup", "iterate")
PARQUET_ROWS = 100_000


def conversations(count: int, seed: int = 0) -> Iterator[dict]:
    """`count` one-exchange conversations of random words, one at a time."""
    rng = random.Random(seed)
    for _ in range(count):
        question = " ".join(rng.choices(WORDS, k=rng.randint(10, 30))).capitalize() + "?"
        answer = " ".join(rng.choices(WORDS, k=rng.randint(10, 40))).capitalize() + "."
        yield {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def write_conversations(path: Path, count: int, data_format: str = "jsonl") -> None:
    """The conversations streamed to disk (no list of them in memory), as JSONL or as Parquet written in
    row groups of PARQUET_ROWS (the reader streams them in record batches)."""
    if data_format == "jsonl":
        with open(path, "w", encoding="utf-8") as handle:
            for record in conversations(count):
                handle.write(json.dumps(record) + "\n")
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = conversations(count)
    first = pa.Table.from_pylist(list(itertools.islice(records, PARQUET_ROWS)))
    with pq.ParquetWriter(path, first.schema) as writer:
        writer.write_table(first)
        while rows := list(itertools.islice(records, PARQUET_ROWS)):
            writer.write_table(pa.Table.from_pylist(rows, schema=first.schema))


def memory_mb() -> dict[str, float]:
    """RSS, its anonymous and file-backed parts, and the peak since the last reset (VmHWM), in MB."""
    status = Path("/proc/self/status").read_text()
    fields = dict(re.findall(r"^(VmRSS|VmHWM|RssAnon|RssFile):\s+(\d+) kB", status, re.M))
    return {name: int(kilobytes) / 1024 for name, kilobytes in fields.items()}


def reset_peak() -> None:
    """Make VmHWM start again from the current RSS (Linux ≥ 4.0), so each phase gets its own peak."""
    Path("/proc/self/clear_refs").write_text("5")


def top_allocations(label: str, limit: int = 8) -> None:
    import tracemalloc

    print(f"--- tracemalloc after {label}: largest live allocation sites", file=sys.stderr)
    for stat in tracemalloc.take_snapshot().statistics("lineno")[:limit]:
        print(f"  {stat.size / 2**20:8.1f} MB  {stat.count:>9} blocks  {stat.traceback[0]}", file=sys.stderr)


def measure(data: Path, cache_dir: Path, trace: bool) -> dict[str, float]:
    """Runs in the fresh subprocess: imports, then the three phases; returns the figures."""
    import lightning  # noqa: F401  (part of the fixed cost a training process pays)
    from hydra import compose, initialize_config_module

    from sft.cli.schemas import TrainConfig
    from sft.config import load_config
    from sft.data.build import prepare
    from sft.data.datamodule import SFTDataModule

    overrides = [
        "data=jsonl", f"data.train=[{data}]", f"data.cache_dir={cache_dir}", "data.batch_size=32",
        "data.packing=true", "protocol.max_seq_len=512", "tokenizer=bpe", "tokenizer.vocab_size=512",
    ]  # fmt: skip
    with initialize_config_module(config_module="sft.conf", version_base="1.3"):
        config = load_config(compose("train", overrides=overrides), TrainConfig)
    made: dict = {}
    tokens = 0

    def iterate() -> None:
        nonlocal tokens
        for batch in made["datamodule"].train_dataloader():
            tokens += int(batch["real_tokens"])

    if trace:
        import tracemalloc

        tracemalloc.start()
    result: dict = {"imports": memory_mb()}
    phases = {
        "prepare": lambda: made.update(prepared=prepare(config)),
        "setup": lambda: made.update(datamodule=SFTDataModule(config, made["prepared"])),
        "iterate": iterate,
    }
    for phase, run in phases.items():
        reset_peak()
        started = time.perf_counter()
        run()
        result[phase] = {"seconds": time.perf_counter() - started, **memory_mb()}
        if trace:
            top_allocations(phase)
    datamodule = made["datamodule"]
    result.update(
        examples=len(datamodule.train_dataset.example_ids),
        rows=len(datamodule.train_dataset),
        tokens=tokens,
        packing=datamodule.packing_efficiency,
    )
    return result


def tables(results: list[dict]) -> str:
    """Two Markdown tables: times (seconds), and memory (MB) at the end of each phase and its peak."""
    times = [
        "| conversations | tokens | packed rows | packing | prepare s | setup s | iterate s |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    memory = [
        "| conversations | after imports: anon + file | prepare: peak · after (anon) "
        "| setup: peak · after (anon) | epoch: peak · after (anon + file) | anon growth since imports |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        imports, prepare, setup, iterate = (r[key] for key in ("imports", *PHASES))
        times.append(
            f"| {r['examples']:,} | {r['tokens']:,} | {r['rows']:,} | {r['packing']:.1%} "
            f"| {prepare['seconds']:.1f} | {setup['seconds']:.1f} | {iterate['seconds']:.1f} |"
        )
        memory.append(
            f"| {r['examples']:,} | {imports['RssAnon']:.0f} + {imports['RssFile']:.0f} "
            f"| {prepare['VmHWM']:.0f} · {prepare['VmRSS']:.0f} ({prepare['RssAnon']:.0f}) "
            f"| {setup['VmHWM']:.0f} · {setup['VmRSS']:.0f} ({setup['RssAnon']:.0f}) "
            f"| {iterate['VmHWM']:.0f} · {iterate['VmRSS']:.0f} "
            f"({iterate['RssAnon']:.0f} + {iterate['RssFile']:.0f}) "
            f"| {iterate['RssAnon'] - imports['RssAnon']:+.0f} |"
        )
    return "\n".join(times + [""] + memory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--format", choices=("jsonl", "parquet"), default="jsonl", help="input file kind")
    parser.add_argument("--trace", action="store_true", help="print tracemalloc's top allocation sites")
    parser.add_argument("--child", nargs=2, metavar=("DATA", "CACHE_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(Path(args.child[0]), Path(args.child[1]), args.trace)))
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as directory:
        for size in args.sizes:
            data = Path(directory) / f"conversations-{size}.{args.format}"
            write_conversations(data, size, args.format)
            command = [sys.executable, __file__, "--child", str(data), str(Path(directory) / "cache")]
            completed = subprocess.run(
                command + ["--trace"] * args.trace, stdout=subprocess.PIPE, text=True, check=True
            )
            results.append(json.loads(completed.stdout.strip().splitlines()[-1]))
            print(f"{size:,} conversations done", file=sys.stderr)
            data.unlink()
    print(tables(results))


if __name__ == "__main__":
    main()
