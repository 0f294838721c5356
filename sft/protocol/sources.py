"""Data entries → the files behind them → `RawRecord`s, streamed.

An entry of `data.train` / `data.val` is one of:
- a `.jsonl` / `.json` file (records.py reads it line by line);
- a `.parquet` file, a directory of them, or a glob (`data/*.parquet`), files in sorted order;
- a `datasets.save_to_disk` directory (its Arrow files, in the order `state.json` lists them);
- `hf://org/name`, `hf://org/name:split` or `hf://org/name/config:split` (split defaults to train): a
  dataset that `datasets.load_dataset` has put in the local cache, read from there and never downloaded.

Tables are read one record batch at a time (pyarrow), so memory stays flat whatever the size. Each row
becomes a record located as `file:row` (rows count from 1, like lines). Arrow gives every row every field
of the unified schema, so a message that never had `"thinking"` reads back with `"thinking": None`, which
templates see (`'thinking' in message`, `tools|tojson`): null fields are dropped, so a Parquet row is the
JSON line it was written from. pyarrow and datasets are optional (`pip install sft[data]`); JSON needs
neither.
"""

from __future__ import annotations

import dataclasses
import glob
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft.protocol.records import RawRecord, iter_raw_records

HF_PREFIX = "hf://"
ROWS_PER_BATCH = 1024  # rows converted to Python at a time: bounded memory, little per-batch overhead
RELEASE_EVERY = 16  # Parquet batches between handing Arrow's freed memory back
PARQUET_READ_BUFFER = 1 << 20  # bytes: a column chunk is streamed through this, not read whole
_GLOB_CHARS = set("*?[")
TABLE_SUFFIXES = (".parquet", ".arrow")


class SourceError(FileNotFoundError):
    """A data entry that names nothing readable; the message says what to fix or download."""


@dataclass(frozen=True)
class DataSource:
    """One data entry as written (`name`) and the files it reads, in record order."""

    name: str
    files: tuple[str, ...]

    @property
    def size_bytes(self) -> int:
        return sum(Path(file).stat().st_size for file in self.files)


def resolve_source(name: str) -> DataSource:
    """The files behind one data entry; SourceError when there are none or they cannot be read here."""
    source = DataSource(name, tuple(_entry_files(name)))
    if any(Path(file).suffix in TABLE_SUFFIXES for file in source.files):
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise SourceError(f"{name}: reading Parquet / Arrow needs `pip install sft[data]`") from None
    return source


def _entry_files(name: str) -> list[str]:
    if name.startswith(HF_PREFIX):
        return _hf_cache_files(name)
    if _GLOB_CHARS & set(name):
        files = sorted(glob.glob(name, recursive=True))
        if not files:
            raise SourceError(f"data file not found: no file matches {name}")
        return files
    path = Path(name)
    if path.is_file():
        return [name]
    if path.is_dir():
        return _directory_files(path)
    if path.exists():
        raise ValueError(f"{name} is not a regular file")
    raise SourceError(f"data file not found: {name}")


def _directory_files(path: Path) -> list[str]:
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
        raise SourceError(
            f"{path} holds a DatasetDict: name one split's folder, e.g. {path / (splits or ['train'])[0]}"
        )
    if (path / "state.json").is_file():  # datasets.Dataset.save_to_disk
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        return [str(path / entry["filename"]) for entry in state["_data_files"]]
    files = sorted(str(file) for file in path.rglob("*.parquet"))
    if not files:
        raise ValueError(
            f"{path} is a directory, not a data file: list the files in it (e.g. [{path / 'part1.jsonl'}]), "
            "or give a folder of .parquet files or a datasets.save_to_disk folder"
        )
    return files


def parse_hf_name(name: str) -> tuple[str, str | None, str]:
    """`hf://org/name/config:split` → (repo id, config or None, split); split defaults to train."""
    body = name.removeprefix(HF_PREFIX)
    body, _, split = body.partition(":")
    parts = body.strip("/").split("/")
    if not 1 <= len(parts) <= 3 or not all(parts):
        raise SourceError(
            f"{name}: expected hf://org/name, hf://org/name:split or hf://org/name/config:split"
        )
    config = parts[2] if len(parts) == 3 else None
    return "/".join(parts[:2]), config, split or "train"


