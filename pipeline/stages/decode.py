"""Decode, check, resize and re-encode downloaded images (Pillow; torch's kernels resample).

Per row with ``status == "ok"``, in this order, stopping at the first failure:

1. Format from magic bytes, checked against ``DecodeConfig.allowed_formats`` (the server's
   Content-Type is not trusted) -> ``unsupported_format``.
2. Header only (``Image.open`` is lazy): width x height against ``max_image_pixels`` ->
   ``too_many_pixels``; frame count against ``max_frames`` (GIF frames are counted by walking
   the block structure, without decoding) -> ``too_many_frames``; ``min_image_size`` ->
   ``too_small``; ``max_aspect_ratio`` -> ``bad_aspect_ratio``. Nothing has been decoded yet,
   so a decompression bomb costs a few KB.
3. Decode: JPEG draft mode (DCT scaling while >= 1.25x the resize target), first
   frame only, EXIF orientation applied, alpha composited onto white, CMYK / 16-bit / palette /
   grey to 8-bit RGB. A cut-off file -> ``truncated``; anything else Pillow rejects ->
   ``decode_error``.
4. Resize exactly as img2dataset's ``Resizer`` defines the modes (sizes rounded the way
   albumentations' ``LongestMaxSize``/``SmallestMaxSize`` round them, padding and cropping
   offsets as ``PadIfNeeded``/``CenterCrop`` place them); antialiased bicubic when shrinking,
   by torch's SIMD uint8 kernel (as close to OpenCV's area filter as Pillow's Hamming, which
   costs ~4x the CPU: see ``_shrink``), Pillow's Lanczos when enlarging.
5. Re-encode (jpg with ``encode_quality``, png, or webp) and hash the stored bytes (sha256).
   A copy another output stored (the unpack stage) that already is what this step would store
   (a plain JPEG at ``encode_quality``, the same size, nothing resampled) is kept byte for
   byte instead (:func:`_keeps_stored_bytes`): re-curating an output loses no quality to a
   second JPEG pass.
6. Decode once: when the stage is given the embedding model's preprocessing
   (``model_input``), the model's uint8 input is made here, by the model's own
   ``resize_crop_uint8`` arithmetic (shortest side to S, centre crop; computed by torch's
   kernels, :func:`clip_model.transform.resize_crop_tensor_uint8`), from the same decoded
   pixels as the stored copy and before that copy is resized, padded and JPEG-encoded. So no image is
   decoded twice, and the model never sees the stored copy's border padding or its JPEG
   artefacts. The JPEG draft keeps >= 3x headroom for the model's input. With ``thumbnails`` a
   32 x 32 thumbnail of the model's square is made too (dedup's pixel check).

Steps 2-5 run in a crash-guard child process (pipeline/crashguard.py) unless the stage's
``isolate`` is off: a row whose bytes crash the decoder (a segfault in a C library) or hang it
past ``timeout_s`` is tried twice, then quarantined as ``worker_crash`` / ``decode_timeout``,
and the rest of the batch is decoded as usual.

Sizes reported: ``original_width/height`` are the image as displayed (after EXIF orientation;
img2dataset, reading with OpenCV's IMREAD_UNCHANGED, ignores orientation), ``width/height`` are
the stored image's.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import io
import math
import re
import warnings
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps

from clip_model.config import PreprocessConfig
from pipeline import schema as S
from pipeline.blocklist import DECODE_KINDS, BlocklistSpec, get_blocklist
from pipeline.config import DecodeConfig
from pipeline.crashguard import Crashed, shared_sandbox
from pipeline.stages.base import Resources, Stage
from pipeline.thumbnails import THUMB_SIDE

if TYPE_CHECKING:  # imported by the decode itself: this module loads in torch-free workers
    import torch

# Pillow plugin name for each allowlist name.
_PIL_FORMAT = {
    "jpeg": "JPEG",
    "png": "PNG",
    "gif": "GIF",
    "webp": "WEBP",
    "bmp": "BMP",
    "tiff": "TIFF",
}
_ORIENTATION_TAG = 0x0112
# A JPEG draft (DCT scaling) keeps at least this many pixels per pixel of the stored copy, and
# of the model's input; see _draft_request.
_STORE_DRAFT_HEADROOM = 1.25
_MODEL_DRAFT_HEADROOM = 3


class RowFailure(Exception):
    """A per-row failure: ``status`` is the row's new status, the message its ``error``."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


