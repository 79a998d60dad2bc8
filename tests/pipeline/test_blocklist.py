"""Blocklists: list formats, validation messages, exact and PDQ matching against references."""

from __future__ import annotations

import hashlib
import io
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.blocklist import (
    BlocklistError,
    BlocklistSpec,
    DigestSet,
    PdqIndex,
    append_to_output,
    chunk_masks,
    get_blocklist,
    load,
    normalize_url,
    pdq_distance,
    pdq_of,
)
from pipeline.config import BlocklistConfig, StorageConfig
from testkit import synthetic as syn


@pytest.mark.parametrize(
    "a,b",
    [
        ("HTTP://Example.COM/a.jpg", "http://example.com/a.jpg"),
        ("http://example.com:80/a.jpg", "http://example.com/a.jpg"),
        ("https://example.com:443/a.jpg?x=1#frag", "https://example.com/a.jpg?x=1"),
        ("  http://example.com/a.jpg \n", "http://example.com/a.jpg"),
        ("http://example.com:8080/A.jpg", "http://example.com:8080/A.jpg"),  # path case kept
    ],
)
def test_normalize_url(a: str, b: str) -> None:
    assert normalize_url(a) == b


def test_digest_set_agrees_with_a_python_set() -> None:
    rng = random.Random(1)
    entries = [rng.randbytes(20) for _ in range(5000)]
    ds = DigestSet.build(20, [(0, bytearray(b"".join(entries[:2500]))), (1, bytearray(b"".join(entries[2500:])))])
    assert len(ds) == 5000
    for i, e in enumerate(entries[::97]):
        assert ds.find(e) == (0 if i * 97 < 2500 else 1)
    for _ in range(500):
        assert ds.find(rng.randbytes(20)) is None
    # Trailing zero bytes must not make two digests equal (numpy's S dtype pads with them).
    z = DigestSet.build(4, [(0, bytearray(b"ab\x00\x00"))])
    assert z.find(b"ab\x00\x00") == 0 and z.find(b"ab\x00\x01") is None


