"""Storage: atomic commit (local and S3), listing committed shards for resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline.config import StorageConfig
from pipeline.shard_format import committed_shards
from pipeline.storage import Storage, filesystem_for


def _manifest(store: Storage, shard: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        store.write_atomic(name, data)
    manifest = {"shard": shard, "files": {n: {"size": len(d)} for n, d in files.items()}}
    store.write_atomic(f"{shard}.manifest.json", json.dumps(manifest).encode())


def test_local_write_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    store = Storage(str(tmp_path / "out"))
    store.write_atomic("a.bin", b"first")
    store.write_atomic("a.bin", b"second version")
    assert (tmp_path / "out" / "a.bin").read_bytes() == b"second version"
    assert store.read_bytes("a.bin") == b"second version"
    assert store.size("a.bin") == len(b"second version")
    assert store.size("missing.bin") is None
    assert sorted(os.listdir(tmp_path / "out")) == ["a.bin"]


def test_crash_during_local_commit_leaves_nothing_under_the_final_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Storage(str(tmp_path))

    def boom(src: str, dst: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk gone"):
        store.write_atomic("00000.tar", b"x" * 1000)
    assert os.listdir(tmp_path) == []


def test_committed_shards_requires_matching_manifest(tmp_path: Path) -> None:
    store = Storage(str(tmp_path))
    _manifest(store, "00000", {"00000.tar": b"t" * 10, "00000.parquet": b"p" * 5})
    _manifest(store, "00001", {"00001.tar": b"t" * 10, "00001.parquet": b"p" * 5})
    _manifest(store, "00002", {"00002.tar": b"t" * 10})
    store.write_atomic("00003.tar", b"no manifest, never committed")
    (tmp_path / "00001.tar").write_bytes(b"t" * 3)  # size no longer matches
    (tmp_path / "00002.tar").unlink()
    assert committed_shards(store) == {"00000"}


def test_filesystem_for_local_paths(tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_text("hi")
    fs, path = filesystem_for(str(tmp_path / "f.txt"))
    with fs.open_input_stream(path) as f:
        assert f.read() == b"hi"


def test_s3_commit_list_and_resume_markers(s3_bucket: str) -> None:
    store = Storage(f"s3://{s3_bucket}/run/1", StorageConfig())
    assert store.list_names() == []
    _manifest(store, "00000", {"00000.tar": b"tar-bytes", "00000.parquet": b"pq"})
    store.write_atomic("00001.tar", b"orphan")
    assert store.list_names() == ["00000.manifest.json", "00000.parquet", "00000.tar", "00001.tar"]
    assert store.read_bytes("00000.tar") == b"tar-bytes"
    assert store.size("00000.parquet") == 2
    assert store.size("nope") is None
    assert committed_shards(store) == {"00000"}
    # pyarrow (used to read URL lists) sees the same objects through the same endpoint.
    fs, path = filesystem_for(f"s3://{s3_bucket}/run/1/00000.tar")
    with fs.open_input_stream(path) as f:
        assert f.read() == b"tar-bytes"
