"""Prepare once: template and tokenizer checked at start-up, then one cached token store per data file.

Shared by `sft-prepare` and the SFTDataModule, so it must not import torch or lightning. A store's cache
key covers the file's bytes, the tokenizer, the template, the protocol config and PROTOCOL_VERSION; a
second run with the same inputs opens the existing store in milliseconds.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import functools
import json
import os
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from tokenizers import Tokenizer

from sft.atomic import atomic_file
from sft.data import sample
from sft.data.config import DataConfig
from sft.data.ranks import PrepareRanks, Ready, artifact_lock, prepare_in_turn, prepare_on_local_ranks
from sft.data.store import (
    FORMAT_VERSION,
    StoreError,
    StoreWriter,
    TokenStore,
    cache_key,
    is_complete,
    remove_abandoned_stores,
)
from sft.protocol.pipeline import (
    PROTOCOL_VERSION,
    Accounting,
    ConversationEncoder,
    read_conversations,
)
from sft.protocol.sources import resolve_source
from sft.protocol.templates import ChatTemplate, check_template, load_template
from sft.protocol.tokenizer import (
    TokenizerConfig,
    TokenizerFileError,
    check_template_tokens,
    load_tokenizer,
    tokenizer_fingerprint,
    train_bpe,
)
from sft.protocol.types import ProtocolConfig, ProtocolError

SPLIT_ROWS_SHOWN = 10_000  # split rows noted in the manifest (sft-inspect shows the first few)

if TYPE_CHECKING:
    from sft.cli.schemas import PrepareConfig


class EmptyDataError(ValueError):
    """Preparation kept no training example; the message carries the accounting that says why."""


@dataclass
class PreparedData:
    """What training needs from preparation: the checked tokenizer and template, and the stores."""

    tokenizer: Tokenizer
    template: ChatTemplate
    train: list[TokenStore]
    val: list[TokenStore]
    accounting: Accounting  # over all train and val files


def write_sample(directory: Path, count: int, seed: int, split: str, writable: bool = True) -> str:
    """The embedded default's conversations as a JSONL file (written once, atomically), so that they flow
    through exactly the same reader, cache and accounting as a user's files."""
    path = directory / f"sample-{split}-seed{seed}-n{count}.jsonl"
    if not path.is_file():
        if not writable:
            raise read_only_error(directory.parent, f"the sample data {path.name}")
        with atomic_file(path, "w", encoding="utf-8") as handle:
            for record in sample.generate_conversations(count, seed, split):
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return str(path)


def data_files(
    data: DataConfig, cache_dir: Path, seed: int, writable: bool = True
) -> tuple[list[str], list[str]]:
    """The train and val files; `data=sample` writes its generated conversations into the cache first."""
    if data.name == "sample":
        return (
            [write_sample(cache_dir / "sample", data.num_train, seed, "train", writable)],
            [write_sample(cache_dir / "sample", data.num_val, seed, "val", writable)],
        )
    train, val = data.train_files, data.val_files
    if not train:
        raise ValueError("data.train is not set: give a list of files, e.g. data.train=[a.jsonl,b.jsonl]")
    for key, paths in (("data.train", train), ("data.val", val)):
        for path in paths:
            try:
                resolve_source(path)  # a file, a Parquet folder or glob, a save_to_disk folder, hf://
            except (OSError, ValueError) as error:
                raise type(error)(f"{key}: {error}") from None
    return train, val


def rendered_texts(
    paths: list[str], fmt: str, encoder: ConversationEncoder, columns: Mapping[str, str] | None = None
) -> Iterator[str]:
    """Rendered conversations for tokenizer training, each with the system-prompt decision its store makes
    (indexed within its file); bad records are left to the real pass to report."""
    for path in paths:
        for index, item in enumerate(read_conversations(path, fmt, columns)):
            if not isinstance(item, ProtocolError):
                try:
                    yield from (row.rendered.text for row in encoder.prepare(item, index)[1])
                except ProtocolError:
                    pass


# The protocol keys that change rendered text, hence what the BPE is trained on (not, e.g., max_seq_len).
RENDERING_KEYS = (
    "system_prompt",
    "system_prompt_prob",
    "role_map",
    "merge_consecutive",
    "strip_content",
    "seed",
    "turns",
)