def _flip(h: bytes, bits: list[int]) -> bytes:
    b = bytearray(h)
    for k in bits:
        b[k // 8] ^= 1 << (k % 8)
    return bytes(b)


def test_pdq_index_finds_exactly_what_brute_force_finds() -> None:
    """Multi-index lookups against a brute-force Hamming scan (Python ints) for queries at
    every distance around the threshold, including bits spread so each chunk differs."""
    rng = random.Random(7)
    hashes = [rng.randbytes(32) for _ in range(3000)]
    index = PdqIndex.build([(0, bytearray(b"".join(hashes)))])
    masks = chunk_masks(31)
    ints = [int.from_bytes(h, "big") for h in hashes]
    for trial in range(300):
        src = hashes[rng.randrange(len(hashes))]
        d = rng.choice([0, 1, 15, 16, 30, 31, 32, 33, 40, 120])
        q = _flip(src, rng.sample(range(256), d))
        qi = int.from_bytes(q, "big")
        best = min(int.bit_count(qi ^ x) for x in ints)
        got = index.nearest(q, 31, masks)
        if best <= 31:
            assert got is not None and got[1] == best, (trial, d, best, got)
        else:
            assert got is None, (trial, d, best, got)
    # One flipped bit in each of the 16 chunks (16 bits away) is still found.
    spread = _flip(hashes[0], [16 * c + 3 for c in range(16)])
    assert index.nearest(spread, 31, masks) == (0, 16)


def test_pdq_of_matches_a_recompressed_copy_and_not_other_scenes() -> None:
    scenes = syn.sample_scenes(6, 11)
    pics = [syn.render(s, (480, 360)) for s in scenes]
    hashes = [pdq_of(p) for p in pics]
    for p, h in zip(pics, hashes, strict=True):
        buf = io.BytesIO()
        p.resize((300, 225)).save(buf, "JPEG", quality=40)
        again = pdq_of(Image.open(buf).convert("RGB"))
        assert pdq_distance(h, again) <= 31
    for i in range(len(hashes)):
        for j in range(i):
            assert pdq_distance(hashes[i], hashes[j]) > 31


def _write(path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_text_lists_load_comments_and_tool_formats(tmp_path) -> None:
    data = b"some image bytes"
    sha = hashlib.sha256(data).hexdigest()
    md5 = hashlib.md5(data).hexdigest()
    cfg = BlocklistConfig(
        sha256=(_write(tmp_path / "a.txt", ["# header", "", f"{sha.upper()}  picture.jpg"]),),
        md5=("csam=" + _write(tmp_path / "m.csv", [f"{md5},42"]),),
        urls=(_write(tmp_path / "u.txt", ["https://Example.com/x.jpg"]),),
        domains=(_write(tmp_path / "d.txt", ["*.bad.example", "worse.example."]),),
    )
    bl = load(cfg, StorageConfig())
    assert bl.check_bytes(data) == ("csam", "md5")  # md5 is checked first
    assert bl.check_bytes(b"other") is None
    assert bl.check_url("https://example.com/x.jpg#f") == ("u", "url")
    assert bl.check_url("http://a.b.bad.example/y.png") == ("d", "domain")
    assert bl.check_url("http://worse.example/z.png") == ("d", "domain")
    assert bl.check_url("http://notbad.example/z.png") is None
    assert bl.counts[("sha256", "a")] == 1


def test_parquet_lists_hex_and_binary(tmp_path) -> None:
    digests = [hashlib.sha1(bytes([i])).digest() for i in range(10)]
    pq.write_table(pa.table({"sha1": [d.hex() for d in digests[:5]]}), tmp_path / "hex.parquet")
    pq.write_table(pa.table({"blob": pa.array(digests[5:], pa.binary())}), tmp_path / "bin.parquet")
    bl = load(BlocklistConfig(sha1=(str(tmp_path / "hex.parquet"), str(tmp_path / "bin.parquet"))), StorageConfig())
    for i in range(10):
        assert bl.check_bytes(bytes([i])) is not None
    assert bl.check_bytes(b"\xff") is None


def test_lists_on_s3(s3_server, s3_bucket) -> None:
    pic = syn.render(syn.sample_scenes(1, 3)[0], (200, 160))
    h = pdq_of(pic).hex()
    s3_server.client().put_object(Bucket=s3_bucket, Key="lists/pdq.txt", Body=f"{h}\n".encode())
    spec = BlocklistSpec(BlocklistConfig(pdq=(f"ncmec=s3://{s3_bucket}/lists/pdq.txt",)))
    bl = get_blocklist(spec)
    assert bl is not None and bl.check_pdq(pdq_of(pic.resize((150, 120)))) == ("ncmec", "pdq")
    assert get_blocklist(spec) is bl  # loaded once per process


@pytest.mark.parametrize(
    "kind,lines,message",
    [
        ("sha256", ["a" * 64, "b" * 63], "bad.txt:2: a sha256 has 64 hex digits, got 63"),
        ("md5", ["# c", "", "z" * 32], "bad.txt:3: md5 entry b'" + "z" * 32),
        ("pdq", ["0" * 64, "1" * 66], "bad.txt:2: a PDQ hash has 64 hex digits, got 66"),
        ("urls", ["http://a.example/x", "not a url"], "bad.txt:2: 'not' is not a URL"),
        ("domains", ["ok.example", "http://x.example/"], "bad.txt:2: 'http://x.example/' is not a host name"),
    ],
)
def test_bad_lists_name_file_and_line(tmp_path, kind: str, lines: list[str], message: str) -> None:
    cfg = BlocklistConfig(**{kind: (_write(tmp_path / "bad.txt", lines),)})
    with pytest.raises(BlocklistError) as e:
        load(cfg, StorageConfig())
    assert message in str(e.value) and str(tmp_path / "bad.txt") in str(e.value)
    assert "\n" not in str(e.value)


def test_unreadable_and_malformed_files(tmp_path) -> None:
    with pytest.raises(BlocklistError, match=r"missing\.txt: no such sha256 list"):
        load(BlocklistConfig(sha256=(str(tmp_path / "missing.txt"),)), StorageConfig())
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(BlocklistError, match=r"broken\.parquet: cannot read the md5 list"):
        load(BlocklistConfig(md5=(str(tmp_path / "broken.parquet"),)), StorageConfig())
    pq.write_table(pa.table({"a": ["x"], "b": ["y"]}), tmp_path / "two.parquet")
    with pytest.raises(BlocklistError, match="needs a column named 'sha1'"):
        load(BlocklistConfig(sha1=(str(tmp_path / "two.parquet"),)), StorageConfig())
    pq.write_table(pa.table({"md5": ["0" * 32, "0" * 31]}), tmp_path / "short.parquet")
    with pytest.raises(BlocklistError, match=r"short\.parquet:row 2: an md5 has 32 hex digits, got 31"):
        load(BlocklistConfig(md5=(str(tmp_path / "short.parquet"),)), StorageConfig())


def test_output_blocklist_roundtrip(tmp_path) -> None:
    out = str(tmp_path / "run1")
    data = b"taken down"
    added = append_to_output(out, {"url": ["http://h.example/a.jpg"], "sha256": [hashlib.sha256(data).hexdigest()]},
                             note="takedown DMCA-1")
    assert added == {"url": 1, "sha256": 1}
    again = append_to_output(out, {"url": ["http://h.example/a.jpg"], "sha256": []})
    assert again == {"url": 0, "sha256": 0}
    # A later job that writes (or names) that output applies its list; a missing one is fine.
    bl = load(BlocklistConfig(outputs=(out, str(tmp_path / "never-taken-down"))), StorageConfig())
    assert bl.check_url("http://h.example/a.jpg") == (f"takedowns:{out}", "url")
    assert bl.check_bytes(data) == (f"takedowns:{out}", "sha256")


def test_memory_is_bytes_per_entry() -> None:
    rng = np.random.default_rng(0)
    n = 20000
    sha = bytearray(rng.integers(0, 256, n * 32, dtype=np.uint8).tobytes())
    assert DigestSet.build(32, [(0, sha)]).nbytes == n * (32 + 2)
    assert PdqIndex.build([(0, sha)]).nbytes == n * (32 + 2 + 16 * 4) + 16 * 65537 * 8
