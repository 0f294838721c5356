"""The `data` section (conf/data/): which conversations, how they are mixed, held out and batched."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sft.protocol.records import FORMATS


@dataclass
class DataConfig:
    """`sample`: the embedded generated conversations (sft/data/sample.py); `jsonl`: your files."""

    name: Literal["sample", "jsonl"] = "sample"
    train: list[str] | str | None = None  # jsonl: the training entries (files, Parquet, hf://: sources.py)
    val: list[str] | str | None = None  # jsonl: held-out entries; otherwise val_fraction of train
    columns: dict[str, str] | None = None  # field <- column renames, e.g. {messages: conversation}
    num_train: int = 6000  # sample: conversations generated for training
    num_val: int = 200  # sample: held-out conversations
    format: str = "auto"  # auto | messages | sharegpt | alpaca | prompt_completion
    mix: list[float] | None = None  # per-train-file weights (sampling with replacement)
    val_fraction: float = 0.0
    batch_size: int = 8  # rows per device per micro-batch
    packing: bool = True
    prefix_sharing: bool = True  # a split conversation's rows as one prefix tree (exact; sft.data.units)
    num_workers: int = 0
    cache_dir: str = ".cache/sft"
    prepare_per_node: bool = True  # ranks started together split each node's entries; False: the job's

    def __post_init__(self) -> None:
        problems = []
        if self.name == "jsonl" and not self.train:
            problems.append("data.train is not set: give a list of files, e.g. data.train=[a.jsonl,b.jsonl]")
        if self.format not in ("auto", *FORMATS):
            problems.append(f"data.format={self.format!r}: expected one of auto, {', '.join(FORMATS)}")
        for key, low in (("batch_size", 1), ("num_train", 1), ("num_val", 0), ("num_workers", 0)):
            if getattr(self, key) < low:
                problems.append(f"data.{key}={getattr(self, key)}: expected >= {low}")
        if not 0.0 <= self.val_fraction < 1.0:
            problems.append(f"data.val_fraction={self.val_fraction}: expected 0 <= val_fraction < 1")
        if self.mix is not None:
            if any(weight < 0 for weight in self.mix) or sum(self.mix) <= 0:
                problems.append(f"data.mix={self.mix}: expected non-negative weights with a positive sum")
            elif self.name == "jsonl" and self.train is not None and len(self.mix) != len(self.train_files):
                problems.append(
                    f"data.mix has {len(self.mix)} weights for {len(self.train_files)} data.train files: "
                    "give one weight per file"
                )
        if problems:
            raise ValueError("\n".join(problems))

    @property
    def train_files(self) -> list[str]:
        return as_list(self.train)

    @property
    def val_files(self) -> list[str]:
        return as_list(self.val)


def as_list(files: list[str] | str | None) -> list[str]:
    if files is None:
        return []
    return [files] if isinstance(files, str) else list(files)
