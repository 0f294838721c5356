"""The tokenized store: flat memory-mapped arrays on disk, written atomically, keyed by content.

Layout (like Megatron's indexed dataset or nanoGPT's .bin files), one directory per store:

    input_ids.bin   token ids of all examples back to back (uint16 when the vocabulary fits, else uint32)
    trained.bin     uint8, 1 where the token is trained: labels = ids where trained else -100
    offsets.npy     int64, examples + 1 boundaries: example i is [offsets[i], offsets[i + 1])
    conversations.npy  int64 per example: its conversation's number in the store; the per-turn rows of a
                    split conversation are consecutive and share it (training packs them as a prefix tree)
    records.npy     int64 per example: its conversation's index in the entry's input (every record read
                    counts, kept or not: the index the system-prompt draw was seeded with), so a held-out
                    conversation is found again in its file without encoding the file again
    manifest.json   format, dtype, counts, plus the caller's fields (cache key, accounting, versions)

A store directory exists only once it is complete: it is written under a temporary sibling name and renamed
into place, so a killed preparation never leaves a directory that a later run would trust.
No torch here: `sft-prepare` writes stores without importing it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import socket
from array import array
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from sft.atomic import publish, sync_directory, sync_file
from sft.protocol.labels import IGNORE_INDEX

FORMAT_VERSION = 3  # part of every store's cache key: a new layout never reuses an old store
MANIFEST = "manifest.json"
IDS_FILE = "input_ids.bin"
TRAINED_FILE = "trained.bin"
OFFSETS_FILE = "offsets.npy"
CONVERSATIONS_FILE = "conversations.npy"
RECORDS_FILE = "records.npy"
# Python's own buffering of each array file: appends of one example turn into large sequential writes.
WRITE_BUFFER_BYTES = 1 << 20


class StoreError(RuntimeError):
    """A store directory that cannot be trusted or written."""


def token_dtype(vocab_size: int | None) -> np.dtype:
    """uint16 halves the store when every id fits in it; uint32 otherwise (or when the size is unknown)."""
    return np.dtype(np.uint16 if vocab_size is not None and vocab_size <= 1 << 16 else np.uint32)


class StoreWriter:
    """Streams examples into a new store; on success the directory appears at `final_dir` in one rename.

        with StoreWriter(cache_dir / key, vocab_size=tokenizer.get_vocab_size()) as writer:
            for ids, labels, first_row_of_conversation in examples:
                writer.add(ids, labels, new_conversation=first_row_of_conversation)
            writer.close({"cache_key": key, "accounting": counts, "versions": versions})

    An exception escaping the block removes the temporary directory. If `final_dir` already exists when we
    finish (another rank or process won the race), that store is kept and ours discarded: same key, same data.
    """

    def __init__(self, final_dir: str | os.PathLike[str], vocab_size: int | None = None) -> None:
        self.final_dir = Path(final_dir)
        self.dtype = token_dtype(vocab_size)
        self.tmp_dir = self.final_dir.with_name(
            f"{self.final_dir.name}.tmp-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        )
        # Offsets are 8 bytes per example in a compact array; ids and labels go straight to the files.
        self._offsets = array("q", [0])
        self._conversations = array("q")
        self._records = array("q")
        self._trained_tokens = 0
        self._files: list[Any] = []
        self._closed = False

    def __enter__(self) -> StoreWriter:
        self.final_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir()
        self._ids_file = open(self.tmp_dir / IDS_FILE, "wb", buffering=WRITE_BUFFER_BYTES)
        self._trained_file = open(self.tmp_dir / TRAINED_FILE, "wb", buffering=WRITE_BUFFER_BYTES)
        self._files = [self._ids_file, self._trained_file]
        return self

    def add(
        self,
        input_ids: np.ndarray,
        labels: np.ndarray,
        new_conversation: bool = True,
        record: int | None = None,
    ) -> None:
        """Append one example; `labels` must be `input_ids` where trained and IGNORE_INDEX elsewhere.
        `new_conversation=False` marks a further row of the previous example's conversation (a split row).
        `record`: its conversation's index in the input (None: its number in the store, as if every record
        read was kept)."""
        ids = np.asarray(input_ids)
        label_array = np.asarray(labels)
        if ids.ndim != 1 or ids.shape != label_array.shape:
            raise ValueError(f"input_ids {ids.shape} and labels {label_array.shape} must be equal-length 1-D")
        # count_nonzero rather than any(): per-call overhead matters at a million examples.
        trained = label_array != IGNORE_INDEX
        if np.count_nonzero((label_array != ids) & trained):
            raise ValueError("labels must equal input_ids where trained: the store keeps only a trained mask")
        stored_ids = ids.astype(self.dtype)
        if np.count_nonzero(stored_ids != ids):  # a negative or too large id wraps around in the cast
            limit = np.iinfo(self.dtype).max
            raise ValueError(f"token ids must lie in [0, {limit}] for a {self.dtype} store")
        self._ids_file.write(stored_ids.tobytes())
        self._trained_file.write(trained.view(np.uint8).tobytes())
        self._offsets.append(self._offsets[-1] + len(ids))
        previous = self._conversations[-1] if self._conversations else -1
        self._conversations.append(previous + 1 if new_conversation or previous < 0 else previous)
        self._records.append(self._conversations[-1] if record is None else record)
        self._trained_tokens += int(np.count_nonzero(trained))

    def close(self, manifest_extra: Mapping[str, Any] | None = None) -> Path:
        """Write offsets and manifest, make everything durable, rename into place; returns `final_dir`."""
        if self._closed:
            return self.final_dir
        self._closed = True
        manifest = {
            "format": FORMAT_VERSION,
            "dtype": self.dtype.name,
            "counts": {
                "examples": len(self._offsets) - 1,
                "tokens": self._offsets[-1],
                "trained_tokens": self._trained_tokens,
            },
        }
        clashes = manifest.keys() & dict(manifest_extra or {}).keys()
        if clashes:
            raise ValueError(f"manifest_extra may not override {sorted(clashes)}")
        manifest.update(manifest_extra or {})
        try:
            for file in self._files:
                sync_file(file)
                file.close()
            with open(self.tmp_dir / OFFSETS_FILE, "wb") as file:
                np.save(file, np.frombuffer(self._offsets, dtype=np.int64))
                sync_file(file)
            for name, values in ((CONVERSATIONS_FILE, self._conversations), (RECORDS_FILE, self._records)):
                with open(self.tmp_dir / name, "wb") as file:
                    np.save(file, np.frombuffer(values, dtype=np.int64))
                    sync_file(file)
            # The manifest goes last: is_complete() reads it first, so it never describes missing arrays.
            with open(self.tmp_dir / MANIFEST, "w") as file:
                json.dump(manifest, file, indent=2, sort_keys=True)
                sync_file(file)
            sync_directory(self.tmp_dir)
            self._publish()
        except BaseException:
            self.abort()
            raise
        return self.final_dir

    def abort(self) -> None:
        """Drop everything written so far; `final_dir` is left as it was."""
        self._closed = True
        for file in self._files:
            file.close()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def _publish(self) -> None:
        """Rename into place, or keep a complete store that another process published first."""
        try:
            publish(self.tmp_dir, self.final_dir)
        except OSError:
            # rename() refuses a non-empty target: someone else finished first (or left a foreign directory).
            if not is_complete(self.final_dir):
                raise StoreError(f"{self.final_dir} exists but is not a complete store; delete it and retry")
            shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# StoreWriter's temporary directory: <key>.tmp-<host>-<pid>-<8 hex digits>.
_TEMPORARY = re.compile(r"\.tmp-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{8}$")


def remove_abandoned_stores(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary directories of writers that died (kill -9, a lost node) and return them.

    Only a writer of this host whose process no longer exists is taken for dead: a live writer, or one on
    another host sharing the directory (whose pid says nothing here), is left alone."""
    removed = []
    for path in Path(directory).glob("*.tmp-*"):
        match = _TEMPORARY.search(path.name)
        if match and match["host"] == socket.gethostname() and not _process_exists(int(match["pid"])):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's process
        return True
    return True