def _hf_cache_files(name: str) -> list[str]:
    """The Arrow files of a cached split, found the way `load_dataset` finds them offline (the cache
    builder of `datasets`, reading `HF_DATASETS_CACHE`), so nothing is ever downloaded."""
    repo_id, config, split = parse_hf_name(name)
    try:
        import datasets
        from datasets.packaged_modules.cache.cache import Cache
    except ImportError:
        raise SourceError(f"{name}: reading hf:// datasets needs `pip install sft[data]`") from None
    load_call = f"datasets.load_dataset({repo_id!r}{f', {config!r}' if config else ''}, split={split!r})"
    try:
        builder = Cache(
            repo_id=repo_id,
            dataset_name=repo_id.split("/")[-1],
            config_name=config,
            version="auto",
            hash="auto",
        )
        dataset = builder.as_dataset(split=split)
    except (ValueError, FileNotFoundError, KeyError) as error:
        raise SourceError(
            f"{name} is not in the local datasets cache ({datasets.config.HF_DATASETS_CACHE}): {error}\n"
            f'Download it once where the Hub is reachable: python -c "import datasets; {load_call}" '
            "(set HF_DATASETS_CACHE to the same folder)"
        ) from None
    return [entry["filename"] for entry in dataset.cache_files]


def read_records(source: str | DataSource, columns: Mapping[str, str] | None = None) -> Iterator[RawRecord]:
    """Every record of a data entry, in order; `columns` renames fields ({"messages": "conversation"}:
    the record's "conversation" is read as its "messages")."""
    if isinstance(source, str):
        source = resolve_source(source)
    for file in source.files:
        for record in _file_records(file):
            yield _renamed(record, columns) if columns and record.data is not None else record


def _file_records(file: str) -> Iterator[RawRecord]:
    suffix = Path(file).suffix
    if suffix == ".parquet":
        yield from _table_records(file, _parquet_batches(file))
    elif suffix == ".arrow":
        yield from _table_records(file, _arrow_batches(file))
    else:
        yield from iter_raw_records(file)


def _parquet_batches(file: str) -> Iterator[Any]:
    import pyarrow.parquet as pq

    with pq.ParquetFile(file, buffer_size=PARQUET_READ_BUFFER, pre_buffer=False) as table:
        # ROWS_PER_BATCH rows decoded at a time, their pages read through a small buffer, even inside a row
        # group: a file written as one row group of a million rows (as pandas and pyarrow do by default)
        # is never read or decoded whole.
        batches = table.iter_batches(batch_size=ROWS_PER_BATCH, use_threads=False)
        for number, batch in enumerate(batches, start=1):
            yield batch
            if number % RELEASE_EVERY == 0:
                _release_freed_arrow_memory()
    _release_freed_arrow_memory()  # and at the end of each file (a shard may hold fewer batches)


def _release_freed_arrow_memory() -> None:
    """Arrow's allocator (mimalloc) keeps the memory of freed batches, more the more rows are read: the
    BPE pass over 1M rows left the process +108 MB (300k: +49 MB); handed back every RELEASE_EVERY
    batches, ~+50 MB at both (scripts/bench_memory.py --format parquet)."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()


def _arrow_batches(file: str) -> Iterator[Any]:
    """An Arrow IPC stream (what datasets writes) or IPC file, one record batch at a time."""
    import pyarrow as pa

    with open(file, "rb") as handle:
        is_ipc_file = handle.read(6) == b"ARROW1"
    with pa.OSFile(file) as handle:
        if is_ipc_file:
            reader = pa.ipc.open_file(handle)
            for index in range(reader.num_record_batches):
                yield from _slices(reader.get_batch(index))
        else:
            for batch in pa.ipc.open_stream(handle):
                yield from _slices(batch)


def _slices(batch: Any) -> Iterator[Any]:
    for start in range(0, batch.num_rows, ROWS_PER_BATCH):
        yield batch.slice(start, ROWS_PER_BATCH)


def _table_records(file: str, batches: Iterator[Any]) -> Iterator[RawRecord]:
    row = 0
    for batch in batches:
        for value in batch.to_pylist():
            row += 1
            yield RawRecord(file, row, data=without_nulls(value))


def without_nulls(value: Any) -> Any:
    """`value` with every null object field removed, at any depth (list items are kept as they are)."""
    if isinstance(value, dict):
        return {key: without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [without_nulls(item) for item in value]
    return value


def _renamed(record: RawRecord, columns: Mapping[str, str]) -> RawRecord:
    data = dict(record.data)
    for field, column in columns.items():
        if column in data:
            data[field] = data.pop(column)
    return dataclasses.replace(record, data=data)
