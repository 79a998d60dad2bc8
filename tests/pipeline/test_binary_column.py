"""schema.binary_column: the same column pa.array builds, split below the 32-bit offset limit."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

from pipeline import schema as S


@pytest.mark.parametrize(
    "values",
    [[], [None], [b""], [None] * 5, [b"a", None, b"bc", b"", None, os.urandom(100_000), b"\x00" * 7]],
    ids=["empty", "null", "empty-bytes", "all-null", "mixed"],
)
def test_binary_column_equals_pa_array(values):
    got = S.binary_column(values)
    got.validate(full=True)
    assert got.type == pa.binary()
    assert got.equals(pa.chunked_array([pa.array(values, pa.binary())], pa.binary()))
    assert got.to_pylist() == values
    assert got.null_count == sum(v is None for v in values)


def test_binary_column_splits_chunks_below_the_limit(monkeypatch):
    monkeypatch.setattr(S, "_MAX_BINARY_CHUNK", 10)
    values = [b"aaaa", b"bbbb", None, b"cccc", b"dddddddddddd", b"e"]
    got = S.binary_column(values)
    got.validate(full=True)
    assert got.to_pylist() == values
    # a chunk closes before the value that would take it past 10 bytes; a value longer than
    # the limit fills a chunk alone
    assert [c.to_pylist() for c in got.chunks] == [[b"aaaa", b"bbbb", None], [b"cccc"], [b"dddddddddddd"], [b"e"]]
