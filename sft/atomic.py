"""Files and directories that appear complete or not at all, and survive a crash once written.

Everything is written under a temporary sibling (same directory, so the rename never crosses a file
system), synced, renamed over the final name, and the parent directory synced so the rename itself is
durable. A process killed at any point leaves the previous file (or nothing) under the final name, and at
worst a `.NAME.tmp-PID-XXXX` sibling. No torch here: `sft-prepare` writes through it.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def temporary_sibling(path: str | os.PathLike[str]) -> Path:
    """A fresh name beside `path`, unique across processes and threads."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def sync_file(handle: IO[Any]) -> None:
    """Python's buffer and the kernel's cache to the disk."""
    handle.flush()
    os.fsync(handle.fileno())


def sync_directory(path: str | os.PathLike[str]) -> None:
    """Directory entries (new files, a rename) are durable only once their directory is synced."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def publish(temporary: Path, final: Path) -> None:
    """Rename a synced `temporary` to `final` and make the rename durable. A directory replaces only an
    absent or empty `final` (OSError otherwise): the caller decides what an existing one means."""
    os.replace(temporary, final)
    sync_directory(final.parent)


@contextmanager
def atomic_file(path: str | os.PathLike[str], mode: str = "w", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """`open(path, mode)` whose content replaces `path` only when the block ends without an exception.

    with atomic_file(out, "w", encoding="utf-8") as handle:
        handle.write(text)
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file writes a whole file: mode must be 'w' or 'wb', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_sibling(path)
    try:
        with open(temporary, mode, **open_kwargs) as handle:
            yield handle
            sync_file(handle)
        publish(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


@contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A staging directory to fill; when the block ends without an exception, every file in it is synced
    and it is renamed to `path` (which must be absent or an empty directory). On error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = temporary_sibling(path)
    staging.mkdir()
    try:
        yield staging
        sync_tree(staging)
        publish(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def sync_tree(root: Path) -> None:
    """Every file and directory under `root` (bottom up, so a directory is synced after its entries)."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            with open(os.path.join(directory, name), "rb") as handle:
                os.fsync(handle.fileno())
        sync_directory(directory)
