"""Atomic writes: the final name holds the old content or the whole new one, synced to disk, never a part."""

from __future__ import annotations

import os

import pytest

from sft.atomic import atomic_directory, atomic_file


def test_a_file_is_synced_renamed_from_its_directory_and_the_directory_synced(tmp_path, synced):
    path = tmp_path / "out.jsonl"
    with atomic_file(path, "w", encoding="utf-8") as handle:
        temporary = handle.name
        handle.write("whole\n")
    assert path.read_text() == "whole\n" and os.path.dirname(temporary) == str(tmp_path)
    assert synced == [temporary, str(tmp_path)]
    assert os.listdir(tmp_path) == ["out.jsonl"]


def test_an_interrupted_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text("old\n")
    with pytest.raises(KeyboardInterrupt), atomic_file(path, "w") as handle:
        handle.write("half of the new")
        raise KeyboardInterrupt
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["out.jsonl"]


def test_only_whole_file_modes():
    with pytest.raises(ValueError, match="mode"), atomic_file("x", "a"):
        pass


def test_a_directory_appears_whole_with_every_file_synced(tmp_path, synced):
    out = tmp_path / "export"
    with atomic_directory(out) as staging:
        (staging / "sub").mkdir()
        (staging / "sub" / "a.json").write_text("{}")
        (staging / "b.txt").write_text("b")
        assert not out.exists()
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["b.txt", "sub", "sub/a.json"]
    # Entries before their directory, the staging directory before the rename, the parent after it.
    expected = [staging / "sub" / "a.json", staging / "sub", staging / "b.txt", staging, tmp_path]
    assert synced == [str(path) for path in expected]


def test_an_interrupted_directory_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "export") as staging:
        (staging / "a.json").write_text("{}")
        raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []
