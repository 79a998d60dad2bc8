"""Hostile image bytes for fuzzing the decode stage (tests/pipeline/test_decode_fuzz.py and
bench/fuzz_decode.py share this generator).

:func:`hostile_case` turns a ``random.Random`` into one ``(kind, bytes)`` case: a real or
generated image, mutated by bit flips, truncation, header splices, random bodies behind a
valid magic prefix, or width/height fields patched to huge values. The same seed always gives
the same bytes, so a crash found by the benchmark replays from its seed.
"""

from __future__ import annotations

import hashlib
import io
import random
import struct
import zlib
from collections.abc import Callable
from functools import lru_cache

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline import schema as S
from pipeline.config import DecodeConfig
from testkit.testdata import PHOTOS_DIR

TESTDATA = PHOTOS_DIR

MAGICS: tuple[bytes, ...] = (
    b"\xff\xd8\xff",
    b"\xff\xd8\xff\xe0\x00\x10JFIF\x00",
    b"\x89PNG\r\n\x1a\n",
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
    b"GIF87a",
    b"GIF89a",
    b"RIFF\x00\x00\x00\x00WEBPVP8 ",
    b"RIFF\xff\xff\xff\x7fWEBPVP8L",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
)


def _save(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


@lru_cache(maxsize=1)
def seed_images() -> tuple[tuple[str, bytes], ...]:
    """Valid images to mutate: the shared test photos (JPEG) plus small generated files in
    every allowed format and several modes (RGBA, palette with transparency, 16-bit grey,
    animated GIF, CMYK JPEG, EXIF-rotated JPEG)."""
    seeds: list[tuple[str, bytes]] = []
    if TESTDATA.is_dir():
        seeds += [(f"jpeg:{p.name}", p.read_bytes()) for p in sorted(TESTDATA.glob("*.jpg"))]
    grad = Image.linear_gradient("L").resize((48, 32))
    rgb = Image.merge("RGB", (grad, grad.rotate(90, expand=False), grad.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(grad)
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    exif = Image.Exif()
    exif[0x0112] = 6
    frames = [rgb.convert("P"), rgb.rotate(180).convert("P")]
    seeds += [
        ("png:rgb", _save(rgb, "PNG")),
        ("png:rgba", _save(rgba, "PNG")),
        ("png:palette", _save(pal, "PNG", transparency=0)),
        ("png:i16", _save(Image.fromarray(np.asarray(grad).astype(np.uint16) * 257), "PNG")),
        ("gif:animated", _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)),
        ("webp:rgb", _save(rgb, "WEBP", quality=80)),
        ("webp:rgba", _save(rgba, "WEBP", lossless=True)),
        ("bmp:rgb", _save(rgb, "BMP")),
        ("tiff:rgb", _save(rgb, "TIFF")),
        ("tiff:deflate", _save(rgb, "TIFF", compression="tiff_adobe_deflate")),
        ("jpeg:cmyk", _save(rgb.convert("CMYK"), "JPEG")),
        ("jpeg:exif6", _save(rgb, "JPEG", exif=exif)),
        ("jpeg:progressive", _save(rgb, "JPEG", progressive=True)),
    ]
    return tuple(seeds)


def _bit_flips(rng: random.Random, data: bytes) -> bytes:
    if not data:
        return data
    b = bytearray(data)
    # Mostly a few flips (parsers fail on subtle damage); sometimes a burst in the header.
    span = min(len(b), 512) if rng.random() < 0.5 else len(b)
    for _ in range(rng.choice((1, 2, 4, 16, 64))):
        i = rng.randrange(span)
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def _truncate(rng: random.Random, data: bytes) -> bytes:
    if len(data) < 2:
        return data
    return data[: rng.randrange(1, len(data))]


def _splice(rng: random.Random, data: bytes) -> bytes:
    _, other = rng.choice(seed_images())
    cut = rng.randrange(1, max(2, min(len(data), 2048)))
    return data[:cut] + other[rng.randrange(len(other)) :]


def _magic_random(rng: random.Random, data: bytes) -> bytes:
    return rng.choice(MAGICS) + rng.randbytes(rng.choice((0, 1, 7, 64, 1024, 20_000)))


def _chunk_copy(rng: random.Random, data: bytes) -> bytes:
    # Repeat or delete a slice: duplicated markers, chunks and frames.
    if not data:
        return data
    i = rng.randrange(len(data))
    j = min(len(data), i + rng.randrange(1, 4096))
    return data[:i] + data[i:j] * rng.choice((0, 2, 3)) + data[j:]


def _huge(rng: random.Random) -> int:
    return rng.choice((0, 1, 65535, 40_000, 2**15, 2**31 - 1, 2**32 - 1, rng.randrange(1, 2**32)))


def patch_dimensions(rng: random.Random, data: bytes) -> bytes:
    """Rewrite the width/height fields of a PNG IHDR (CRC fixed or not), JPEG SOFn, GIF screen
    and image descriptors, BMP info header or WebP VP8/VP8L header."""
    b = bytearray(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(b) >= 33:
        struct.pack_into(">II", b, 16, _huge(rng) & 0xFFFFFFFF, _huge(rng) & 0xFFFFFFFF)
        if rng.random() < 0.8:  # a correct CRC gets past Pillow's chunk check
            struct.pack_into(">I", b, 29, zlib.crc32(bytes(b[12:29])) & 0xFFFFFFFF)
    elif data[:3] == b"\xff\xd8\xff":
        i = 2
        while i + 9 < len(b):
            if b[i] != 0xFF:
                break
            marker = b[i + 1]
            seg = struct.unpack_from(">H", b, i + 2)[0]
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                struct.pack_into(">HH", b, i + 5, _huge(rng) & 0xFFFF, _huge(rng) & 0xFFFF)
                break
            i += 2 + seg
    elif data[:3] == b"GIF" and len(b) >= 10:
        struct.pack_into("<HH", b, 6, _huge(rng) & 0xFFFF, _huge(rng) & 0xFFFF)
        k = b.find(b"\x2c", 13)
        if k > 0 and k + 9 <= len(b):
            struct.pack_into("<HH", b, k + 5, _huge(rng) & 0xFFFF, _huge(rng) & 0xFFFF)
    elif data[:2] == b"BM" and len(b) >= 26:
        struct.pack_into("<ii", b, 18, rng.choice((-1, 1)) * (_huge(rng) & 0x7FFFFFFF), rng.choice((-1, 1)) * (_huge(rng) & 0x7FFFFFFF))
    elif data[:4] == b"RIFF" and len(b) >= 30:
        if b[12:16] == b"VP8 ":
            struct.pack_into("<HH", b, 26, _huge(rng) & 0x3FFF, _huge(rng) & 0x3FFF)
        elif b[12:16] == b"VP8L":
            struct.pack_into("<I", b, 21, _huge(rng) & 0xFFFFFFFF)
        elif b[12:16] == b"VP8X":
            b[24:30] = rng.randbytes(6)
    else:
        return _bit_flips(rng, data)
    return bytes(b)


MUTATIONS: dict[str, Callable[[random.Random, bytes], bytes]] = {
    "bit_flips": _bit_flips,
    "truncate": _truncate,
    "splice": _splice,
    "magic_random": _magic_random,
    "chunk_copy": _chunk_copy,
    "patch_dimensions": patch_dimensions,
}


def hostile_case(rng: random.Random) -> tuple[str, bytes]:
    """One fuzz case: ``(kind, data)``, kind naming the seed image and the mutation applied.

    About one case in ten is an unmodified seed, so ok rows are exercised as well.
    """
    name, data = rng.choice(seed_images())
    if rng.random() < 0.1:
        return f"{name}+none", data
    mutation = rng.choice(sorted(MUTATIONS))
    out = MUTATIONS[mutation](rng, data)
    if rng.random() < 0.2:  # stack a second mutation now and then
        second = rng.choice(sorted(MUTATIONS))
        out = MUTATIONS[second](rng, out) if out else out
        mutation = f"{mutation}+{second}"
    return f"{name}+{mutation}", out


# Small caps keep one example cheap: a patched header may claim anything up to 4 Mpx.
FUZZ_PIXELS = 4_000_000


def fuzz_config(rng: random.Random) -> DecodeConfig:
    """A DecodeConfig drawn from the settings that change the decode path."""
    return DecodeConfig(
        image_size=rng.choice((16, 48, 96)),
        resize_mode=rng.choice(("no", "border", "center_crop", "keep_ratio")),
        resize_only_if_bigger=rng.random() < 0.3,
        encode_format=rng.choice(("jpg", "png", "webp")),
        min_image_size=rng.choice((0, 0, 8)),
        max_aspect_ratio=rng.choice((float("inf"), 3.0)),
        max_image_pixels=FUZZ_PIXELS,
        max_frames=rng.choice((1, 1000)),
    )


def check_decoded(inp: pa.Table, out: pa.Table) -> None:
    """The fuzz invariants; raises AssertionError naming the broken one."""
    assert out.num_rows == inp.num_rows
    assert out.column(S.KEY).to_pylist() == inp.column(S.KEY).to_pylist()
    for before, row in zip(inp.to_pylist(), out.to_pylist(), strict=True):
        if before[S.STATUS] != S.OK:
            assert (row[S.STATUS], row[S.ERROR]) == (before[S.STATUS], before[S.ERROR])
            assert row[S.IMAGE] is None
            continue
        if row[S.STATUS] != S.OK:
            assert row[S.STATUS] in S.DECODE_STATUSES, row[S.STATUS]
            assert isinstance(row[S.ERROR], str) and row[S.ERROR], row
            assert row[S.IMAGE] is None and row[S.SHA256] is None
            continue
        data = row[S.IMAGE]
        assert data, row[S.KEY]
        assert hashlib.sha256(data).hexdigest() == row[S.SHA256]
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            assert im.size == (row[S.WIDTH], row[S.HEIGHT])
            assert im.format == {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[row[S.IMAGE_FORMAT]]
        assert row[S.ORIGINAL_WIDTH] > 0 and row[S.ORIGINAL_HEIGHT] > 0


def fuzz_batch(cases: list[bytes | None]) -> pa.Table:
    """Rows for DecodeStage: one ``ok`` row per case plus one row a previous stage failed."""
    n = len(cases) + 1
    return pa.table(
        {
            S.KEY: [f"{i:09d}" for i in range(n)],
            S.STATUS: [S.OK] * len(cases) + ["http_404"],
            S.ERROR: [None] * len(cases) + ["404 Not Found"],
            S.IMAGE_BYTES: pa.array([*cases, None], pa.binary()),
        }
    )