def read_manifest(store_dir: str | os.PathLike[str]) -> dict[str, Any]:
    with open(Path(store_dir) / MANIFEST) as file:
        return json.load(file)


def is_complete(store_dir: str | os.PathLike[str]) -> bool:
    """True iff the manifest exists and every array has exactly the size it promises."""
    store_dir = Path(store_dir)
    try:
        manifest = read_manifest(store_dir)
        counts = manifest["counts"]
        itemsize = np.dtype(manifest["dtype"]).itemsize
        offsets = np.load(store_dir / OFFSETS_FILE, mmap_mode="r")
        conversations = np.load(store_dir / CONVERSATIONS_FILE, mmap_mode="r")
        records = np.load(store_dir / RECORDS_FILE, mmap_mode="r")
        return (
            manifest["format"] == FORMAT_VERSION
            and (store_dir / IDS_FILE).stat().st_size == counts["tokens"] * itemsize
            and (store_dir / TRAINED_FILE).stat().st_size == counts["tokens"]
            and offsets.shape == (counts["examples"] + 1,)
            and conversations.shape == records.shape == (counts["examples"],)
            and int(offsets[0]) == 0
            and int(offsets[-1]) == counts["tokens"]
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _open_array(path: Path, dtype: np.dtype, length: int) -> np.ndarray:
    # np.memmap refuses empty files; an empty store is still a valid store.
    if length == 0:
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(length,))