def build_tokenizer(
    tokenizer_cfg: TokenizerConfig,
    template: ChatTemplate,
    protocol: ProtocolConfig,
    train_files: list[str],
    fmt: str,
    cache_dir: Path,
    writable: bool = True,
    columns: Mapping[str, str] | None = None,
    ranks: PrepareRanks = PrepareRanks(),
) -> Tokenizer:
    """`file`: load it. `bpe`: train on the rendered training conversations, cached by content hash (a
    cached file that cannot be read, e.g. cut short, is trained again)."""
    if tokenizer_cfg.name == "file":
        tokenizer = load_tokenizer(tokenizer_cfg.path)
    elif tokenizer_cfg.name == "bpe":
        parts = {
            "kind": "bpe",
            "vocab_size": tokenizer_cfg.vocab_size,
            "special_tokens": template.special_tokens,
            "template": template.fingerprint,
            "protocol": {key: getattr(protocol, key) for key in RENDERING_KEYS},
            "format": fmt,
            "columns": dict(columns or {}),
        }
        files = [file for name in train_files for file in resolve_source(name).files]
        path = cache_dir / "tokenizers" / f"{cache_key(parts, files)}.json"
        tokenizer = None
        if path.is_file():
            try:
                tokenizer = load_tokenizer(path)
            except TokenizerFileError as error:
                print(f"sft: {error}; training it again", file=sys.stderr)
        if tokenizer is None:
            if not writable:
                raise read_only_error(cache_dir, f"the tokenizer {path.name}")
            if ranks.world_size > 1:  # which of the ranks trains it (once: the others wait, then load it)
                print(
                    f"sft: training the BPE tokenizer on rank {ranks.rank} of {ranks.world_size}",
                    file=sys.stderr,
                )
            text_encoder = ConversationEncoder(
                None, template, dataclasses.replace(protocol, special_in_content="allow")
            )
            tokenizer = train_bpe(
                rendered_texts(train_files, fmt, text_encoder, columns),
                tokenizer_cfg.vocab_size,
                template.special_tokens,
            )
            with atomic_file(path, "w", encoding="utf-8") as handle:
                handle.write(tokenizer.to_str(pretty=True))  # what Tokenizer.save writes
    else:
        raise ValueError(f"tokenizer.name={tokenizer_cfg.name!r}: expected 'bpe' or 'file'")
    check_template_tokens(template, tokenizer)
    return tokenizer


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[rows]} rows · {task.fields[tokens_per_s]:,.0f} tokens/s"),
        TimeElapsedColumn(),
        console=(console := Console(stderr=True)),  # stdout keeps only the summary, for scripts
        transient=True,
        disable=not console.is_terminal,  # piped, a transient bar would leave only blank lines
    )


def build_store(
    path: str,
    encoder: ConversationEncoder,
    fmt: str,
    cache_dir: Path,
    writable: bool = True,
    columns: Mapping[str, str] | None = None,
    ranks: PrepareRanks = PrepareRanks(),
) -> tuple[TokenStore, Accounting]:
    """The store for one data entry (a file, a Parquet folder or glob, an hf:// name: sft.protocol.sources),
    from the cache when its key matches, else encoded and written atomically.

    The store's accounting keeps places relative to the file (":4", " record 3"): a store serves every
    file with the same bytes, so what it reports is named after the file as this run gives it."""
    parts = {
        "protocol_version": PROTOCOL_VERSION,
        "store_format": FORMAT_VERSION,
        "template": encoder.template.fingerprint,
        "tokenizer": tokenizer_fingerprint(encoder.tokenizer),
        "protocol": dataclasses.asdict(encoder.config),
        "format": fmt,
        "columns": dict(columns or {}),
    }
    source = resolve_source(path)
    key = cache_key(parts, source.files)
    store_dir = cache_dir / "stores" / key
    if is_complete(store_dir):
        store = TokenStore(store_dir, source=path)
        return store, store_accounting(store)
    if not writable:
        raise read_only_error(cache_dir, f"a store for {path}")
    accounting = Accounting()
    size = max(source.size_bytes, 1)
    started = time.perf_counter()
    tokens = 0
    with (
        _progress() as progress,
        StoreWriter(store_dir, vocab_size=encoder.tokenizer.get_vocab_size()) as writer,
    ):
        task = progress.add_task(f"preparing {Path(path).name}", total=size, rows=0, tokens_per_s=0.0)
        split_rows = []  # [row, turn, of] for the first rows of split conversations, for sft-inspect
        for row, example in enumerate(encoder.encode_file(source, fmt, accounting, columns)):
            if example.split is not None and row < SPLIT_ROWS_SHOWN:
                split_rows.append([row, *example.split])
            first_row = example.split is None or example.split[0] == 1
            writer.add(example.input_ids, example.labels, first_row, example.record)
            tokens += len(example.input_ids)
            if accounting.kept % 1000 == 0:
                elapsed = time.perf_counter() - started
                progress.update(task, rows=accounting.read, tokens_per_s=tokens / max(elapsed, 1e-9))
        writer.close(
            {
                "cache_key": key,
                "accounting": accounting.relative_to(str(path)).to_dict(),
                "split_rows": split_rows,
                "versions": {"protocol": PROTOCOL_VERSION, "parts": parts},
                "prepared_by": {"rank": ranks.rank, "world_size": ranks.world_size},
            }
        )
    return TokenStore(store_dir, source=path), accounting


def store_accounting(store: TokenStore) -> Accounting:
    """A store's accounting, its places named after the file as this run gave it (`store.source`)."""
    return Accounting.from_dict(store.manifest["accounting"]).located_in(store.source)


def read_only_error(cache_dir: Path, missing: str) -> StoreError:
    return StoreError(
        f"data.cache_dir={cache_dir} is read-only and lacks {missing}; run sft-prepare once with this "
        "config where the cache is writable (or give a writable data.cache_dir)"
    )


