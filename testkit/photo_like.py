"""Photo-like JPEGs for CPU benchmarks.

The synthetic world's scenes are flat colour on flat background: their JPEGs carry few non-zero
DCT coefficients and decode several times faster than camera photos of the same size, which
would flatter any decode-bound figure. :func:`texturize` re-encodes a world's JPEGs with
camera-like content laid over the scene: a smooth illumination gradient, fine grain
(Gaussian, sigma ~6 levels) and a mid-frequency texture, at JPEG quality 85-95. The scene
stays recognisable (the bundled tiny model still sees its shapes and colours) while file
sizes and decode times land where photos are (~0.15-0.35 bytes per pixel at quality 90).
"""

from __future__ import annotations

import hashlib
import io
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter


def texturize_image(img: Image.Image, seed: int, grain: float = 6.0) -> Image.Image:
    """``img`` (RGB) with an illumination gradient, grain and blurred texture laid over it."""
    rng = np.random.default_rng(seed)
    w, h = img.size
    x = np.asarray(img.convert("RGB"), np.float32)
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * gx / w + np.sin(angle) * gy / h) * rng.uniform(10, 30)
    small = rng.normal(0, 1, (max(2, h // 8), max(2, w // 8), 1)).astype(np.float32)
    texture = Image.fromarray(np.clip(small[..., 0] * 40 + 128, 0, 255).astype(np.uint8))
    texture = texture.resize((w, h), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(1.5))
    tex = (np.asarray(texture, np.float32) - 128.0)[..., None] * 0.25
    noise = rng.normal(0, grain, x.shape).astype(np.float32)
    out = x + ramp[..., None] + tex + noise
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB")


def texturize(world: str | Path, seed: int = 0) -> int:
    """Re-encode every ``.jpg`` under ``world/images`` photo-like, in place; returns how many.

    Deterministic in ``seed`` and each file's bytes, so byte-identical copies (the world's
    exact duplicates) stay identical. EXIF-rotated files keep their pixels' orientation (the
    tag is dropped, so they display as stored)."""
    root = Path(world) / "images"
    paths = sorted(root.rglob("*.jpg"))
    for p in paths:
        data = p.read_bytes()
        r = random.Random(f"{seed}:{hashlib.sha256(data).hexdigest()}")
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", im.size)
            textured = texturize_image(im.convert("RGB"), r.randrange(2**32))
        buf = io.BytesIO()
        textured.save(buf, "JPEG", quality=r.randint(85, 95))
        p.write_bytes(buf.getvalue())
    return len(paths)
