"""sft-eval's reports: the JSON file and a self-contained HTML page (no scripts, no external files).

A report holds one summary per checkpoint (`checkpoints`: ckpt, data, metrics, accounting) and the items:
prompt, reference and one generation (text, stopped, scores) per checkpoint, side by side. Every piece of
text on the page is HTML-escaped: prompts and generations are data, never markup.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict
from html import escape
from typing import Any

from sft.atomic import atomic_file
from sft.generation_eval import Generation, GenerationItem


def report_items(
    items: Sequence[GenerationItem], generations_per_checkpoint: Sequence[Sequence[Generation]]
) -> list[dict[str, Any]]:
    """One entry per item with each checkpoint's generation, in checkpoint order."""
    return [
        {
            "where": item.where,
            "turn": item.turn,
            "prompt": item.prompt,
            "reference": item.reference,
            "generations": [asdict(generations[index]) for generations in generations_per_checkpoint],
        }
        for index, item in enumerate(items)
    ]


def write_json(report: dict[str, Any], path: str | os.PathLike) -> None:
    with atomic_file(path, encoding="utf-8") as handle:
        handle.write(json.dumps(report, indent=2, ensure_ascii=False) + "\n")


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; }
table { border-collapse: collapse; margin-bottom: 1.5rem; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.5rem; vertical-align: top; text-align: left; }
pre { white-space: pre-wrap; word-break: break-word; margin: 0; max-width: 40rem; }
.miss { background: #fdecea; } .hit { background: #e8f5e9; } .where { font-size: 0.8rem; color: #555; }
"""


def _pre(text: str) -> str:
    return f"<pre>{escape(text)}</pre>"


def _scores(scores: dict[str, float]) -> str:
    return "<br>".join(f"{escape(name)}: {value:.3f}" for name, value in scores.items())


def render_html(report: dict[str, Any]) -> str:
    checkpoints = report["checkpoints"]
    names = [escape(str(summary["ckpt"])) for summary in checkpoints]
    metric_names = sorted({name for summary in checkpoints for name in summary["metrics"]})
    lines = [
        "<!doctype html>",
        '<html><head><meta charset="utf-8"><title>sft-eval</title>',
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>sft-eval on {escape(str(checkpoints[0]['data']))}</h1>",
        "<table><tr><th>metric</th>" + "".join(f"<th>{name}</th>" for name in names) + "</tr>",
    ]
    for metric in metric_names:
        values = [summary["metrics"].get(metric) for summary in checkpoints]
        cells = "".join(f"<td>{'' if v is None else escape(f'{v:.4f}')}</td>" for v in values)
        lines.append(f"<tr><td>{escape(metric)}</td>{cells}</tr>")
    lines += [
        "</table>",
        "<table><tr><th>#</th><th>prompt</th><th>reference</th>"
        + "".join(f"<th>generation: {name}</th><th>scores</th>" for name in names)
        + "</tr>",
    ]
    for number, item in enumerate(report["items"], start=1):
        cells = [
            f"<td>{number}<div class='where'>{escape(item['where'])} turn {item['turn']}</div></td>",
            f"<td>{_pre(item['prompt'])}</td>",
            f"<td>{_pre(item['reference'])}</td>",
        ]
        for generation in item["generations"]:
            outcome = "hit" if generation["scores"].get("exact_match") else "miss"
            cut = "" if generation["stopped"] else "<div class='where'>(no end-of-turn: cut)</div>"
            cells.append(f"<td class='{outcome}'>{_pre(generation['text'])}{cut}</td>")
            cells.append(f"<td>{_scores(generation['scores'])}</td>")
        lines.append("<tr>" + "".join(cells) + "</tr>")
    lines.append("</table></body></html>")
    return "\n".join(lines) + "\n"


def write_html(report: dict[str, Any], path: str | os.PathLike) -> None:
    with atomic_file(path, encoding="utf-8") as handle:
        handle.write(render_html(report))