def prepare(cfg: PrepareConfig, local_ranks: int = 1) -> PreparedData:
    """The whole preparation from a typed config (its `tokenizer`, `template`, `protocol`, `data` sections
    and `seed`): check the template, build or load the tokenizer, then every store.

    `local_ranks`: the processes the job will start on this node once the data is ready (Lightning's
    ddp / ddp_spawn / fsdp launch from one command); that many prepare it at once (sft.data.ranks)."""
    cache_dir = Path(cfg.data.cache_dir)
    template = load_template(dataclasses.asdict(cfg.template))
    check_template(template)
    ranks = PrepareRanks.from_environment(cfg.data.prepare_per_node)
    if ranks.world_size == 1 and local_ranks > 1 and not PrepareRanks.launched():
        share = functools.partial(prepare_share, cfg)
        return prepare_on_local_ranks(share, local_ranks, cfg.data.prepare_per_node)
    if ranks.world_size > 1:
        return prepare_share(cfg, ranks)
    with cache_lock(cache_dir) as writable:
        return _prepare_locked(cfg, cache_dir, cfg.data.format, cfg.protocol, template, writable, ranks)


def prepare_share(cfg: PrepareConfig, ranks: PrepareRanks, ready: Ready | None = None) -> PreparedData:
    """One rank's preparation when every rank prepares its share at once (sft.data.ranks): the cache lock
    shared with the other ranks, entry locks; every store of the run is opened in the end."""
    cache_dir = Path(cfg.data.cache_dir)
    template = load_template(dataclasses.asdict(cfg.template))
    with cache_lock(cache_dir, shared=True) as writable:
        return _prepare_locked(
            cfg, cache_dir, cfg.data.format, cfg.protocol, template, writable, ranks, ready
        )


@contextmanager
def cache_lock(cache_dir: Path, shared: bool = False) -> Iterator[bool]:
    """Who prepares in a cache at once: one process preparing everything alone (another such process, a
    second run on the same data, waits, then opens what the first built), or, `shared`, every rank of a
    job, each building its share under entry locks (prepare_share) while a lone preparer waits.

    Yields whether the cache is writable. A read-only cache (a shared, prepared data set) is used without
    the lock, which nobody can take to write there either; only what is already in it can be opened."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        handle = open(cache_dir / ".lock", "a+")  # readable too: NFS emulates a shared flock by a read lock
    except OSError as error:
        if error.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        yield False
        return
    with handle:
        _lock_and_clean(handle, cache_dir / "stores", shared)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _lock_and_clean(handle: IO[str], stores: Path, shared: bool) -> None:
    """Take the cache lock; whoever gets it while no one else holds it (nobody else is preparing here)
    removes the leftovers of killed preparers. A shared taker finding others at work leaves them alone:
    a temporary that looks dead (its pid gone here) may be a live writer in another pid namespace."""
    if shared:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fcntl.flock(handle, fcntl.LOCK_SH)
            return
    else:
        fcntl.flock(handle, fcntl.LOCK_EX)
    remove_abandoned_stores(stores)
    if shared:
        fcntl.flock(handle, fcntl.LOCK_SH)  # the job's other ranks may come in now


def _prepare_locked(
    cfg: PrepareConfig,
    cache_dir: Path,
    fmt: str,
    protocol: ProtocolConfig,
    template: ChatTemplate,
    writable: bool,
    ranks: PrepareRanks,
    ready: Ready | None = None,
) -> PreparedData:
    columns = cfg.data.columns
    train_files, val_files = data_files(cfg.data, cache_dir, cfg.seed, writable)
    with artifact_lock(cache_dir / "tokenizers" / "bpe") if writable else nullcontext():
        tokenizer = build_tokenizer(
            cfg.tokenizer, template, protocol, train_files, fmt, cache_dir, writable, columns, ranks
        )
    encoder = ConversationEncoder(tokenizer, template, protocol)
    entries = train_files + val_files
    built = prepare_in_turn(
        entries,
        [resolve_source(entry).size_bytes for entry in entries],
        lambda entry: build_store(entry, encoder, fmt, cache_dir, writable, columns, ranks),
        ranks,
        cache_dir / "locks" if writable else None,
        ready,
    )
    accounting = Accounting()
    for _, entry_accounting in built:
        accounting.merge(entry_accounting)
    stores = [store for store, _ in built]
    return PreparedData(
        tokenizer, template, stores[: len(train_files)], stores[len(train_files) :], accounting
    )


def export_jsonl(stores: list[TokenStore], path: str | os.PathLike) -> int:
    """One `{"input_ids", "labels"}` line per kept example, in input order; returns the count. The file
    appears under its name only once complete."""
    count = 0
    with atomic_file(path, "w", encoding="utf-8") as handle:
        for store in stores:
            for index in range(len(store)):
                input_ids, labels = store[index]
                handle.write(json.dumps({"input_ids": input_ids.tolist(), "labels": labels.tolist()}) + "\n")
                count += 1
    return count
