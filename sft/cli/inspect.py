"""sft-inspect: see exactly which tokens train. Prepares (cached) like training, then shows N examples
with the mask and token boundaries, and the dataset statistics.

    sft-inspect data=jsonl data.train=[chats.jsonl] n=5 split=train html=view.html stats=stats.json

In a colour terminal trained tokens are bold green, untrained ones dim, token boundaries alternate the
background and control tokens have their own. Without colour (a pipe, NO_COLOR=1) trained runs are
wrapped in ⟦…⟧ and tokens separated by │. Never imports torch or lightning, so it starts fast.
"""

from __future__ import annotations

import html
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from rich.console import Console
from rich.text import Text
from tokenizers import Tokenizer

from sft.cli.entry import run_cli
from sft.cli.schemas import InspectConfig
from sft.data.build import prepare
from sft.data.stats import DatasetStats, dataset_stats, describe
from sft.data.store import TokenStore
from sft.protocol.labels import IGNORE_INDEX
from sft.protocol.pipeline import DataError
from sft.protocol.types import TemplateError

TRAINED_OPEN, TRAINED_CLOSE, BOUNDARY = "⟦", "⟧", "│"
NEWLINE = "↵\n"  # a visible mark, then the real line break


@dataclass
class Token:
    id: int
    text: str  # as decoded in context; "" for a token that only starts a multi-byte character
    trained: bool
    special: bool


@dataclass
class Example:
    title: str
    tokens: list[Token]


def token_texts(tokenizer: Tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token's share of the decoded text. Decoding in a short sliding window (as streaming
    detokenizers do) keeps characters split across byte-level tokens whole, on the token completing them,
    and respects decoders that join tokens (leading spaces, byte fallback)."""
    texts = []
    prefix = read = 0  # ids[prefix:read] is context already shown
    for end in range(1, len(ids) + 1):
        shown = tokenizer.decode(ids[prefix:read], skip_special_tokens=False)
        decoded = tokenizer.decode(ids[prefix:end], skip_special_tokens=False)
        if decoded.endswith("\ufffd") and end < len(ids):
            texts.append("")  # an incomplete character: wait for the token that completes it
            continue
        texts.append(decoded[len(shown) :])
        prefix, read = read, end
    return texts


def load_examples(tokenizer: Tokenizer, stores: Sequence[TokenStore], count: int) -> list[Example]:
    """The first `count` examples of the split, in input order, as tokens with their mask."""
    special_ids = {
        token_id for token_id, added in tokenizer.get_added_tokens_decoder().items() if added.special
    }
    examples: list[Example] = []
    for store in stores:
        split_rows = {row: (turn, of) for row, turn, of in store.manifest.get("split_rows", [])}
        for index in range(min(len(store), count - len(examples))):
            ids, labels = store[index]
            id_list = ids.tolist()
            trained = (labels != IGNORE_INDEX).tolist()
            tokens = [
                Token(token_id, text, is_trained, token_id in special_ids)
                for token_id, text, is_trained in zip(
                    id_list, token_texts(tokenizer, id_list), trained, strict=True
                )
            ]
            title = (
                f"example {index} of {store.source} · {len(tokens)} tokens, "
                f"{int(np.count_nonzero(trained))} trained"
            )
            if index in split_rows:
                turn, of = split_rows[index]
                title += f" · turn {turn} of {of} of a split conversation (each as inference renders it)"
            examples.append(Example(title, tokens))
    return examples


# ---- terminal ----------------------------------------------------------------------------------------


def terminal_text(example: Example, colour: bool) -> Text:
    """Colour: style carries mask and boundaries. Plain: ⟦…⟧ around trained runs, │ between tokens."""
    text = Text()
    previous: Token | None = None
    for position, token in enumerate(example.tokens):
        shown = token.text.replace("\n", NEWLINE)
        if colour:
            background = "on purple4" if token.special else ("on grey15" if position % 2 else "on grey27")
            text.append(shown, style=("bold green " if token.trained else "dim ") + background)
            continue
        opens = token.trained and not (previous and previous.trained)
        closes = previous is not None and previous.trained and not token.trained
        if closes:
            text.append(TRAINED_CLOSE)
        if previous is not None and not (opens or closes or previous.text.endswith("\n")):
            text.append(BOUNDARY)
        if opens:
            text.append(TRAINED_OPEN)
        text.append(shown)
        previous = token
    if previous is not None and previous.trained:
        text.append(TRAINED_CLOSE)
    return text


def print_view(console: Console, examples: list[Example], stats: DatasetStats, split: str) -> None:
    colour = console.color_system is not None and not console.no_color
    legend = (
        "trained tokens bold green, untrained dim; backgrounds alternate per token, purple = control token"
        if colour
        else f"{TRAINED_OPEN}trained tokens{TRAINED_CLOSE}, {BOUNDARY} between tokens, ↵ newline"
    )
    console.print(Text(legend, style="italic"), soft_wrap=True)
    for example in examples:
        console.print(Text("\n" + example.title, style="bold"), soft_wrap=True)
        console.print(terminal_text(example, colour), soft_wrap=True)
    console.print(Text(f"\nstatistics · {split}", style="bold"), soft_wrap=True)
    for line in describe(stats):
        console.print(Text(line), soft_wrap=True)


# ---- HTML --------------------------------------------------------------------------------------------

PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
.tokens, pre { font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.6; }
.tokens { border: 1px solid #ccc; padding: 0.8em; }
.t { border-radius: 2px; }
.t.a { background: #eef0f3; } .t.b { background: #dde1e7; }
.t.trained { color: #0a6b1f; font-weight: bold; } .t.a.trained { background: #d7f5dc; }
.t.b.trained { background: #bdecc6; }
.t:not(.trained) { color: #777; }
.t.special { background: #e8d7f7; outline: 1px solid #a070c8; }
.legend span { padding: 0 0.3em; }
"""


