"""What splitting costs: tokens computed per trained token when conversations become one row per turn.

    .venv/bin/python scripts/split_row_cost.py [FILE ...] [--template qwen3] [--vocab-size 8192]
        [--max-seq-len 4096] [--batch-size 8]

A template that renders history differently from a final turn (Qwen3 drops earlier reasoning) trains
each turn in a row of its own, which repeats the history. This prepares the files (default: the shared
reasoning and tool-call demo sets) with a stock template from the `trl` wheel and reports tokens computed
per trained token three ways: one row per conversation (what a prefix-stable template gives, shown for
scale; not exact for this template), the split rows as stored, and the split rows with their shared
prefixes counted once (a token-level prefix tree of each conversation's rows).

Then the training path itself, with data.prefix_sharing on and off: sft-prepare's stores (the same
tokenizer and template through `prepare`), SFTDataModule's packed rows of `--max-seq-len`, and one epoch
of its training batches, summing the tokens the model computes (`real_tokens`; with the batch padding
as well) against the trained tokens (the loss pairs).
"""

from __future__ import annotations

import argparse
import importlib.resources
import re
import tempfile
from pathlib import Path

import numpy as np

from sft.data.prefix_tree import tokens_computed
from sft.protocol.labels import IGNORE_INDEX
from sft.protocol.pipeline import Accounting, ConversationEncoder, read_conversations
from sft.protocol.templates import JinjaTemplate
from sft.protocol.tokenizer import train_bpe
from sft.protocol.types import Conversation, ProtocolConfig

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CONTROL = re.compile(r"<\|[A-Za-z_]+\|>")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="*", default=[str(SHARED / "reason_tool_use_demo_50.jsonl")])
    parser.add_argument("--template", default="qwen3", help="a stock template of the trl wheel")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--max-seq-len", type=int, default=4096, help="protocol.max_seq_len in training")
    parser.add_argument("--batch-size", type=int, default=8, help="data.batch_size in training")
    args = parser.parse_args()

    template_path = Path(str(importlib.resources.files("trl"))) / "chat_templates" / f"{args.template}.jinja"
    source = template_path.read_text()
    template = JinjaTemplate(source, eot="<|im_end|>", origin=args.template)
    template.special_tokens = sorted(set(template.special_tokens) | set(CONTROL.findall(source)))
    config = ProtocolConfig(max_seq_len=1 << 30, on_error="skip")
    conversations = [
        c for path in args.files for c in read_conversations(path) if isinstance(c, Conversation)
    ]
    untokenized = ConversationEncoder(
        None, template, ProtocolConfig(max_seq_len=1 << 30, special_in_content="allow")
    )
    texts = [
        row.rendered.text for index, c in enumerate(conversations) for row in untokenized.prepare(c, index)[1]
    ]
    tokenizer = train_bpe(texts, args.vocab_size, template.special_tokens)

    encoder = ConversationEncoder(tokenizer, template, config)
    accounting = Accounting()
    examples = list(encoder.encode_conversations(conversations, accounting))
    trained = sum(int(np.count_nonzero(e.labels != IGNORE_INDEX)) for e in examples)
    stored = sum(len(e.input_ids) for e in examples)
    by_conversation: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for example, conversation in zip(examples, _conversation_of(examples), strict=True):
        by_conversation.setdefault(conversation, []).append((example.input_ids, example.labels))
    shared = sum(tokens_computed(rows)[1] for rows in by_conversation.values())
    normalized = [encoder.prepare(c, index)[0] for index, c in enumerate(conversations)]
    one_row = sum(
        len(tokenizer.encode(template.render_text(c.messages, c.tools), add_special_tokens=False).ids)
        for c in normalized
    )
    print(accounting.summary())
    print(f"template {args.template}; {len(conversations)} conversations; {trained:,} trained tokens")
    print("| rows | tokens computed | per trained token |")
    print("|---|---:|---:|")
    for name, tokens in (
        ("one row per conversation (for scale)", one_row),
        ("one row per trained turn (stored)", stored),
        ("per-turn rows, shared prefixes once", shared),
    ):
        print(f"| {name} | {tokens:,} | {tokens / trained:.2f} |")
    with tempfile.TemporaryDirectory() as directory:
        tokenizer_path = Path(directory) / "tokenizer.json"
        tokenizer.save(str(tokenizer_path))
        print(f"\ntraining path: packed rows of protocol.max_seq_len={args.max_seq_len}, one epoch")
        print("| data.prefix_sharing | rows | trained tokens | tokens computed | per trained token "
              "| with batch padding |")  # fmt: skip
        print("|---|---:|---:|---:|---:|---:|")
        for sharing in (False, True):
            section = {"name": "jinja", "path": str(template_path), "eot": "<|im_end|>"}
            section["special_tokens"] = template.special_tokens
            rows, trained, computed, padded = training_batches_cost(
                args, {"name": "file", "path": str(tokenizer_path)}, section, Path(directory), sharing
            )
            cells = [str(sharing).lower(), f"{rows:,}", f"{trained:,}", f"{computed:,}"]
            print(f"| {' | '.join(cells)} | {computed / trained:.2f} | {padded / trained:.2f} |")


def training_batches_cost(
    args, tokenizer: dict, template: dict, cache_dir: Path, sharing: bool
) -> tuple[int, int, int, int]:
    """(packed rows, trained tokens, tokens computed, tokens with the batch padding) over one epoch of
    SFTDataModule's training batches."""
    from sft.cli.schemas import PrepareConfig
    from sft.config import load_config
    from sft.data.build import prepare
    from sft.data.datamodule import SFTDataModule

    config = load_config(
        {
            "tokenizer": tokenizer,
            "template": template,
            "protocol": {"max_seq_len": args.max_seq_len, "on_error": "skip"},
            "data": {
                "name": "jsonl",
                "train": list(args.files),
                "batch_size": args.batch_size,
                "prefix_sharing": sharing,
                "cache_dir": str(cache_dir / "cache"),
            },
        },
        PrepareConfig,
    )
    datamodule = SFTDataModule(config, prepare(config))
    trained = computed = padded = 0
    for batch in datamodule.train_dataloader():
        computed += int(batch["real_tokens"])
        padded += batch["input_ids"].numel()
        if "loss_targets" in batch:
            trained += len(batch["loss_targets"])
        else:
            trained += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return len(datamodule.train_dataset), trained, computed, padded


def _conversation_of(examples) -> list[str]:
    """Each example's conversation: rows of one conversation are consecutive, numbered (turn, of)."""
    names, count = [], 0
    for example in examples:
        if example.split is None or example.split[0] == 1:
            count += 1
        names.append(f"{example.where}#{count}")
    return names


if __name__ == "__main__":
    main()
