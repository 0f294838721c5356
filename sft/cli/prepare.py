"""sft-prepare: run the protocol once (cached), print the accounting, optionally export the examples.

    sft-prepare data.train=[a.jsonl,b.jsonl] tokenizer=file tokenizer.path=tok.json template=chatml \\
        protocol.max_seq_len=4096 data.cache_dir=DIR export=out.jsonl

Never imports torch or lightning, so it starts fast and runs inside any data pipeline.
"""

from __future__ import annotations

import sys

from omegaconf import DictConfig

from sft.cli.entry import run_cli
from sft.cli.schemas import PrepareConfig
from sft.data.build import export_jsonl, prepare
from sft.data.store import StoreError


def run(config: PrepareConfig, cfg: DictConfig) -> None:
    try:
        prepared = prepare(config)
    except (ValueError, OSError, StoreError) as error:  # bad data, template, config or files: no traceback
        print(f"sft-prepare: {error}", file=sys.stderr)
        sys.exit(1)
    stores = prepared.train + prepared.val
    print(prepared.accounting.summary())
    for store in stores:
        counts = store.manifest["counts"]
        print(
            f"{store.source}: {counts['examples']} examples, {counts['tokens']} tokens, "
            f"{counts['trained_tokens']} trained → {store.store_dir}"
        )
    if config.export:
        count = export_jsonl(prepared.train, config.export)
        print(f"exported {count} examples to {config.export}")


def main() -> None:
    run_cli("sft-prepare", "prepare", PrepareConfig, run)


if __name__ == "__main__":
    main()
