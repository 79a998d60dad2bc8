"""Fuzz DecodeStage with mutated images (issue 7, acceptance 4; the long run is bench/fuzz_decode.py).

Whatever the bytes, process_batch must not raise, must return one row per row in, must give
each failed row a decode status and a reason, and must store for each ok row bytes that Pillow
re-opens at the recorded size, with the recorded sha256.
"""

from __future__ import annotations

import io
import random
import struct
import zlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline import schema as S
from pipeline.config import DecodeConfig
from pipeline.stages.decode import DecodeStage
from testkit.hostile_images import (
    FUZZ_PIXELS,
    check_decoded,
    fuzz_batch,
    fuzz_config,
    hostile_case,
    patch_dimensions,
    seed_images,
)


@settings(
    max_examples=200,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.randoms(use_true_random=False), st.integers(1, 4))
def test_decode_never_raises_and_accounts_for_every_row(rng: random.Random, n: int) -> None:
    cases = [hostile_case(rng)[1] for _ in range(n)]
    batch = fuzz_batch(cases)
    out = DecodeStage(cfg=fuzz_config(rng)).process_batch(batch)
    check_decoded(batch, out)


def test_seeds_decode_and_patched_headers_are_refused_before_decoding() -> None:
    # The generator's seeds are valid images, so the fuzz test exercises the ok path too.
    seeds = [data for _, data in seed_images()]
    assert len(seeds) >= 13
    cfg = DecodeConfig(image_size=32, max_image_pixels=FUZZ_PIXELS)
    batch = fuzz_batch(seeds)
    out = DecodeStage(cfg=cfg).process_batch(batch)
    check_decoded(batch, out)
    assert out.column(S.STATUS).to_pylist() == [S.OK] * len(seeds) + ["http_404"]

    # A PNG claiming 65535 x 65535 with a valid CRC: refused from the header, sizes named.
    png = next(d for name, d in seed_images() if name == "png:rgb")
    big = bytearray(png)
    struct.pack_into(">II", big, 16, 65535, 65535)
    struct.pack_into(">I", big, 29, zlib.crc32(bytes(big[12:29])))
    # A JPEG whose SOF claims 60000 x 60000.
    rng = random.Random(0)
    patched = [patch_dimensions(rng, d) for _, d in seed_images()]
    batch = fuzz_batch([bytes(big), *patched])
    out = DecodeStage(cfg=cfg).process_batch(batch)
    check_decoded(batch, out)
    assert out.column(S.STATUS)[0].as_py() == "too_many_pixels"
    assert str(65535 * 65535) in out.column(S.ERROR)[0].as_py()
    statuses = out.column(S.STATUS).to_pylist()[1:-1]
    assert sum(s != S.OK for s in statuses) >= len(patched) // 2, statuses


def test_upscaling_a_thin_image_is_refused_before_resizing() -> None:
    # Found by bench/fuzz_decode.py: a JPEG whose SOF was patched to 65535 x 1 passed the
    # header check (65535 px), then keep_ratio scaled its shortest side up to image_size and
    # built a 138-megapixel image. A 4000 x 1 PNG is 90 bytes; at image_size 256 keep_ratio and
    # center_crop would resize it to 1024000 x 256 (262 Mpx, ~790 MB of RGB).
    buf = io.BytesIO()
    Image.new("L", (4000, 1), 128).save(buf, "PNG")
    thin = buf.getvalue()
    assert len(thin) < 200
    for mode in ("keep_ratio", "center_crop"):
        cfg = DecodeConfig(image_size=256, resize_mode=mode)
        batch = fuzz_batch([thin])
        out = DecodeStage(cfg=cfg).process_batch(batch)
        check_decoded(batch, out)
        assert out.column(S.STATUS)[0].as_py() == "too_many_pixels"
        assert "4000x1 resized to 1024000x256" in out.column(S.ERROR)[0].as_py()
    # border scales the longest side, so the same file is a legitimate 256 x 256 image.
    out = DecodeStage(cfg=DecodeConfig(image_size=256, resize_mode="border")).process_batch(fuzz_batch([thin]))
    assert out.column(S.STATUS)[0].as_py() == S.OK
    assert (out.column(S.WIDTH)[0].as_py(), out.column(S.HEIGHT)[0].as_py()) == (256, 256)