class TokenStore:
    """Read-only view of a complete store: arrays are memory-mapped, so opening costs nothing and the page
    cache is shared between DataLoader workers and ranks.

    `input_ids`, `trained`, `offsets`, `conversations` and `records` are the raw (memory-mapped) arrays for
    vectorised bookkeeping.
    `source` names the data file as this run gave it: a store is keyed by content, so it serves every file
    with the same bytes, whatever its name (the directory's name when not given).
    """

    def __init__(self, store_dir: str | os.PathLike[str], source: str | None = None) -> None:
        self.store_dir = Path(store_dir)
        self.source = source if source is not None else str(self.store_dir)
        if not is_complete(self.store_dir):
            raise StoreError(f"{self.store_dir} is not a complete token store; run sft-prepare again")
        self.manifest = read_manifest(self.store_dir)
        tokens = self.manifest["counts"]["tokens"]
        self.input_ids = _open_array(self.store_dir / IDS_FILE, np.dtype(self.manifest["dtype"]), tokens)
        self.trained = _open_array(self.store_dir / TRAINED_FILE, np.dtype(np.uint8), tokens)
        self.offsets = np.load(self.store_dir / OFFSETS_FILE, mmap_mode="r")
        self.conversations = np.load(self.store_dir / CONVERSATIONS_FILE, mmap_mode="r")
        self.records = np.load(self.store_dir / RECORDS_FILE, mmap_mode="r")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, labels) of one example as int64 copies; labels are IGNORE_INDEX where not trained."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"example {index} out of range for a store of {len(self)}")
        index %= len(self)
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        ids = self.input_ids[start:end].astype(np.int64)
        labels = np.where(self.trained[start:end].astype(bool), ids, IGNORE_INDEX)
        return ids, labels

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per example (int64), what packing and length-grouping work from."""
        return np.diff(self.offsets)

    def __getstate__(self) -> dict[str, Any]:
        # Pickling a memmap copies its data; workers and spawned ranks reopen the files instead.
        return {"store_dir": self.store_dir, "source": self.source}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["store_dir"], state["source"])


def cache_key(parts: Mapping[str, Any], files: Sequence[str | os.PathLike[str]]) -> str:
    """sha256 over everything that determines a store: `parts` (template, tokenizer fingerprint, protocol
    config and version, ...) as canonical JSON, then the bytes of each file in the given order.

    File names and locations do not count (a copied dataset hits the same cache); their order does, since the
    store keeps input order. Each file is hashed on its own so concatenations cannot collide.
    """
    digest = hashlib.sha256(b"sft-store\0")
    digest.update(json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode())
    digest.update(b"\0")
    for path in files:
        with open(path, "rb") as file:
            digest.update(hashlib.file_digest(file, "sha256").digest())
    return digest.hexdigest()
