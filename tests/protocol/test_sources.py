"""Data entries beyond JSONL: Parquet files / folders / globs, save_to_disk folders and cached hf:// names."""

from __future__ import annotations

import json
import random
import string
import subprocess
import sys

import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from sft.protocol.sources import (  # noqa: E402
    SourceError,
    parse_hf_name,
    read_records,
    resolve_source,
    without_nulls,
)
from tests.helpers import arrow_table  # noqa: E402

ROWS = [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo", "train": False}]},
    {"messages": [{"role": "user", "content": "A?"}, {"role": "assistant", "content": "B."}], "system": "S"},
]


def write_parquet(path, rows, **kwargs) -> str:
    pq.write_table(arrow_table(rows), str(path), **kwargs)
    return str(path)


def test_parquet_rows_come_back_as_written_without_the_schema_nulls(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", ROWS)
    assert arrow_table(ROWS).to_pylist()[1]["messages"][1]["train"] is None  # what Arrow adds
    records = list(read_records(path))
    assert [record.data for record in records] == ROWS
    assert [record.where for record in records] == [f"{path}:1", f"{path}:2"]


def test_rows_are_located_across_record_batches_and_row_groups(tmp_path, monkeypatch):
    import sft.protocol.sources as sources

    monkeypatch.setattr(sources, "ROWS_PER_BATCH", 3)
    monkeypatch.setattr(sources, "RELEASE_EVERY", 2)
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(13)]
    path = write_parquet(tmp_path / "d.parquet", rows, row_group_size=4)
    released_after: list[int] = []  # rows read when the freed Arrow memory was handed back
    records = []
    monkeypatch.setattr(sources, "_release_freed_arrow_memory", lambda: released_after.append(len(records)))
    records.extend(read_records(path))
    assert [record.line for record in records] == list(range(1, 14))
    assert [record.data for record in records] == rows
    assert released_after == [6, 12, 13]  # every 2 batches of 3 rows, and at the end of the file


def test_a_file_of_one_big_row_group_is_never_decoded_whole(tmp_path, monkeypatch):
    """pandas and pyarrow write a file in one row group unless told otherwise: it is read and decoded a
    batch at a time all the same, so what Arrow holds does not grow with the row group."""
    import sft.protocol.sources as sources

    monkeypatch.setattr(sources, "ROWS_PER_BATCH", 50)
    letters = "".join(random.Random(0).choices(string.ascii_letters, k=8000))

    def arrow_bytes_held(count: int) -> int:
        rows = [{"prompt": letters[i : i + 4000], "completion": str(i)} for i in range(count)]
        path = write_parquet(tmp_path / f"{count}.parquet", rows, row_group_size=count, compression="none")
        assert pq.ParquetFile(path).num_row_groups == 1
        start, most = pa.total_allocated_bytes(), 0
        for number, record in enumerate(read_records(path)):
            most = max(most, pa.total_allocated_bytes() - start)
            assert record.data == rows[number]
        return most

    small, large = arrow_bytes_held(1000), arrow_bytes_held(4000)  # row groups of 4 MB and 16 MB
    # Decoded whole, the held bytes grew with the row group: 8.0 MB, then 32.1 MB.
    assert large < 2 * small and large < 12_000_000, (small, large)


def test_without_nulls_drops_null_fields_at_any_depth_but_keeps_list_items():
    value = {"a": None, "b": [{"c": None, "d": 1}, None], "e": {"f": None}}
    assert without_nulls(value) == {"b": [{"d": 1}, None], "e": {}}


def test_a_folder_or_glob_of_parquet_files_reads_them_in_sorted_order(tmp_path):
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    write_parquet(folder / "b.parquet", ROWS[1:])
    write_parquet(folder / "a.parquet", ROWS[:1])
    write_parquet(folder / "sub" / "c.parquet", ROWS[:1])
    assert [record.data for record in read_records(str(folder))] == ROWS + ROWS[:1]
    assert resolve_source(str(folder / "*.parquet")).files == (
        str(folder / "a.parquet"),
        str(folder / "b.parquet"),
    )
    with pytest.raises(SourceError, match="no file matches"):
        resolve_source(str(folder / "*.nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is a directory, not a data file"):
        resolve_source(str(tmp_path / "empty"))


def test_save_to_disk_folders_read_in_shard_order_and_a_dataset_dict_asks_for_a_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(5)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"), num_shards=2)
    source = resolve_source(str(tmp_path / "ds"))
    assert len(source.files) == 2
    assert [record.data for record in read_records(source)] == rows
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(SourceError, match=r"DatasetDict: name one split's folder, e\.g\. .*dd/train"):
        resolve_source(str(tmp_path / "dd"))
    assert [record.data for record in read_records(str(tmp_path / "dd" / "train"))] == rows


def test_columns_rename_fields_before_format_detection(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", [{"conversation": ROWS[0]["messages"], "id": 7}])
    (record,) = read_records(path, {"messages": "conversation"})
    assert record.data == {"messages": ROWS[0]["messages"], "id": 7}


@pytest.mark.parametrize(
    "name, parsed",
    [
        ("hf://org/name", ("org/name", None, "train")),
        ("hf://org/name:test", ("org/name", None, "test")),
        ("hf://org/name/main:validation", ("org/name", "main", "validation")),
        ("hf://name", ("name", None, "train")),
    ],
)
def test_hf_names(name, parsed):
    assert parse_hf_name(name) == parsed


def test_hf_names_that_are_not_names():
    for name in ("hf://", "hf://a/b/c/d", "hf://a//b"):
        with pytest.raises(SourceError, match="expected hf://org/name"):
            parse_hf_name(name)


def test_hf_name_missing_from_the_cache_says_what_to_download(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(SourceError) as raised:
        resolve_source("hf://org/chats/main:test")
    message = str(raised.value)
    assert "not in the local datasets cache" in message and str(tmp_path / "empty-cache") in message
    assert "datasets.load_dataset('org/chats', 'main', split='test')" in message


def test_json_and_jsonl_entries_read_as_before(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS), encoding="utf-8")
    assert [record.data for record in read_records(str(path))] == ROWS
    with pytest.raises(SourceError, match="data file not found"):
        resolve_source(str(tmp_path / "missing.jsonl"))


def test_jsonl_needs_neither_pyarrow_nor_datasets_and_parquet_says_what_to_install(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps(ROWS[0]) + "\n", encoding="utf-8")
    parquet = write_parquet(tmp_path / "d.parquet", ROWS)
    check = (
        "import sys; sys.modules['pyarrow'] = sys.modules['datasets'] = None\n"
        "from sft.protocol.sources import SourceError, read_records\n"
        f"assert len(list(read_records({str(jsonl)!r}))) == 1\n"
        "try:\n"
        f"    read_records({parquet!r}).__next__()\n"
        "except SourceError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "needs `pip install sft[data]`" in result.stdout
