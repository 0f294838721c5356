"""sft-prepare as a user runs it on a cached hf:// name: offline, the same export as the JSONL it came
from, and a name missing from the cache fails naming the load_dataset call to run."""

from __future__ import annotations

import os

import pytest

from tests.helpers import A, B, arrow_table, cache_hf_dataset, make_tokenizer, run_prepare, write_jsonl

pytestmark = pytest.mark.slow
pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("datasets")


def test_sft_prepare_reads_a_cached_hf_name_offline(tmp_path, monkeypatch):
    make_tokenizer().save(str(tmp_path / "tok.json"))
    jsonl = write_jsonl(tmp_path / "chats.jsonl", A + B)
    pq.write_table(arrow_table(A + B), str(tmp_path / "chats.parquet"))
    cache_hf_dataset(tmp_path / "hf-cache", "org/chats", str(tmp_path / "chats.parquet"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    common = [
        "tokenizer=file",
        f"tokenizer.path={tmp_path / 'tok.json'}",
        "template=chatml",
        "protocol.system_prompt=null",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    for name, entry in (("jsonl", jsonl), ("hf", "hf://org/chats:train")):
        result = run_prepare(tmp_path, f"data.train=['{entry}']", *common, f"export={tmp_path / name}.out")
        assert result.returncode == 0, result.stderr
        assert "read 5 = kept 5" in result.stdout
    assert (tmp_path / "hf.out").read_bytes() == (tmp_path / "jsonl.out").read_bytes()

    missing = run_prepare(tmp_path, "data.train=['hf://org/absent']", *common)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert "datasets.load_dataset('org/absent', split='train')" in missing.stderr
    assert os.environ["HF_DATASETS_CACHE"] in missing.stderr
