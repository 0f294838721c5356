"""Preparation: the cache (tokenizer and stores keyed by content), forced formats, and `sft-prepare`'s
contract command run as a user runs it."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from sft.data import build
from sft.data.build import prepare
from sft.data.store import StoreError
from sft.protocol.labels import IGNORE_INDEX
from sft.protocol.pipeline import DataError
from sft.protocol.tokenizer import load_tokenizer
from tests.conftest import make_tokenizer

A = [
    {
        "messages": [
            {"role": "user", "content": "Hello, how are you?"},
            {"role": "assistant", "content": "Fine."},
        ]
    },
    {"conversations": [{"from": "human", "value": "Sort 3 1 2"}, {"from": "gpt", "value": "1 2 3"}]},
]
B = [
    {"instruction": "Reverse the list", "input": "3 1 2", "output": "2 1 3"},
    {"prompt": "Ünïcödé 🙂?", "completion": " 中文字符\n\n"},
    {
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "The quick brown fox?"},
            {"role": "assistant", "content": "Jumps."},
            {"role": "user", "content": "Over?"},
            {"role": "assistant", "content": "The lazy dog."},
        ]
    },
]
# What chatml renders for each record above, as (role, content) turns.
TURNS = [
    [("user", "Hello, how are you?"), ("assistant", "Fine.")],
    [("user", "Sort 3 1 2"), ("assistant", "1 2 3")],
    [("user", "Reverse the list\n\n3 1 2"), ("assistant", "2 1 3")],
    [("user", "Ünïcödé 🙂?"), ("assistant", " 中文字符\n\n")],
    [(m["role"], m["content"]) for m in B[2]["messages"]],
]
CHATML_JINJA = (  # chatml without {% generation %} tags: spans come from the generation prompt
    "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def expected_example(tokenizer, turns: list[tuple[str, str]]) -> dict:
    """chatml rendered by hand, labels by the per-token overlap rule: independent of the pipeline."""
    text, spans = "", []
    for role, content in turns:
        text += f"<|im_start|>{role}\n"
        if role == "assistant":
            spans.append((len(text), len(text) + len(content) + len("<|im_end|>")))
        text += f"{content}<|im_end|>\n"
    encoding = tokenizer.encode(text, add_special_tokens=False)
    labels = [
        token if any(a < e and b > s for s, e in spans) else IGNORE_INDEX
        for token, (a, b) in zip(encoding.ids, encoding.offsets, strict=True)
    ]
    return {"input_ids": encoding.ids, "labels": labels}


# ---- prepare() in process: the cache ----------------------------------------------------------------------


@pytest.fixture
def files(tmp_path):
    make_tokenizer().save(str(tmp_path / "tok.json"))
    return {
        "a": write_jsonl(tmp_path / "a.jsonl", A),
        "b": write_jsonl(tmp_path / "b.jsonl", B),
        "tok": str(tmp_path / "tok.json"),
        "cache": str(tmp_path / "cache"),
    }


def config(files, tokenizer=None, template="chatml", data_format="auto", **protocol) -> dict:
    return {
        "seed": 0,
        "tokenizer": tokenizer or {"name": "file", "path": files["tok"]},
        "template": {"name": template},
        "protocol": {"max_seq_len": 4096, **protocol},
        "data": {"name": "jsonl", "train": [files["a"]], "format": data_format, "cache_dir": files["cache"]},
    }


def store_dir(cfg: dict):
    return prepare(cfg).train[0].store_dir


def test_bpe_tokenizer_is_trained_once_and_cached(files, tmp_path):
    bpe = {"name": "bpe", "vocab_size": 300}
    first = prepare(config(files, tokenizer=bpe))
    [saved] = (tmp_path / "cache" / "tokenizers").glob("*.json")
    written = saved.stat().st_mtime_ns
    second = prepare(config(files, tokenizer=bpe, max_seq_len=100))  # not a rendering key: no retraining
    assert list((tmp_path / "cache" / "tokenizers").glob("*.json")) == [saved]
    assert saved.stat().st_mtime_ns == written
    assert second.tokenizer.to_str() == first.tokenizer.to_str() == load_tokenizer(saved).to_str()
    assert store_dir(config(files, tokenizer=bpe)) == first.train[0].store_dir  # trained or loaded: one key


def test_store_cache_hits_when_nothing_changes_and_misses_on_any_change(files, tmp_path):
    baseline = store_dir(config(files))
    manifest = (baseline / "manifest.json").stat().st_mtime_ns
    started = time.perf_counter()
    assert store_dir(config(files)) == baseline
    assert time.perf_counter() - started < 2.0 and (baseline / "manifest.json").stat().st_mtime_ns == manifest

    make_tokenizer(vocab_size=350).save(str(tmp_path / "other-tok.json"))
    changed = {
        "template": store_dir(config(files, template="microlm")),
        "tokenizer": store_dir(
            config(files, tokenizer={"name": "file", "path": str(tmp_path / "other-tok.json")})
        ),
        "protocol": store_dir(config(files, max_seq_len=2048)),
    }
    with open(files["a"], "a", encoding="utf-8") as file:
        file.write(json.dumps(A[0]) + "\n")
    changed["data"] = store_dir(config(files))
    assert len({baseline, *changed.values()}) == 1 + len(changed)


def test_data_format_forces_the_reader(files, tmp_path):
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Hi", "output": "Yo", "messages": []}])
    cfg = config(files, data_format="alpaca")
    cfg["data"]["train"] = [alpaca]
    assert prepare(cfg).accounting.kept == 1  # auto would read it as an (empty) messages record
    cfg["data"]["format"] = "auto"
    with pytest.raises(DataError, match=rf"{alpaca}:1: no_assistant_turn"):
        prepare(cfg)


# ---- sft-prepare as a user runs it -----------------------------------------------------------------------


def run_prepare(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "sft.prepare", f"hydra.run.dir={tmp_path / 'run'}", *overrides]
    return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=120)


def contract(files, tmp_path, *extra: str) -> list[str]:
    return [
        f"data.train=[{files['a']},{files['b']}]",
        "tokenizer=file",
        f"tokenizer.path={files['tok']}",
        "template=chatml",
        "protocol.system_prompt=null",
        "protocol.max_seq_len=4096",
        f"data.cache_dir={files['cache']}",
        f"export={tmp_path / 'out.jsonl'}",
        *extra,
    ]


@pytest.mark.slow
def test_contract_command_exports_examples_in_input_order(files, tmp_path):
    result = run_prepare(tmp_path, *contract(files, tmp_path))
    assert result.returncode == 0, result.stderr
    assert "read 5 = kept 5 + skipped 0 + dropped 0" in result.stdout
    exported = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    tokenizer = load_tokenizer(files["tok"])
    assert exported == [expected_example(tokenizer, turns) for turns in TURNS]
    assert all(list(example) == ["input_ids", "labels"] for example in exported)


@pytest.mark.slow
def test_jinja_template_from_a_file_gives_the_same_examples(files, tmp_path):
    (tmp_path / "chat.jinja").write_text(CHATML_JINJA, encoding="utf-8")
    overrides = contract(
        files, tmp_path, f"template.path={tmp_path / 'chat.jinja'}", "template.eot='<|im_end|>'"
    )
    overrides[overrides.index("template=chatml")] = "template=jinja"
    result = run_prepare(tmp_path, *overrides)
    assert result.returncode == 0, result.stderr
    exported = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert exported == [expected_example(load_tokenizer(files["tok"]), turns) for turns in TURNS]


@pytest.mark.slow
def test_a_bad_line_fails_naming_file_and_line_or_is_skipped_and_counted(files, tmp_path):
    with open(files["b"], "a", encoding="utf-8") as file:
        file.write('{"messages": [{"role": "user", "content": "Hi"}]}\n')
    failed = run_prepare(tmp_path, *contract(files, tmp_path))
    assert failed.returncode != 0
    assert f"{files['b']}:4: no_assistant_turn" in failed.stderr and "Traceback" not in failed.stderr

    skipped = run_prepare(tmp_path, *contract(files, tmp_path, "protocol.on_error=skip"))
    assert skipped.returncode == 0, skipped.stderr
    assert "read 6 = kept 5 + skipped 1 + dropped 0" in skipped.stdout
    assert f"skipped 1 no_assistant_turn: {files['b']}:4" in skipped.stdout


def test_prepare_never_imports_torch_or_lightning():
    check = (
        "import sys, sft.cli.prepare, sft.data.build, sft.protocol.pipeline; "
        "heavy = sorted(m for m in ('torch', 'lightning', 'pytorch_lightning') if m in sys.modules); "
        "assert not heavy, heavy"
    )
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_preparers_of_one_cache_take_turns(tmp_path):
    """Every rank of a job may call prepare(); the cache lock makes the others wait for the first."""
    import threading

    from sft.data.build import cache_lock

    cache = tmp_path / "cache"
    finished = threading.Event()

    def second_preparer():
        with cache_lock(cache):
            finished.set()

    with cache_lock(cache):
        thread = threading.Thread(target=second_preparer)
        thread.start()
        assert not finished.wait(0.3)
    thread.join(5)
    assert finished.is_set()


# ---- hostile and careless input ----------------------------------------------------------------------------

LONE_SURROGATE = (
    '{"messages": [{"role": "user", "content": "lone \\ud800"}, {"role": "assistant", "content": "x"}]}'
)


def test_a_lone_surrogate_with_a_tokenizer_file_is_raised_with_its_line_or_skipped(files, tmp_path):
    with open(files["b"], "a", encoding="utf-8") as file:
        file.write(LONE_SURROGATE + "\n")
    with pytest.raises(DataError, match=rf"^{files['b']}:4: invalid_text: 'messages\[0\]\.content'"):
        prepare({**config(files), "data": {**config(files)["data"], "train": [files["b"]]}})
    skipped = run_prepare(tmp_path, *contract(files, tmp_path, "protocol.on_error=skip"))
    assert skipped.returncode == 0, skipped.stderr
    assert "read 6 = kept 5 + skipped 1 + dropped 0" in skipped.stdout
    assert f"skipped 1 invalid_text: {files['b']}:4" in skipped.stdout


def test_files_with_the_same_bytes_are_reported_under_the_names_given_in_this_run(files, tmp_path):
    bad = write_jsonl(tmp_path / "first.jsonl", A) + ""
    with open(bad, "a", encoding="utf-8") as file:
        file.write("{oops\n")
    copy = tmp_path / "renamed.jsonl"
    copy.write_bytes((tmp_path / "first.jsonl").read_bytes())
    cfg = config(files, on_error="skip")
    cfg["data"]["train"] = [bad, str(copy)]
    prepared = prepare(cfg)
    assert prepared.train[0].store_dir == prepared.train[1].store_dir  # one store: keyed by content
    assert prepared.accounting.where["invalid_json"] == [f"{bad}:3", f"{copy}:3"]
    assert [store.source for store in prepared.train] == [bad, str(copy)]
    moved = tmp_path / "moved.jsonl"
    (tmp_path / "first.jsonl").rename(moved)
    cfg["data"]["train"] = [str(moved)]
    assert prepare(cfg).accounting.where["invalid_json"] == [f"{moved}:3"]


def test_a_directory_or_an_unset_data_train_is_named_for_what_it_is(files, tmp_path):
    cfg = config(files)
    cfg["data"]["train"] = [str(tmp_path)]
    with pytest.raises(ValueError, match=rf"data.train: {tmp_path} is a directory, not a data file"):
        prepare(cfg)
    for unset in (None, "???", []):
        cfg["data"]["train"] = unset
        with pytest.raises(ValueError, match="data.train is not set"):
            prepare(cfg)
    cfg["data"]["train"] = [str(tmp_path / "missing.jsonl")]
    with pytest.raises(FileNotFoundError, match="data.train: data file not found"):
        prepare(cfg)


def test_a_truncated_json_array_is_located_and_its_whole_records_counted(files, tmp_path):
    truncated = tmp_path / "cut.json"
    truncated.write_text(json.dumps(A + B, indent=1)[:-40])
    cfg = config(files, on_error="skip")
    cfg["data"]["train"] = [str(truncated)]
    accounting = prepare(cfg).accounting
    assert (accounting.read, accounting.kept, dict(accounting.skipped)) == (5, 4, {"invalid_json": 1})
    assert accounting.where["invalid_json"] == [f"{truncated} record 5"]


def test_stores_left_half_written_by_dead_preparers_are_removed(files, tmp_path):
    stores = tmp_path / "cache" / "stores"
    stores.mkdir(parents=True)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    host = socket.gethostname()
    abandoned = stores / f"{'0' * 64}.tmp-{host}-{int(dead.stdout)}-0123abcd"
    alive = stores / f"{'1' * 64}.tmp-{host}-{os.getpid()}-0123abcd"
    elsewhere = stores / f"{'2' * 64}.tmp-other-host-{int(dead.stdout)}-0123abcd"
    for directory in (abandoned, alive, elsewhere):
        directory.mkdir()
        (directory / "input_ids.bin").write_bytes(b"\0" * 10)
    prepare(config(files))
    assert not abandoned.exists() and alive.exists() and elsewhere.exists()


def test_a_corrupted_cached_tokenizer_is_trained_again_and_a_bad_file_is_named(files, tmp_path):
    bpe = {"name": "bpe", "vocab_size": 300}
    first = prepare(config(files, tokenizer=bpe))
    [saved] = (tmp_path / "cache" / "tokenizers").glob("*.json")
    saved.write_text(saved.read_text()[:100])  # a half-written file
    assert prepare(config(files, tokenizer=bpe)).tokenizer.to_str() == first.tokenizer.to_str()
    assert load_tokenizer(saved).to_str() == first.tokenizer.to_str()
    (tmp_path / "tok.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(ValueError, match=rf"the tokenizer file {tmp_path / 'tok.json'} cannot be read"):
        prepare(config(files))


def test_a_read_only_cache_serves_what_it_holds(files, tmp_path, monkeypatch):
    first = prepare(config(files))

    def read_only_open(path, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax+"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(build, "open", read_only_open, raising=False)
    again = prepare(config(files))
    assert again.train[0].store_dir == first.train[0].store_dir and again.accounting == first.accounting
    with pytest.raises(StoreError, match=rf"data.cache_dir={files['cache']} is read-only and lacks a store"):
        prepare(config(files, max_seq_len=100))