def html_page(examples: list[Example], stats: DatasetStats, split: str) -> str:
    """One self-contained page (inline CSS, no scripts or external assets); hover a token for its id."""
    sections = []
    for example in examples:
        spans = "".join(
            f'<span class="t {"ab"[position % 2]}{" trained" if token.trained else ""}'
            f'{" special" if token.special else ""}" title="#{position} id {token.id}">'
            f"{html.escape(token.text.replace(chr(10), NEWLINE))}</span>"
            for position, token in enumerate(example.tokens)
        )
        sections.append(f'<h2>{html.escape(example.title)}</h2>\n<div class="tokens">{spans}</div>')
    legend = (
        '<p class="legend"><span class="t a trained">trained</span> <span class="t a">not trained</span> '
        '<span class="t special">control token</span> · backgrounds alternate per token · ↵ newline</p>'
    )
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>sft-inspect</title>'
        f"<style>{PAGE_STYLE}</style></head>\n<body>\n<h1>sft-inspect · {html.escape(split)}</h1>\n{legend}\n"
        + "\n".join(sections)
        + f"\n<h2>statistics</h2>\n<pre>{html.escape(chr(10).join(describe(stats)))}</pre>\n</body></html>\n"
    )


# ---- main --------------------------------------------------------------------------------------------


def run(config: InspectConfig, cfg: DictConfig) -> None:
    split = config.split
    try:
        prepared = prepare(config)
    except (DataError, TemplateError, FileNotFoundError, ValueError) as error:
        sys.exit(f"sft-inspect: {error}")
    stores = prepared.train if split == "train" else prepared.val
    if not stores:
        sys.exit(
            "sft-inspect: no data.val files (data.val_fraction holds examples out of train at training time)"
        )
    stats = dataset_stats(stores, config.protocol.max_seq_len, config.data.prefix_sharing)
    examples = load_examples(prepared.tokenizer, stores, config.n)
    print_view(Console(), examples, stats, split)
    if config.html:
        Path(config.html).write_text(html_page(examples, stats, split), encoding="utf-8")
        print(f"wrote {config.html}")
    if config.stats:
        Path(config.stats).write_text(json.dumps({"split": split, **stats.to_dict()}, indent=2) + "\n")
        print(f"wrote {config.stats}")


def main() -> None:
    run_cli("sft-inspect", "inspect", InspectConfig, run)


if __name__ == "__main__":
    main()
