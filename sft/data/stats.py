"""Dataset statistics of prepared stores: what `sft-inspect` prints and writes as JSON.

Computed from the stores' manifests and length arrays (numpy, no torch), so it costs a few milliseconds
even for a million examples; the packing figure is the one training will see: with `data.prefix_sharing`
a split conversation is packed as its prefix tree (sft.data.units), whose node count is read from its
rows' tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sft.data.build import store_accounting
from sft.data.packing import best_fit_decreasing, packing_efficiency
from sft.data.store import TokenStore
from sft.data.units import packing_units
from sft.protocol.pipeline import Accounting

HISTOGRAM_BINS = 10
BAR_WIDTH = 40


@dataclass
class DatasetStats:
    examples: int
    tokens: int
    trained_tokens: int
    lengths: dict[str, float]  # min, mean, median, p95, max tokens per example
    histogram: list[tuple[int, int, int]]  # (first length, last length, examples) per bin
    max_seq_len: int
    packed_rows: int
    packing_efficiency: float  # real tokens (a tree's nodes, what is computed) / (packed rows × max_seq_len)
    accounting: Accounting  # of the files behind these stores

    @property
    def trained_fraction(self) -> float:
        return self.trained_tokens / self.tokens if self.tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The JSON form; `skipped` and `dropped` carry a total and the count per reason."""
        return {
            "examples": self.examples,
            "tokens": self.tokens,
            "trained_tokens": self.trained_tokens,
            "trained_fraction": self.trained_fraction,
            "lengths": self.lengths,
            "length_histogram": [
                {"from": low, "to": high, "count": count} for low, high, count in self.histogram
            ],
            "max_seq_len": self.max_seq_len,
            "packed_rows": self.packed_rows,
            "packing_efficiency": self.packing_efficiency,
            "read": self.accounting.read,
            "kept": self.accounting.kept,
            "truncated": self.accounting.truncated,
            "skipped": _outcome(self.accounting.skipped),
            "dropped": _outcome(self.accounting.dropped),
        }


def _outcome(counter: dict[str, int]) -> dict[str, Any]:
    return {"total": sum(counter.values()), "by_reason": dict(sorted(counter.items()))}


def length_histogram(lengths: np.ndarray, bins: int = HISTOGRAM_BINS) -> list[tuple[int, int, int]]:
    """Equal-width integer bins spanning the observed lengths (not 0..max_seq_len, where short chat data
    would all fall into the first bin)."""
    if len(lengths) == 0:
        return []
    shortest, longest = int(lengths.min()), int(lengths.max())
    width = max(1, math.ceil((longest - shortest + 1) / bins))
    counts = np.bincount((lengths - shortest) // width)
    return [(shortest + i * width, shortest + (i + 1) * width - 1, int(c)) for i, c in enumerate(counts)]


def dataset_stats(
    stores: Sequence[TokenStore], max_seq_len: int, prefix_sharing: bool = True
) -> DatasetStats:
    """Counts, length distribution and best-fit-decreasing packing at `max_seq_len` over all `stores`,
    of the packing units training forms (`prefix_sharing` as `data.prefix_sharing`)."""
    lengths = np.concatenate([store.lengths for store in stores]) if stores else np.zeros(0, np.int64)
    # A conversation's rows are in one store: its units per store are its units over all stores.
    unit_lengths = (
        np.concatenate(
            [
                packing_units(store, np.arange(len(store)), max_seq_len, prefix_sharing).lengths
                for store in stores
            ]
        )
        if stores
        else np.zeros(0, np.int64)
    )
    bins = best_fit_decreasing(unit_lengths, max_seq_len)
    accounting = Accounting()
    for store in stores:
        accounting.merge(store_accounting(store))
    summary = (
        {
            "min": int(lengths.min()),
            "mean": float(lengths.mean()),
            "median": float(np.median(lengths)),
            "p95": float(np.percentile(lengths, 95)),
            "max": int(lengths.max()),
        }
        if len(lengths)
        else {}
    )
    return DatasetStats(
        examples=len(lengths),
        tokens=sum(store.manifest["counts"]["tokens"] for store in stores),
        trained_tokens=sum(store.manifest["counts"]["trained_tokens"] for store in stores),
        lengths=summary,
        histogram=length_histogram(lengths),
        max_seq_len=max_seq_len,
        packed_rows=len(bins),
        packing_efficiency=packing_efficiency(unit_lengths, bins, max_seq_len),
        accounting=accounting,
    )


def describe(stats: DatasetStats) -> list[str]:
    """The statistics as plain text lines (terminal and HTML show the same), histogram as text bars."""
    lines = [
        f"examples        {stats.examples:,}",
        f"tokens          {stats.tokens:,}",
        f"trained tokens  {stats.trained_tokens:,} ({stats.trained_fraction:.1%})",
    ]
    if stats.lengths:
        lengths = stats.lengths
        lines.append(
            f"length          min {lengths['min']} · mean {lengths['mean']:.1f} · "
            f"median {lengths['median']:.0f} · p95 {lengths['p95']:.0f} · max {lengths['max']}"
        )
    lines.append(
        f"packing         {stats.packing_efficiency:.1%} of {stats.packed_rows:,} rows × {stats.max_seq_len} "
        "tokens are real tokens (best-fit decreasing)"
    )
    peak = max((count for _, _, count in stats.histogram), default=0)
    label_width = len(str(stats.histogram[-1][1])) if stats.histogram else 0
    for low, high, count in stats.histogram:
        bar = _bar(count / peak * BAR_WIDTH if peak else 0.0)
        lines.append(f"  {low:>{label_width}}–{high:<{label_width}} {bar:<{BAR_WIDTH}} {count:,}")
    lines.extend(stats.accounting.summary().splitlines())
    return lines


def _bar(cells: float) -> str:
    """A bar of `cells` character cells, with eighth-cell resolution so small counts stay visible."""
    eighths = round(cells * 8)
    if eighths == 0 and cells > 0:
        eighths = 1
    partial = " ▏▎▍▌▋▊▉"[eighths % 8].strip()
    return "█" * (eighths // 8) + partial