def sniff_format(data: bytes) -> str | None:
    """Image format from the first bytes (``"jpeg"``, ``"png"``, ...), or None if unknown."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return None


def count_gif_frames(data: bytes, limit: int) -> int:
    """Number of image descriptors in a GIF, counting at most ``limit + 1``.

    Walks the block structure (extensions and LZW data are skipped by their length bytes), so
    nothing is decompressed. A cut-off file returns the frames seen so far.
    """
    n = len(data)
    pos = 13
    if n < pos:
        return 0
    flags = data[10]
    if flags & 0x80:
        pos += 3 * (1 << ((flags & 0x07) + 1))

    def skip_sub_blocks(p: int) -> int:
        while p < n:
            size = data[p]
            p += 1
            if size == 0:
                return p
            p += size
        return n

    frames = 0
    while pos < n and frames <= limit:
        block = data[pos]
        if block == 0x3B:  # trailer
            break
        if block == 0x21:  # extension: label, then sub-blocks
            pos = skip_sub_blocks(pos + 2)
        elif block == 0x2C:  # image descriptor
            frames += 1
            if pos + 10 > n:
                break
            local = data[pos + 9]
            pos += 10
            if local & 0x80:
                pos += 3 * (1 << ((local & 0x07) + 1))
            pos = skip_sub_blocks(pos + 1)  # +1: LZW minimum code size
        else:
            break  # garbage: stop counting, the decoder will judge the first frame
    return frames


def _failure(e: Exception) -> RowFailure:
    # Pillow reports a cut-off file as OSError "image file is truncated" (while decoding) or
    # "Truncated File Read" (while parsing headers); everything else is a plain decode error.
    status = S.TRUNCATED if "truncated" in str(e).lower() else S.DECODE_ERROR
    return RowFailure(status, _describe(e))


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _describe(e: Exception) -> str:
    """``Type: message`` for a row's error, without object addresses (Pillow's "cannot
    identify image file <_io.BytesIO object at 0x7f...>"), so a row's error is the same on
    every run and in every process."""
    return _ADDRESS.sub("", f"{type(e).__name__}: {e}")[:300]


def _target_size(w: int, h: int, cfg: DecodeConfig) -> tuple[int, int] | None:
    """The resized (width, height) before padding/cropping, or None when no resize happens.

    Mirrors img2dataset: border scales the longest side to ``image_size``, keep_ratio and
    center_crop the shortest; with ``resize_only_if_bigger`` only images larger than the
    target are touched. New sizes are ``max(1, round(side * scale))`` (Python rounding, as
    albumentations does).
    """
    size = cfg.image_size
    if cfg.resize_mode == "no":
        return None
    ref = max(w, h) if cfg.resize_mode == "border" else min(w, h)
    if cfg.resize_only_if_bigger and ref <= size:
        return None
    scale = size / ref
    return max(1, round(w * scale)), max(1, round(h * scale))


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparent pixels are composited onto white."""
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im)
        # 16-bit samples scale down by 257 (65535 -> 255); Pillow's convert would clip instead.
        scaled = np.clip(np.rint(arr.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, "L").convert("RGB")
    if im.mode == "F":
        arr = np.clip(np.rint(np.asarray(im)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
        return white
    if im.mode != "RGB":
        return im.convert("RGB")
    return im


def _frame_count(im: Image.Image, fmt: str, data: bytes, limit: int) -> int:
    if fmt == "gif":
        return count_gif_frames(data, limit)
    if not getattr(im, "is_animated", False):
        return 1
    return int(getattr(im, "n_frames", 1))


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # a broken EXIF block must not cost the image
        return 1


@dataclass(frozen=True)
class DecodedImage:
    """A stored image: encoded bytes and the sizes (pixels) before and after resizing; with
    a model input, ``pixels`` (uint8 [S, S, 3] bytes, row-major RGB) and optionally ``thumb``
    (uint8 [32, 32, 3] bytes)."""

    data: bytes
    image_format: str
    width: int
    height: int
    original_width: int
    original_height: int
    sha256: str
    pixels: bytes | None = None
    thumb: bytes | None = None
    # PDQ hash of the whole picture (32 bytes), for the blocklist check; with dihedral, also
    # its 7 rotations and mirror images.
    pdq: bytes | None = None
    pdq_dihedral: tuple[bytes, ...] | None = None


@dataclass(frozen=True)
class DecodeOptions:
    """What one decode makes besides the stored copy: the embedding model's input (its
    preprocessing, None: no model input), a dedup thumbnail, and PDQ hashes in all eight
    orientations (``pdq_dihedral``; the upright one is always made)."""

    cfg: DecodeConfig
    model_input: PreprocessConfig | None = None
    thumbnails: bool = False
    pdq_dihedral: bool = False
    # (width, height) of the original of a stored copy read from another output (the unpack
    # stage): a square copy of a non-square original whose margins are white padding (border
    # mode, as img2dataset and this job store) is cut back to the picture; see _unpad_box.
    unpad: tuple[int, int] | None = None
    # The bytes are a copy another output stored (the unpack stage): see _keeps_stored_bytes.
    stored: bool = False


# A stored copy's margin counts as border padding when, 2 px or more from the picture (JPEG
# blends the two across the edge's 8 x 8 blocks), its median value is at least _PAD_MEDIAN and
# 95 % of its values at least _PAD_LOW: white, give or take the compression's ringing.
_PAD_MEDIAN = 245
_PAD_LOW = 200


def _unpad_box(w: int, h: int, original: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """Where the picture sits in a ``w`` x ``h`` border-padded copy of an ``original``
    (width, height) image: (left, top, right, bottom), 1 px inside on the padded sides; None
    when such a copy has no padding (not square, or a square original).

    Border mode scales the longest side to the copy's size and pads the other one evenly
    (albumentations' LongestMaxSize + PadIfNeeded, as img2dataset does and _place mirrors)."""
    ow, oh = original
    if w != h or ow <= 0 or oh <= 0 or ow == oh:
        return None
    scale = w / max(ow, oh)
    cw, ch = min(w, max(1, round(ow * scale))), min(h, max(1, round(oh * scale)))
    left, top = (w - cw) // 2, (h - ch) // 2
    box = [left, top, left + cw, top + ch]
    if cw < w:  # padded left and right: rounding may differ by a pixel, so keep clear of it
        box[0], box[2] = box[0] + 1, box[2] - 1
    if ch < h:
        box[1], box[3] = box[1] + 1, box[3] - 1
    return (box[0], box[1], box[2], box[3]) if box[2] > box[0] and box[3] > box[1] else None


def _is_padding(rgb: Image.Image, box: tuple[int, int, int, int]) -> bool:
    """True when what lies outside ``box`` in ``rgb`` (2 px or more from it) is white padding."""
    a = np.asarray(rgb)
    left, top, right, bottom = box
    margins = [a[: max(0, top - 2)], a[bottom + 2 :], a[:, : max(0, left - 2)], a[:, right + 2 :]]
    margins = [m for m in margins if m.size]
    return bool(margins) and all(
        np.median(m) >= _PAD_MEDIAN and np.percentile(m, 5) >= _PAD_LOW for m in margins)


def _draft_request(raw_w: int, raw_h: int, swapped: bool, target: tuple[int, int] | None,
                   model_input: PreprocessConfig | None) -> tuple[int, int] | None:
    """Smallest (width, height) in the file's own orientation that a JPEG draft may decode to
    while keeping >= 1.25x headroom for the stored target and >= 3x for the model input; None:
    decode at full size.

    The stored copy's bound is set against img2dataset's pixels (OpenCV full decode, INTER_AREA)
    on 300 photo-like files and the test photos (bench/decode_draft.py). What a user keeps is
    the stored JPEG (quality 95): at 1.25x it is as close to img2dataset's pixels as
    img2dataset's own stored JPEG is (PSNR median 37.9 dB against 38.1, 5th percentile 33.5
    against 33.6, worst 32.5 against 32.5, with :func:`_shrink`'s filter); at 1x the worst
    file loses ~1 dB, so the draft stops here. Before encoding, the resized copy differs from
    img2dataset's by a median 48 dB. Decoding fewer pixels is most of what the draft saves
    (bench/RESULTS.md, "JPEG draft headroom"; at 3x almost no 300-1200 px photo is drafted).
    The model input keeps 3x:
    a real-size ViT's embedding stays at cosine >= 0.9999 to the full decode's."""
    if target is None:
        return None  # resize_mode "no" stores every pixel
    tw, th = (target[1], target[0]) if swapped else target
    need_w, need_h = math.ceil(_STORE_DRAFT_HEADROOM * tw), math.ceil(_STORE_DRAFT_HEADROOM * th)
    if model_input is not None:
        f = min(1.0, _MODEL_DRAFT_HEADROOM * model_input.image_size / min(raw_w, raw_h))
        need_w, need_h = max(need_w, math.ceil(raw_w * f)), max(need_h, math.ceil(raw_h * f))
    if need_w >= raw_w and need_h >= raw_h:
        return None
    return need_w, need_h


def _model_input(view: torch.Tensor, pp: PreprocessConfig, thumbnails: bool) -> tuple[bytes, bytes | None]:
    from clip_model.transform import resize_crop_tensor_uint8

    # The whole decoded picture, resized as open_clip's transform resizes it: torch's uint8
    # kernels do that in ~0.2 ms where Pillow took ~0.4 ms for a box-reduced approximation.
    arr = resize_crop_tensor_uint8(view, pp)
    thumb = None
    if thumbnails:
        square = Image.fromarray(arr, "RGB")
        thumb = square.resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BILINEAR).tobytes()
    return arr.tobytes(), thumb


def _shrink(view: torch.Tensor, target: tuple[int, int]) -> Image.Image:
    """The stored copy, shrunk to ``target`` (width, height) from :func:`pixels_tensor`'s view.

    Antialiased bicubic by torch's SIMD uint8 kernel: 0.3 ms for a typical drafted photo
    where Pillow's Hamming took 1.2 ms. Against img2dataset's pixels (OpenCV full decode,
    INTER_AREA) it is as close as Hamming was, on 300 photo-like files and the test photos
    (bench/decode_draft.py: PSNR before encoding median 47.9 dB against 48.2, 5th percentile
    41.4 against 41.1, worst 36.8 against 36.7; the stored JPEG q95 37.9 / 33.5 / 32.5 against
    37.8 / 33.5 / 32.5)."""
    from clip_model.transform import resize_tensor_uint8

    out = resize_tensor_uint8(view, target, "bicubic")
    hwc = out[0].permute(1, 2, 0).contiguous().numpy()
    return Image.frombytes("RGB", target, hwc.tobytes(), "raw", "RGBX" if hwc.shape[2] == 4 else "RGB")


def decode_image(data: bytes | None, cfg: DecodeConfig | DecodeOptions) -> DecodedImage:
    """Check, decode, resize and re-encode one image; with :class:`DecodeOptions` also make
    the model's input from the same decoded pixels. Raises :class:`RowFailure` with a status."""
    opts = cfg if isinstance(cfg, DecodeOptions) else DecodeOptions(cfg)
    cfg = opts.cfg
    if not data:
        raise RowFailure(S.DECODE_ERROR, "no image bytes")
    fmt = sniff_format(data)
    if fmt is None:
        raise RowFailure(S.UNSUPPORTED_FORMAT, f"unrecognised magic bytes {data[:8].hex()}")
    if fmt not in cfg.allowed_formats:
        raise RowFailure(S.UNSUPPORTED_FORMAT, f"{fmt} is not in allowed_formats")
    try:
        im = Image.open(io.BytesIO(data), formats=[_PIL_FORMAT[fmt]])
    except Image.DecompressionBombError as e:
        raise RowFailure(S.TOO_MANY_PIXELS, str(e)) from e
    except Exception as e:
        raise _failure(e) from e
    raw_w, raw_h = im.size
    if raw_w <= 0 or raw_h <= 0:
        raise RowFailure(S.DECODE_ERROR, f"image header says {raw_w}x{raw_h}")
    if raw_w * raw_h > cfg.max_image_pixels:
        raise RowFailure(
            S.TOO_MANY_PIXELS, f"{raw_w}x{raw_h} exceeds max_image_pixels={cfg.max_image_pixels}"
        )
    frames = _frame_count(im, fmt, data, cfg.max_frames)
    if frames > cfg.max_frames:
        raise RowFailure(S.TOO_MANY_FRAMES, f"more than max_frames={cfg.max_frames} frames")
    orientation = _orientation(im)
    swapped = orientation in (5, 6, 7, 8)
    ow, oh = (raw_h, raw_w) if swapped else (raw_w, raw_h)
    unpad = _unpad_box(ow, oh, opts.unpad) if opts.unpad is not None else None
    if unpad is not None:  # checked and sized as the picture inside the padding
        ow, oh = unpad[2] - unpad[0], unpad[3] - unpad[1]
    if min(ow, oh) < cfg.min_image_size:
        raise RowFailure(S.TOO_SMALL, f"{ow}x{oh} is below min_image_size={cfg.min_image_size}")
    if max(ow, oh) / min(ow, oh) > cfg.max_aspect_ratio:
        raise RowFailure(
            S.BAD_ASPECT_RATIO, f"{ow}x{oh} exceeds max_aspect_ratio={cfg.max_aspect_ratio}"
        )
    target = _target_size(ow, oh, cfg)
    if target is not None and target[0] * target[1] > cfg.max_image_pixels:
        # keep_ratio and center_crop scale the shortest side up to image_size, so a tiny
        # 60000x1 file would otherwise be resized into billions of pixels.
        raise RowFailure(
            S.TOO_MANY_PIXELS,
            f"{ow}x{oh} resized to {target[0]}x{target[1]} exceeds max_image_pixels={cfg.max_image_pixels}",
        )
    try:
        request = None
        if fmt == "jpeg" and unpad is None:  # a stored copy is small: nothing to draft
            request = _draft_request(raw_w, raw_h, swapped, target, opts.model_input)
        if request is not None:
            # DCT-domain downscaling: decode at 1/2, 1/4 or 1/8 of the size while the
            # headroom of _draft_request remains (its docstring has the measurements).
            im.draft("RGB" if im.mode == "RGB" else None, request)
        im.load()
        if orientation != 1:
            im = ImageOps.exif_transpose(im)
        rgb = _to_rgb(im)
        padded = None
        if unpad is not None:
            if _is_padding(rgb, unpad):
                padded, rgb = rgb, rgb.crop(unpad)
            else:  # a square copy made otherwise (center_crop): all of it is picture
                ow, oh = rgb.size
                target = _target_size(ow, oh, cfg)
        resampled = target is not None and rgb.size != target
        shrink = resampled and (target[0] < ow or target[1] < oh)
        view = None
        if shrink or opts.model_input is not None:
            from clip_model.transform import pixels_tensor

            view = pixels_tensor(rgb)  # shared by the model input and the stored copy
        pixels = thumb = None
        if opts.model_input is not None:
            pixels, thumb = _model_input(view, opts.model_input, opts.thumbnails)
        pdq: tuple[bytes, ...] | None = None
        if target is not None:
            if shrink:
                rgb = _shrink(view, target)
            elif rgb.size != target:
                rgb = rgb.resize(target, Image.Resampling.LANCZOS)
            view = None
            pdq = _pdq(rgb, opts.pdq_dihedral)  # blocklists: the whole picture, before pad/crop
            rgb = _place(rgb, cfg)
            if padded is not None and not resampled and rgb.size == padded.size:
                # Re-padded at the same scale, the copy is the source's own square, whose
                # picture reaches the edge of the box _unpad_box keeps 1 px inside of.
                rgb = padded
        if pdq is None:
            pdq = _pdq(rgb, opts.pdq_dihedral)
    except RowFailure:
        raise
    except Exception as e:
        raise _failure(e) from e
    if opts.stored and not resampled and rgb.size == (raw_w, raw_h) and _keeps_stored_bytes(data, im, cfg):
        encoded = data
    else:
        encoded = _encode(rgb, cfg)
    return DecodedImage(
        data=encoded,
        image_format=cfg.encode_format,
        width=rgb.size[0],
        height=rgb.size[1],
        original_width=ow,
        original_height=oh,
        sha256=hashlib.sha256(encoded).hexdigest(),
        pixels=pixels,
        thumb=thumb,
        pdq=pdq[0],
        pdq_dihedral=pdq[1:] if opts.pdq_dihedral else None,
    )


def _keeps_stored_bytes(data: bytes, im: Image.Image, cfg: DecodeConfig) -> bool:
    """True when ``data``, a stored copy already of the stored size and not resampled, is the
    file :func:`_encode` would write from its pixels, give or take the second JPEG pass: an
    RGB JPEG whose quantization tables and chroma subsampling are those
    Pillow writes at ``encode_quality`` (libjpeg's scaled standard tables; img2dataset's
    OpenCV writes the same), with no metadata (only the JFIF header: no EXIF, ICC profile,
    XMP or comment) and nothing after its end marker. A file that fails any of these is
    re-encoded as any download is, which also drops what a hostile or private file carries
    beside its pixels."""
    if cfg.encode_format != "jpg" or im.format != "JPEG" or im.mode != "RGB":
        return False
    if not data.endswith(b"\xff\xd9"):
        return False
    if any(marker != "APP0" or not payload.startswith(b"JFIF\x00") for marker, payload in im.applist):
        return False
    quant, layers = _jpeg_tables(cfg.encode_quality)
    return getattr(im, "quantization", None) == quant and getattr(im, "layer", None) == layers


@functools.lru_cache(maxsize=8)
def _jpeg_tables(quality: int) -> tuple[dict[int, Any], list[tuple[int, int, int, int]]]:
    """Quantization tables and component sampling of a JPEG Pillow writes at ``quality``."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, "JPEG", quality=quality)
    ref = Image.open(io.BytesIO(buf.getvalue()))
    return ref.quantization, ref.layer


def _pdq(rgb: Image.Image, dihedral: bool) -> tuple[bytes, ...]:
    from pipeline.blocklist import pdq_dihedral_of, pdq_of

    return tuple(pdq_dihedral_of(rgb)) if dihedral else (pdq_of(rgb),)


def _place(im: Image.Image, cfg: DecodeConfig) -> Image.Image:
    """Pad (border) or crop (center_crop) to image_size x image_size as albumentations does."""
    size = cfg.image_size
    w, h = im.size
    if cfg.resize_mode == "border" and (w < size or h < size):
        canvas = Image.new("RGB", (max(w, size), max(h, size)), (255, 255, 255))
        # PadIfNeeded: pad_before = int((min_size - current) / 2), the rest goes after.
        canvas.paste(im, (int((size - w) / 2) if w < size else 0, int((size - h) / 2) if h < size else 0))
        return canvas
    if cfg.resize_mode == "center_crop" and (w > size or h > size):
        left = (w - size) // 2 if w > size else 0
        top = (h - size) // 2 if h > size else 0
        return im.crop((left, top, left + min(w, size), top + min(h, size)))
    return im


def _encode(im: Image.Image, cfg: DecodeConfig) -> bytes:
    if im.info:
        # Pillow writes a JPEG's comment and a PNG's ICC profile from the source's info when
        # the picture reaches here unchanged (already at the stored size): the stored file
        # carries the pixels only, never what a file hid beside them.
        im = im.copy()
        im.info = {}
    buf = io.BytesIO()
    if cfg.encode_format == "jpg":
        im.save(buf, "JPEG", quality=cfg.encode_quality)
    elif cfg.encode_format == "png":
        im.save(buf, "PNG", compress_level=6)
    else:
        im.save(buf, "WEBP", quality=cfg.encode_quality)
    return buf.getvalue()


def decode_row(item: tuple[bytes | None, str | None, DecodeOptions]) -> DecodedImage | tuple[str, str]:
    """Decode one row: ``(image bytes, url, options)`` -> the stored image (and model input),
    or ``(status, error)`` for a row that fails. Never raises for bad bytes. This is what the
    crash guard's child process runs (by name: the stage's ``decoder``), and what the stage
    runs in-process without isolation. The url is not used here; a decoder a test injects
    may use it to pick rows.
    """
    data, _url, opts = item
    cfg = opts.cfg
    # Pillow's own bomb guard as a backstop for anything our header check does not see; set
    # for this row only and restored, as it is process-global.
    previous_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = cfg.max_image_pixels
    try:
        with warnings.catch_warnings():
            # Pillow warns (once per distinct message) about corrupt metadata and about sizes
            # our own header check then refuses; on hostile input that is log noise, since each
            # row's outcome is recorded in its status and error.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
            return decode_image(data, opts)
    except RowFailure as f:
        return f.status, str(f)
    except Exception as e:  # a Pillow bug on a hostile file must not kill the batch
        return S.DECODE_ERROR, _describe(e)
    finally:
        Image.MAX_IMAGE_PIXELS = previous_limit


@dataclass
class DecodeStage(Stage):
    """Consumes ``image_bytes`` (dropped) and adds the stored image and its sizes.

    Adds ``image`` (binary), ``image_format``, ``width``, ``height``, ``original_width``,
    ``original_height`` (int32, pixels) and ``sha256`` (hex of ``image``); with ``model_input``
    also ``_pixels`` (the model's uint8 input, see step 6 of the module docstring) and, with
    ``thumbnails``, ``image_thumb``. Rows whose status is not ``ok`` pass through with nulls in
    those columns.

    ``isolate`` (default on): decode in a child process (:mod:`pipeline.crashguard`, one per
    worker process, reused across batches), so a row that crashes the decoder (a segfault in
    a C library) or runs past ``timeout_s`` seconds costs that row only: it is tried
    ``max_attempts`` times in all, then gets status ``worker_crash`` or ``decode_timeout``,
    and every other row of the batch is decoded as usual. Off: decode in the worker itself;
    a crashing row then kills the worker and the scheduler's bounded retries fail the job.
    ``decoder`` names the per-row function (``module:function``, called as :func:`decode_row`
    is); tests inject a faulty one.
    """

    resources: Resources = field(default_factory=lambda: Resources(num_cpus=1))
    cfg: DecodeConfig = field(default_factory=DecodeConfig)
    model_input: PreprocessConfig | None = None
    thumbnails: bool = False
    isolate: bool = True
    max_attempts: int = 2
    timeout_s: float | None = 60.0
    decoder: str = "pipeline.stages.decode:decode_row"
    # The job's blocklists: a picture within the PDQ distance of a listed hash gets status
    # ``blocked`` here, before anything of it leaves this stage (pipeline/blocklist/).
    blocklist: BlocklistSpec | None = None

    @property
    def offloaded(self) -> bool:
        # Isolated, the decoding is the crash-guard child's: this process only waits.
        return self.isolate

    def setup(self) -> None:
        if self.isolate:
            # The child imports Pillow, numpy and torch's resampling (~1 s): started here, a
            # local worker starts it while its first shard downloads, not after.
            shared_sandbox(self.decoder, self.max_attempts, self.timeout_s).start()

    def process_batch(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        statuses = batch.column(S.STATUS).to_pylist()
        errors = batch.column(S.ERROR).to_pylist()
        has_bytes = S.IMAGE_BYTES in batch.column_names
        blobs = batch.column(S.IMAGE_BYTES) if has_bytes else None
        urls = S.column_list(batch, S.URL)
        names = [S.IMAGE, S.IMAGE_FORMAT, S.WIDTH, S.HEIGHT, S.ORIGINAL_WIDTH, S.ORIGINAL_HEIGHT, S.SHA256]
        out: dict[str, list[Any]] = {k: [None] * n for k in (*names, S.PDQ, S.PIXELS, S.IMAGE_THUMB)}
        blocklist = get_blocklist(self.blocklist, DECODE_KINDS)
        dihedral = blocklist is not None and blocklist.has_pdq and blocklist.pdq_dihedral
        opts = DecodeOptions(self.cfg, self.model_input, self.thumbnails, dihedral)
        todo = [i for i in range(n) if statuses[i] == S.OK]
        # Rows read from another output's shards (the unpack stage) carry their original's
        # size: its stored copy may be border-padded, and the output keeps the original's size.
        sizes = list(zip(S.column_list(batch, S.SOURCE_ORIGINAL_WIDTH),
                         S.column_list(batch, S.SOURCE_ORIGINAL_HEIGHT), strict=True))
        stored = S.column_list(batch, S.EMBEDDED_FROM)  # "stored": read from another output
        row_opts = {i: replace(opts, stored=stored[i] == "stored",
                               unpad=(int(sizes[i][0]), int(sizes[i][1])) if sizes[i][0] and sizes[i][1] else None)
                    for i in todo if stored[i] == "stored" or (sizes[i][0] and sizes[i][1])}
        items = [(blobs[i].as_py() if blobs is not None else None, urls[i], row_opts.get(i, opts)) for i in todo]
        if self.isolate:
            box = shared_sandbox(self.decoder, self.max_attempts, self.timeout_s)
            results = box.map(items)
        else:
            module, _, fn = self.decoder.partition(":")
            decode = getattr(importlib.import_module(module), fn)
            results = [decode(item) for item in items]
        for i, res in zip(todo, results, strict=True):
            if isinstance(res, Crashed):
                statuses[i] = S.WORKER_CRASH if res.reason == "worker_crash" else S.DECODE_TIMEOUT
                errors[i] = f"decoder process {res.detail} on this row ({res.attempts} attempts); quarantined"
                continue
            if isinstance(res, tuple):
                statuses[i], errors[i] = res
                continue
            hit = blocklist.check_pdq(res.pdq, list(res.pdq_dihedral or ())) if blocklist is not None else None
            if hit is not None:  # nothing of the picture is kept, not even its hashes
                statuses[i], errors[i] = S.BLOCKED, hit.reason()
                continue
            out[S.IMAGE][i] = res.data
            out[S.PDQ][i] = res.pdq.hex() if res.pdq is not None else None
            out[S.IMAGE_FORMAT][i] = res.image_format
            out[S.WIDTH][i] = res.width
            out[S.HEIGHT][i] = res.height
            unpad = row_opts[i].unpad if i in row_opts else None
            out[S.ORIGINAL_WIDTH][i], out[S.ORIGINAL_HEIGHT][i] = (
                unpad if unpad is not None else (res.original_width, res.original_height))
            out[S.SHA256][i] = res.sha256
            out[S.PIXELS][i] = res.pixels
            out[S.IMAGE_THUMB][i] = res.thumb
        table = S.drop_if_present(batch, [S.IMAGE_BYTES])
        if S.SOURCE_SHA256 in table.column_names:  # a blocked row keeps no hash of its bytes
            src = table.column(S.SOURCE_SHA256).to_pylist()
            src = [None if st == S.BLOCKED else v for st, v in zip(statuses, src, strict=True)]
            table = S.set_column(table, S.SOURCE_SHA256, pa.array(src, pa.string()))
        table = S.set_column(table, S.STATUS, pa.array(statuses, pa.string()))
        table = S.set_column(table, S.ERROR, pa.array(errors, pa.string()))
        types = {S.IMAGE_FORMAT: pa.string(), S.SHA256: pa.string(), S.PDQ: pa.string()}
        for name in (*names, S.PDQ):
            if name == S.IMAGE:
                table = S.set_column(table, name, S.binary_column(out[name]))
            else:
                table = S.set_column(table, name, pa.array(out[name], types.get(name, pa.int32())))
        if self.model_input is not None:
            table = S.set_column(table, S.PIXELS, S.binary_column(out[S.PIXELS]))
            # An image read from another output's shard (the unpack stage) says "stored" already.
            prior = S.column_list(table, S.EMBEDDED_FROM)
            source = [None if v is None else (p or "original") for v, p in zip(out[S.PIXELS], prior, strict=True)]
            table = S.set_column(table, S.EMBEDDED_FROM, pa.array(source, pa.string()))
            if self.thumbnails:
                table = S.set_column(table, S.IMAGE_THUMB, pa.array(out[S.IMAGE_THUMB], pa.binary()))
        return table
