"""The account of every line read: kept, skipped (bad input, with reason) or dropped (valid but unusable),
plus the rows written and the conversations split into per-turn rows. The counts add up to `read`."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

EXAMPLES_PER_REASON = 5  # locations remembered per skip/drop reason for the summary


@dataclass
class Accounting:
    """Every line read is kept, skipped (bad input or a blank line, with reason) or dropped (valid but
    unusable). `noted` counts remarks on lines that do not change their outcome (duplicate JSON keys)."""

    read: int = 0
    kept: int = 0
    truncated: int = 0  # kept, but cut to max_seq_len
    truncated_tokens: int = 0  # tokens those kept examples lost
    longest: int = 0  # tokens of the longest example before any cut: the max_seq_len that keeps all whole
    rows: int = 0  # examples written (a split conversation gives several)
    split: int = 0  # conversations written as one row per trained turn (see protocol.turns)
    split_rows: int = 0  # the rows those gave
    skipped: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    where: dict[str, list[str]] = field(default_factory=dict)
    noted: Counter = field(default_factory=Counter)

    def note(self, kind: Counter, reason: str, where: str) -> None:
        kind[reason] += 1
        places = self.where.setdefault(reason, [])
        if len(places) < EXAMPLES_PER_REASON:
            places.append(where)

    def merge(self, other: Accounting) -> None:
        self.read += other.read
        self.kept += other.kept
        self.truncated += other.truncated
        self.truncated_tokens += other.truncated_tokens
        self.longest = max(self.longest, other.longest)
        self.rows += other.rows
        self.split += other.split
        self.split_rows += other.split_rows
        self.skipped.update(other.skipped)
        self.dropped.update(other.dropped)
        self.noted.update(other.noted)
        for reason, places in other.where.items():
            mine = self.where.setdefault(reason, [])
            mine.extend(places[: EXAMPLES_PER_REASON - len(mine)])

    def to_dict(self) -> dict:
        return {
            "read": self.read,
            "kept": self.kept,
            "truncated": self.truncated,
            "truncated_tokens": self.truncated_tokens,
            "longest": self.longest,
            "rows": self.rows,
            "split": self.split,
            "split_rows": self.split_rows,
            "skipped": dict(self.skipped),
            "dropped": dict(self.dropped),
            "noted": dict(self.noted),
            "where": self.where,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Accounting:
        return cls(
            read=data["read"],
            kept=data["kept"],
            truncated=data["truncated"],
            truncated_tokens=data["truncated_tokens"],
            longest=data["longest"],
            rows=data["rows"],
            split=data["split"],
            split_rows=data["split_rows"],
            skipped=Counter(data["skipped"]),
            dropped=Counter(data["dropped"]),
            where={k: list(v) for k, v in data["where"].items()},
            noted=Counter(data.get("noted", {})),
        )

    def relative_to(self, source: str) -> Accounting:
        """A copy whose places drop the file name `source` (":4", " record 3"): what a store keeps, since
        the store is shared by every file with the same bytes, whatever it is called."""
        return self._replace_places(
            lambda place: place[len(source) :] if _is_relative(place.removeprefix(source)) else place
        )

    def located_in(self, source: str) -> Accounting:
        """The inverse of `relative_to`: places under the name this run gave the file. A place in one of
        an entry's several files (a Parquet folder, an hf:// split) keeps its file's path."""
        return self._replace_places(lambda place: source + place if _is_relative(place) else place)

    def _replace_places(self, change) -> Accounting:
        copy = Accounting.from_dict(self.to_dict())
        copy.where = {reason: [change(place) for place in places] for reason, places in self.where.items()}
        return copy

    def summary(self) -> str:
        """One line per outcome; the counts add up to `read`."""
        lines = [
            f"read {self.read} = kept {self.kept} + skipped {sum(self.skipped.values())} "
            f"+ dropped {sum(self.dropped.values())}"
        ]
        if self.truncated:
            lines.append(
                f"  truncated {self.truncated} kept to protocol.max_seq_len: {self.truncated_tokens:,} "
                f"tokens cut (the longest example has {self.longest:,}; protocol.max_seq_len={self.longest} "
                "keeps every example whole)"
            )
        if self.split:
            lines.append(
                f"  split {self.split} conversations into {self.split_rows} rows, one per trained turn (the "
                "template renders history differently from a final turn)"
            )
        for title, counter in (("skipped", self.skipped), ("dropped", self.dropped), ("noted", self.noted)):
            for reason, count in sorted(counter.items()):
                lines.append(f"  {title} {count} {reason}: {', '.join(self.where.get(reason, []))}")
        return "\n".join(lines)


def _is_relative(place: str) -> bool:
    return place.startswith((":", " record"))
