"""DecodeStage: format sniffing, header checks, colour handling, resize parity with img2dataset."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.config import DecodeConfig
from pipeline.stages.decode import (
    DecodeStage,
    RowFailure,
    count_gif_frames,
    decode_image,
    sniff_format,
)
from testkit.http_server import bomb_gif, bomb_png
from testkit.testdata import photos

# img2dataset (the reference) imports imghdr and passes a deprecated albumentations argument.
pytestmark = pytest.mark.filterwarnings(
    "ignore:'imghdr' is deprecated:DeprecationWarning",
    "ignore:value is deprecated, use fill instead:DeprecationWarning",
)

PHOTOS = photos()


def _encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


@functools.cache
def _photo_inputs() -> list[tuple[str, bytes]]:
    """The real test photos, plus each upscaled to a 1200 px long side (bench-sized)."""
    out = []
    for p in PHOTOS:
        data = p.read_bytes()
        out.append((p.name, data))
        im = Image.open(io.BytesIO(data)).convert("RGB")
        k = 1200 / max(im.size)
        big = im.resize((round(im.width * k), round(im.height * k)), Image.Resampling.BICUBIC)
        out.append((f"{p.name}@1200", _encode(big, "JPEG", quality=95)))
    return out


@pytest.mark.parametrize("mode", ["border", "center_crop", "keep_ratio", "no"])
@pytest.mark.parametrize("only_if_bigger", [False, True])
def test_resize_matches_img2dataset_resizer(mode: str, only_if_bigger: bool) -> None:
    from img2dataset.resizer import Resizer

    assert PHOTOS, "test photos missing"
    size = 256
    # PNG on both sides so the comparison measures resizing, not JPEG re-encoding.
    ref_resizer = Resizer(size, mode, only_if_bigger, encode_format="png", encode_quality=1)
    cfg = DecodeConfig(image_size=size, resize_mode=mode, resize_only_if_bigger=only_if_bigger, encode_format="png")
    # Mode "no" only re-encodes: the small originals are enough and PNG-encoding 1200 px is slow.
    inputs = [x for x in _photo_inputs() if mode != "no" or "@" not in x[0]]
    for name, data in inputs:
        ref, w, h, ow, oh, err = ref_resizer(io.BytesIO(data))
        assert err is None, err
        ours = decode_image(data, cfg)
        assert (ours.width, ours.height, ours.original_width, ours.original_height) == (w, h, ow, oh), name
        psnr = _psnr(_pixels(ref), _pixels(ours.data))
        assert psnr >= 35.0, f"{name} {mode}: PSNR {psnr:.1f} dB"


def test_small_image_upscaled_and_padded_like_img2dataset() -> None:
    from img2dataset.resizer import Resizer

    rng = np.random.default_rng(0)
    # Smooth content (a gradient plus low noise) so Lanczos variants agree closely.
    y, x = np.mgrid[0:90, 0:60]
    arr = np.stack([x * 4, y * 2, (x + y) * 1.5], axis=-1) + rng.normal(0, 2, (90, 60, 3))
    data = _encode(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), "PNG")
    ref, w, h, *_ = Resizer(128, "border", False, encode_format="png", encode_quality=1)(io.BytesIO(data))
    ours = decode_image(data, DecodeConfig(image_size=128, resize_mode="border", encode_format="png"))
    assert (ours.width, ours.height) == (w, h) == (128, 128)
    got, want = _pixels(ours.data), _pixels(ref)
    # Padding is white and in the same columns: 85 px wide image centred in 128 -> 21 + 22.
    assert np.all(got[:, :21] == 255) and np.all(want[:, :21] == 255)
    assert np.all(got[:, 128 - 22 :] == 255)
    assert _psnr(got, want) >= 35.0


def test_resize_only_if_bigger_keeps_small_images() -> None:
    data = _encode(Image.new("RGB", (100, 50), (10, 20, 30)), "PNG")
    img = decode_image(data, DecodeConfig(image_size=256, resize_mode="border", resize_only_if_bigger=True))
    assert (img.width, img.height) == (100, 50)
    img = decode_image(data, DecodeConfig(image_size=256, resize_mode="center_crop"))
    assert (img.width, img.height) == (256, 256)


def test_sniffing_ignores_extension_and_checks_allowlist() -> None:
    im = Image.new("RGB", (40, 30), (200, 10, 10))
    assert sniff_format(_encode(im, "PNG")) == "png"
    assert sniff_format(_encode(im, "JPEG")) == "jpeg"
    assert sniff_format(_encode(im, "GIF")) == "gif"
    assert sniff_format(_encode(im, "WEBP")) == "webp"
    assert sniff_format(_encode(im, "BMP")) == "bmp"
    assert sniff_format(_encode(im, "TIFF")) == "tiff"
    assert sniff_format(b"<!doctype html><html>") is None
    with pytest.raises(RowFailure) as e:
        decode_image(b"<html>not an image</html>", DecodeConfig())
    assert e.value.status == "unsupported_format"
    with pytest.raises(RowFailure) as e:
        decode_image(_encode(im, "BMP"), DecodeConfig(allowed_formats=("jpeg", "png")))
    assert e.value.status == "unsupported_format"
    # A GIF is decoded as a GIF whatever the server said; the result is our re-encoded JPEG.
    out = decode_image(_encode(im, "GIF"), DecodeConfig(image_size=40))
    assert out.image_format == "jpg" and out.data[:3] == b"\xff\xd8\xff"


def test_alpha_is_composited_onto_white() -> None:
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # fully transparent red
    rgba.paste((0, 0, 255, 255), (0, 0, 32, 64))  # opaque blue left half
    rgba.paste((0, 0, 0, 128), (32, 0, 64, 64))  # half-transparent black right half
    cfg = DecodeConfig(image_size=64, resize_mode="no", encode_format="png")
    px = _pixels(decode_image(_encode(rgba, "PNG"), cfg).data)
    assert np.array_equal(px[10, 10], [0, 0, 255])
    # img2dataset's formula: a/255 * rgb + 255 - a = 255 - 128 = 127 (Pillow rounds to 127).
    assert np.all(np.abs(px[10, 50] - 127) <= 1)
    la = Image.new("LA", (8, 8), (0, 0))
    assert np.all(_pixels(decode_image(_encode(la, "PNG"), cfg).data) == 255)
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.info["transparency"] = 0
    assert np.all(_pixels(decode_image(_encode(pal, "PNG", transparency=0), cfg).data) == 255)


def test_cmyk_and_16bit_and_grey_become_8bit_rgb() -> None:
    cfg = DecodeConfig(image_size=16, resize_mode="no", encode_format="png")
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    px = _pixels(decode_image(_encode(cmyk, "JPEG", quality=100), cfg).data)
    assert px[8, 8, 0] > 240 and px[8, 8, 1] < 15 and px[8, 8, 2] < 15
    arr16 = np.zeros((16, 16), np.uint16)
    arr16[:, :8] = 65535
    arr16[:, 8:] = 32896  # 128 * 257
    im16 = Image.frombytes("I;16", (16, 16), arr16.astype("<u2").tobytes())
    px = _pixels(decode_image(_encode(im16, "PNG"), cfg).data)
    assert np.all(px[:, :8] == 255) and np.all(px[:, 8:] == 128)
    grey = Image.new("L", (16, 16), 77)
    img = decode_image(_encode(grey, "PNG"), cfg)
    assert Image.open(io.BytesIO(img.data)).mode == "RGB"
    assert np.all(_pixels(img.data) == 77)


def test_exif_orientation_is_applied() -> None:
    # 40 wide x 20 tall, left half red; orientation 6 = display rotated 90 degrees clockwise.
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(im, "JPEG", quality=95, exif=exif.tobytes())
    out = decode_image(data, DecodeConfig(image_size=40, resize_mode="no", encode_format="png"))
    assert (out.original_width, out.original_height) == (20, 40)
    assert (out.width, out.height) == (20, 40)
    px = _pixels(out.data)
    # After a clockwise turn, the stored left half is the displayed top half.
    assert px[5, 10, 0] > 200 and px[35, 10, 2] > 200


def test_a_stored_file_carries_no_metadata_of_the_download() -> None:
    # Already at the stored size, the picture reaches the encoder untouched: Pillow would
    # copy a JPEG's comment and a PNG's ICC profile from the source into the stored file.
    rng = np.random.default_rng(11)
    im = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x8825] = {0x0002: (48.0, 51.0, 0.0)}  # a GPS latitude
    for fmt, enc, kw in [("JPEG", "jpg", {"comment": b"secret", "exif": exif.tobytes(), "icc_profile": b"\0" * 64}),
                         ("PNG", "png", {"icc_profile": b"\0" * 64, "exif": exif.tobytes()}),
                         ("PNG", "webp", {"icc_profile": b"\0" * 64})]:
        data = _encode(im, fmt, **kw)
        out = decode_image(data, DecodeConfig(image_size=32, encode_format=enc))
        assert (out.width, out.height) == (32, 32)
        stored = Image.open(io.BytesIO(out.data))
        assert not {"comment", "exif", "icc_profile", "xmp"} & set(stored.info), (fmt, enc, stored.info)
        assert b"secret" not in out.data


def test_first_frame_of_animation_and_frame_cap() -> None:
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50)
    data = buf.getvalue()
    assert count_gif_frames(data, 100) == 3
    px = _pixels(decode_image(data, DecodeConfig(image_size=32, resize_mode="no", encode_format="png")).data)
    assert px[16, 16, 0] > 240 and px[16, 16, 1] < 15
    with pytest.raises(RowFailure) as e:
        decode_image(data, DecodeConfig(max_frames=2))
    assert e.value.status == "too_many_frames"


def test_bombs_are_refused_from_the_header() -> None:
    with pytest.raises(RowFailure) as e:
        decode_image(bomb_png(), DecodeConfig())
    assert e.value.status == "too_many_pixels"
    assert count_gif_frames(bomb_gif(), 1000) == 1001  # counting stops past the limit
    with pytest.raises(RowFailure) as e:
        decode_image(bomb_gif(), DecodeConfig())
    assert e.value.status == "too_many_frames"
    # Just above our cap but far below Pillow's own guard: our check decides.
    data = _encode(Image.new("1", (3000, 3000)), "PNG")
    with pytest.raises(RowFailure) as e:
        decode_image(data, DecodeConfig(max_image_pixels=8_999_999))
    assert e.value.status == "too_many_pixels"


def test_truncated_and_corrupt_files_are_recorded() -> None:
    photo = PHOTOS[0].read_bytes()
    with pytest.raises(RowFailure) as e:
        decode_image(photo[: len(photo) // 2], DecodeConfig())
    assert e.value.status == "truncated"
    corrupt = photo[:200] + bytes(range(256)) * 8
    with pytest.raises(RowFailure) as e:
        decode_image(corrupt, DecodeConfig())
    assert e.value.status in ("decode_error", "truncated")
    png = _encode(Image.new("RGB", (50, 50), (1, 2, 3)), "PNG")
    with pytest.raises(RowFailure) as e:
        decode_image(png[:60], DecodeConfig())
    assert e.value.status in ("decode_error", "truncated")


def test_size_and_aspect_filters() -> None:
    data = _encode(Image.new("RGB", (300, 30), (9, 9, 9)), "PNG")
    with pytest.raises(RowFailure) as e:
        decode_image(data, DecodeConfig(min_image_size=31))
    assert e.value.status == "too_small"
    with pytest.raises(RowFailure) as e:
        decode_image(data, DecodeConfig(max_aspect_ratio=9.9))
    assert e.value.status == "bad_aspect_ratio"
    assert decode_image(data, DecodeConfig(min_image_size=30, max_aspect_ratio=10)).width == 256


@pytest.mark.parametrize("fmt,magic", [("jpg", b"\xff\xd8\xff"), ("png", b"\x89PNG"), ("webp", b"RIFF")])
def test_output_formats_and_sha256(fmt: str, magic: bytes) -> None:
    data = PHOTOS[0].read_bytes()
    out = decode_image(data, DecodeConfig(image_size=64, encode_format=fmt))
    assert out.data.startswith(magic)
    assert out.image_format == fmt
    assert out.sha256 == hashlib.sha256(out.data).hexdigest()
    assert Image.open(io.BytesIO(out.data)).size == (64, 64)


def test_stage_one_row_per_row_and_passes_failures_through() -> None:
    good = PHOTOS[1].read_bytes()
    batch = pa.table(
        {
            "key": ["a", "b", "c", "d", "e"],
            "status": ["ok", "http_404", "ok", "ok", "ok"],
            "error": [None, "HTTP 404", None, None, None],
            "image_bytes": pa.array([good, None, b"junk", good[:300], bomb_png()], pa.binary()),
            "extra": [1, 2, 3, 4, 5],
        }
    )
    previous = Image.MAX_IMAGE_PIXELS
    out = DecodeStage(cfg=DecodeConfig(image_size=64)).process_batch(batch)
    assert Image.MAX_IMAGE_PIXELS == previous  # the process-wide guard is restored
    assert out.num_rows == 5
    assert "image_bytes" not in out.column_names
    assert out.column("key").to_pylist() == ["a", "b", "c", "d", "e"]
    assert out.column("extra").to_pylist() == [1, 2, 3, 4, 5]
    assert out.column("status").to_pylist() == [
        "ok",
        "http_404",
        "unsupported_format",
        "truncated",
        "too_many_pixels",
    ]
    assert out.column("error").to_pylist()[1] == "HTTP 404"
    images = out.column("image").to_pylist()
    assert images[0] is not None and all(v is None for v in images[1:])
    assert out.column("width").to_pylist()[0] == 64
    assert out.schema.field("width").type == pa.int32()
    assert out.column("sha256").to_pylist()[0] == hashlib.sha256(images[0]).hexdigest()


@pytest.mark.parametrize("isolate", [True, False])
def test_stage_blocks_a_picture_on_a_pdq_list_before_storing_it(tmp_path, isolate: bool) -> None:
    """A re-encoded, resized copy of a listed picture is blocked by PDQ; its row keeps no
    image, size, hash or PDQ; other pictures get their PDQ hash recorded."""
    from pipeline.blocklist import BlocklistSpec, pdq_distance, pdq_of
    from pipeline.config import BlocklistConfig
    from testkit import synthetic as syn

    listed, other = (syn.render(s, (640, 480)) for s in syn.sample_scenes(2, 5))
    (tmp_path / "pdq.txt").write_text(pdq_of(listed).hex() + "\n")
    copy = io.BytesIO()
    listed.resize((500, 375)).save(copy, "JPEG", quality=50)
    fine = io.BytesIO()
    other.save(fine, "PNG")
    batch = pa.table({
        "status": ["ok", "ok"], "error": pa.nulls(2, pa.string()),
        "image_bytes": pa.array([copy.getvalue(), fine.getvalue()], pa.binary()),
        "source_sha256": ["aa" * 32, "bb" * 32],
    })
    spec = BlocklistSpec(BlocklistConfig(pdq=(f"hotlist={tmp_path / 'pdq.txt'}",)))
    out = DecodeStage(cfg=DecodeConfig(image_size=128), isolate=isolate, blocklist=spec).process_batch(batch).to_pylist()
    assert out[0]["status"] == "blocked" and "hotlist" in out[0]["error"] and "pdq" in out[0]["error"]
    assert all(out[0][c] is None for c in ("image", "width", "sha256", "pdq", "source_sha256"))
    assert out[1]["status"] == "ok" and out[1]["source_sha256"] == "bb" * 32
    assert pdq_distance(out[1]["pdq"], pdq_of(other)) <= 20 < pdq_distance(out[1]["pdq"], pdq_of(listed))


_MEMORY_PROBE = textwrap.dedent(
    """
    import io, json, resource, sys
    import pyarrow as pa
    from PIL import Image
    from pipeline.config import DecodeConfig
    from pipeline.stages.decode import DecodeStage
    from testkit.http_server import bomb_gif, bomb_png

    stage = DecodeStage(cfg=DecodeConfig())
    png, gif = bomb_png(), bomb_gif()
    warm = io.BytesIO()
    Image.new("RGB", (64, 64)).save(warm, "PNG")

    def run(blobs):
        batch = pa.table({
            "status": ["ok"] * len(blobs),
            "error": pa.nulls(len(blobs), pa.string()),
            "image_bytes": pa.array(blobs, pa.binary()),
        })
        return stage.process_batch(batch).column("status").to_pylist()

    run([warm.getvalue()])  # imports and plugin set-up count as baseline
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    statuses = run([png, gif])
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"statuses": statuses, "growth_kb": after - before}))
    """
)


def test_bombs_do_not_grow_worker_memory() -> None:
    # A fresh process so the peak RSS reflects only this work (ru_maxrss is in KiB on Linux).
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE], capture_output=True, text=True, timeout=120, check=True
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["statuses"] == ["too_many_pixels", "too_many_frames"]
    assert result["growth_kb"] < 200 * 1024, result


def test_jpeg_draft_keeps_1_25x_for_the_stored_copy_and_3x_for_the_model() -> None:
    from clip_model.config import PreprocessConfig
    from pipeline.stages.decode import _draft_request

    # A 1200 x 900 photo stored at 256 x 192 may be decoded down to 320 x 240 (libjpeg then
    # picks 1/2 scale, 600 x 450); a 224 px model needs 3 x 224 = 672 px on the short side.
    assert _draft_request(1200, 900, False, (256, 192), None) == (320, 240)
    assert _draft_request(1200, 900, False, (256, 192), PreprocessConfig(image_size=224)) == (896, 672)
    # EXIF-rotated files are drafted in their own orientation.
    assert _draft_request(900, 1200, True, (256, 192), None) == (240, 320)
    assert _draft_request(1200, 900, False, None, None) is None  # resize_mode "no"
    # 700 px: half is 350 >= 320, drafted; 600 px: half is 300 < 320, decoded whole.
    for size, decoded in (((1200, 900), (600, 450)), ((700, 525), (350, 263)), ((600, 450), (600, 450))):
        im = Image.open(io.BytesIO(_encode(Image.new("RGB", size, (30, 140, 200)), "JPEG", quality=90)))
        im.draft("RGB", _draft_request(*size, False, (256, 192), None))
        assert im.size == decoded
