"""A deterministic synthetic image world: simple scenes, captions and a LAION-style URL list.

No real web images or CLIP weights can be fetched in the test environment, so tests, the demo,
benchmarks and the bundled tiny CLIP all use this world instead. A scene is one or two groups of
identical shapes (shape x colour x count x size x position) on a plain background, optionally with
a hazard sign (a yellow-black striped diamond: the stand-in for "unsafe" content). Every row of a
generated URL list carries its ground truth in ``_gt_*`` columns, so filters can be scored exactly.

In-memory helpers (no disk): :func:`sample_scenes`, :func:`render`, :func:`caption`,
:func:`describe`, :func:`perturb`, :func:`encode_image`. On disk: :func:`generate_world` and the CLI

    python -m testkit.synthetic --rows N --seed S --out DIR --base-url URL [knobs]

which writes ``DIR/images/...`` and ``DIR/urls.parquet`` (url = URL + path relative to DIR).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import random
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageOps

from .languages import LANGUAGES, CaptionPlan, GroupPlan
from .languages import render as render_in

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "cross": "crosses",
}
# Hues far enough apart that a 64-pixel, JPEG-compressed rendering keeps them distinguishable.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 60),
    "blue": (40, 75, 215),
    "yellow": (240, 215, 40),
    "orange": (245, 135, 20),
    "purple": (135, 55, 175),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
    "gray": (128, 128, 128),
}
COUNTS: tuple[int, ...] = (1, 2, 3)
SIZES: tuple[str, ...] = ("small", "large")
QUADRANTS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
POSITIONS: tuple[str, ...] = QUADRANTS + ("center",)

# The concept prompt that image-side moderation compares image embeddings against.
HAZARD_PROMPT = "a hazard sign"
HAZARD_PHRASES: tuple[str, ...] = (
    "with a hazard sign",
    "and a hazard sign",
    "next to a yellow and black striped diamond",
    "with a warning sign",
    "and a danger sign",
    "with a striped hazard symbol",
)

FORMATS: tuple[str, ...] = (
    "jpeg",
    "png_alpha",
    "grayscale",
    "cmyk_jpeg",
    "webp",
    "gif_animated",
    "exif_rotated",
    "large",
)
DEFAULT_FORMAT_MIX: dict[str, float] = {
    "jpeg": 0.75,
    "png_alpha": 0.05,
    "grayscale": 0.03,
    "cmyk_jpeg": 0.03,
    "webp": 0.05,
    "gif_animated": 0.03,
    "exif_rotated": 0.05,
    "large": 0.01,
}
EXTENSIONS: dict[str, str] = {
    "jpeg": "jpg",
    "png_alpha": "png",
    "grayscale": "jpg",
    "cmyk_jpeg": "jpg",
    "webp": "webp",
    "gif_animated": "gif",
    "exif_rotated": "jpg",
    "large": "jpg",
}

# Object sizes as a fraction of the scene square's side, for groups of two or three.
_SIZE_FRACTION = {"small": 0.14, "large": 0.22}
# A lone object is drawn this much larger: its region has room for it, and at the tiny model's
# 64 px input the shape of a 9-14 px object is hard to learn (see clip_model/weights/
# tiny-synthetic.md); "large" stays 1.57x "small" within each count.
_COUNT_SCALE = {1: 1.6, 2: 1.0, 3: 1.0}
_HAZARD_FRACTION = 0.26
# Group slots in region units (a region is a 0.5 x 0.5 square of the scene); chosen so that
# three large objects never overlap and never leave their region.
_SLOTS: dict[int, tuple[tuple[tuple[float, float], ...], ...]] = {
    1: (((0.5, 0.5),),),
    2: (((0.29, 0.5), (0.71, 0.5)), ((0.5, 0.29), (0.5, 0.71)), ((0.3, 0.3), (0.7, 0.7))),
    3: (((0.27, 0.28), (0.73, 0.28), (0.5, 0.72)), ((0.5, 0.28), (0.27, 0.72), (0.73, 0.72))),
}
_REGION_ORIGIN = {
    "top left": (0.0, 0.0),
    "top right": (0.5, 0.0),
    "bottom left": (0.0, 0.5),
    "bottom right": (0.5, 0.5),
    "center": (0.25, 0.25),
}
# The hazard sits in the outer corner of a quadrant that no object group uses; it stays clear of
# the "center" region ([0.25, 0.75]^2) and of a crop of up to 4 % per side.
_HAZARD_CENTER = {
    "top left": (0.16, 0.16),
    "top right": (0.84, 0.16),
    "bottom left": (0.16, 0.84),
    "bottom right": (0.84, 0.84),
}
# How captions say each count ("a" becomes "an" before a vowel).
COUNT_WORDS: dict[int, tuple[str, ...]] = {
    1: ("a", "one", "a single"),
    2: ("two", "a pair of"),
    3: ("three",),
}


@dataclass(frozen=True)
class ObjectGroup:
    """``count`` identical shapes of one colour and size, laid out in one region of the scene."""

    shape: str
    color: str
    count: int
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    """One synthetic scene. ``layout_seed`` fixes the exact placement jitter and colour shades,
    which no caption mentions; ``hazard_corner`` is "" when ``hazard`` is False."""

    scene_id: int
    background: str
    groups: tuple[ObjectGroup, ...]
    hazard: bool
    hazard_corner: str
    layout_seed: int

    @property
    def description(self) -> str:
        """The canonical description: equal descriptions mean the same scene up to jitter."""
        return describe(self)


def group_phrase(g: ObjectGroup, count_word: str, with_size: bool, with_position: bool) -> str:
    """How a caption names one group: "two small red stars in the top left", "an orange circle"
    (``count_word`` one of ``COUNT_WORDS[g.count]``)."""
    noun = g.shape if g.count == 1 else PLURALS[g.shape]
    words = []
    if with_size:
        words.append(g.size)
    words += [g.color, noun]
    if with_position:
        words.append(f"in the {g.position}")
    return _article(count_word, words[0]) + " " + " ".join(words)


def _article(word: str, following: str) -> str:
    """Turn "a" into "an" before a vowel ("an orange circle"); other words pass unchanged."""
    return "an" if word == "a" and following[0] in "aeiou" else word


def describe(scene: Scene) -> str:
    """Canonical, complete description of a scene (every attribute, fixed word order)."""
    parts = [group_phrase(g, COUNT_WORDS[g.count][0], True, True) for g in scene.groups]
    text = (
        " and ".join(parts) + f" on {_article('a', scene.background)} {scene.background} background"
    )
    if scene.hazard:
        text += " with a hazard sign"
    return text


def _sample_scene(
    rng: random.Random, scene_id: int, unsafe_rate: float, second_object_rate: float
) -> Scene:
    two = rng.random() < second_object_rate
    if two:
        positions = rng.sample(QUADRANTS, 2)
    else:
        positions = [rng.choice(POSITIONS)]
    groups = []
    used_colors: set[str] = set()
    for pos in positions:
        color = rng.choice([c for c in COLORS if c not in used_colors])
        used_colors.add(color)
        groups.append(
            ObjectGroup(
                shape=rng.choice(SHAPES),
                color=color,
                count=rng.choice(COUNTS),
                size=rng.choice(SIZES),
                position=pos,
            )
        )
    background = rng.choice([c for c in COLORS if c not in used_colors])
    hazard = rng.random() < unsafe_rate
    corner = rng.choice([q for q in QUADRANTS if q not in positions]) if hazard else ""
    return Scene(
        scene_id=scene_id,
        background=background,
        groups=tuple(groups),
        hazard=hazard,
        hazard_corner=corner,
        layout_seed=rng.getrandbits(32),
    )


def sample_scenes(
    n: int,
    seed: int,
    *,
    unsafe_rate: float = 0.05,
    second_object_rate: float = 0.5,
    unique: bool = False,
    first_id: int = 0,
) -> list[Scene]:
    """Draw ``n`` random scenes, deterministic in ``seed``.

    unsafe_rate: probability that a scene contains the hazard sign.
    second_object_rate: probability of a second object group (in another quadrant).
    unique: resample until no two scenes share a description (the space holds ~10^7 of them).
    Scene ids are ``first_id .. first_id + n - 1``.
    """
    _check_rate("unsafe_rate", unsafe_rate)
    _check_rate("second_object_rate", second_object_rate)
    rng = random.Random(f"scenes-{seed}")
    scenes: list[Scene] = []
    seen: set[str] = set()
    while len(scenes) < n:
        scene = _sample_scene(rng, first_id + len(scenes), unsafe_rate, second_object_rate)
        if unique:
            desc = describe(scene)
            if desc in seen:
                continue
            seen.add(desc)
        scenes.append(scene)
    return scenes


_JOINERS = (" and ", ", ", " with ")
_PREFIXES = ("", "", "a photo of ", "an image of ", "a picture of ", "a drawing of ", "clip art: ")


def plan_caption(
    scene: Scene, rng: random.Random, *, mention_hazard: bool | None = None
) -> CaptionPlan:
    """Every random choice of a caption of ``scene``, drawn in the order and with the ranges
    :func:`caption` always used, so any language renders the same choices."""
    groups = list(scene.groups)
    if len(groups) == 2 and rng.random() < 0.5:
        groups.reverse()
    plans = []
    for g in groups:
        count_word = rng.choice(range(len(COUNT_WORDS[g.count])))
        with_size = rng.random() < 0.75
        with_position = rng.random() < 0.8
        plans.append(
            GroupPlan(g.shape, g.color, g.count, g.size, g.position, count_word, with_size,
                      with_position)
        )  # fmt: skip
    joiner = rng.choice(range(len(_JOINERS))) if len(plans) > 1 else 0
    hazard = None
    if scene.hazard and (rng.random() < 0.5 if mention_hazard is None else mention_hazard):
        hazard = rng.choice(range(len(HAZARD_PHRASES)))
    template = None if rng.random() < 0.15 else rng.choice(range(4))
    prefix = rng.choice(range(len(_PREFIXES)))
    return CaptionPlan(tuple(plans), joiner, hazard, template, prefix, scene.background)


def render_caption(plan: CaptionPlan, language: str = "en") -> str:
    """The caption ``plan`` in ``language`` (one of :data:`LANGUAGES`)."""
    if language != "en":
        return render_in(plan, language)
    phrases = [
        group_phrase(
            ObjectGroup(g.shape, g.color, g.count, g.size, g.position),
            COUNT_WORDS[g.count][g.count_word],
            with_size=g.with_size,
            with_position=g.with_position,
        )
        for g in plan.groups
    ]
    objects = _JOINERS[plan.joiner].join(phrases)
    if plan.hazard_phrase is not None:
        objects += " " + HAZARD_PHRASES[plan.hazard_phrase]
    bg = plan.background
    a_bg = _article("a", bg)
    if plan.template is None:
        body = objects
    else:
        body = (
            f"{objects} on {a_bg} {bg} background",
            f"{a_bg} {bg} background with {objects}",
            f"{objects}, {bg} background",
            f"{objects} against a plain {bg} backdrop",
        )[plan.template]
    return _PREFIXES[plan.prefix] + body


def caption(
    scene: Scene,
    rng: random.Random,
    *,
    mention_hazard: bool | None = None,
    language: str = "en",
) -> str:
    """A varied, truthful caption of ``scene`` (alt-text style) in ``language``.

    Colour, shape and count of every group are always named; size, position and background are
    sometimes left out, as people do. ``mention_hazard`` None mentions a present hazard with
    probability 0.5; True/False force it (ignored when the scene has no hazard). The random
    choices do not depend on the language: the same rng state gives the same caption in every
    language.
    """
    return render_caption(plan_caption(scene, rng, mention_hazard=mention_hazard), language)


# --- rendering -------------------------------------------------------------------------------


def _shape_polygon(
    shape: str, cx: float, cy: float, r: float, angle: float
) -> list[tuple[float, float]]:
    """Vertices (pixels) of a shape of circumradius-ish ``r`` centred on (cx, cy)."""
    if shape == "square":
        pts = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        pts = [(x, y + 0.2) for x, y in pts]  # centre the triangle's bounding box
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = 1.0 if k % 2 == 0 else 0.42
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((rad * math.cos(a), rad * math.sin(a)))
    elif shape == "cross":
        w = 0.34
        pts = [
            (-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w),
            (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w),
        ]  # fmt: skip
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]


def _jitter_color(
    rgb: tuple[int, int, int], rng: random.Random, amount: int
) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)  # type: ignore[return-value]


def _draw_hazard(img: Image.Image, cx: float, cy: float, side: float) -> None:
    """Paste a yellow diamond with black diagonal stripes and a black rim centred on (cx, cy)."""
    half = side / 2
    box = (int(cx - half), int(cy - half), int(math.ceil(cx + half)), int(math.ceil(cy + half)))
    w, h = box[2] - box[0], box[3] - box[1]
    if w < 2 or h < 2:
        return
    tile = Image.new("RGB", (w, h), (245, 200, 0))
    draw = ImageDraw.Draw(tile)
    period = max(2.0, w / 4)
    x = -float(h)
    while x < w:
        # A band from the top edge to the bottom edge, slanted 45 degrees.
        draw.polygon(
            [(x, 0), (x + period / 2, 0), (x + period / 2 + h, h), (x + h, h)], fill=(10, 10, 10)
        )
        x += period
    mask = Image.new("L", (w, h), 0)
    diamond = [(w / 2, 0), (w - 1, h / 2), (w / 2, h - 1), (0, h / 2)]
    ImageDraw.Draw(mask).polygon(diamond, fill=255)
    img.paste(tile, box[:2], mask)
    rim = max(1, round(w / 16))
    ImageDraw.Draw(img).polygon(
        [(box[0] + px, box[1] + py) for px, py in diamond], outline=(10, 10, 10), width=rim
    )


def object_radius(g: ObjectGroup, side: float) -> float:
    """Radius in pixels (half the diameter of a circle) of each of ``g``'s objects in a scene
    square of ``side`` pixels."""
    return _SIZE_FRACTION[g.size] * _COUNT_SCALE[g.count] * side / 2


def render(scene: Scene, size: int | tuple[int, int]) -> Image.Image:
    """Draw ``scene`` as an RGB image.

    size: side in pixels, or (width, height). The scene fills the centred square of side
    min(width, height); the rest is background, so a centre crop keeps every object.
    Deterministic: the same scene and size give the same pixels.
    """
    w, h = (size, size) if isinstance(size, int) else size
    if w < 8 or h < 8:
        raise ValueError(f"render needs at least 8x8 pixels, got {w}x{h}")
    rng = random.Random(scene.layout_seed)
    img = Image.new("RGB", (w, h), _jitter_color(COLORS[scene.background], rng, 12))
    draw = ImageDraw.Draw(img)
    side = min(w, h)
    ox, oy = (w - side) / 2, (h - side) / 2
    for g in scene.groups:
        fill = _jitter_color(COLORS[g.color], rng, 12)
        slots = rng.choice(_SLOTS[g.count])
        rx, ry = _REGION_ORIGIN[g.position]
        r = object_radius(g, side)
        for sx, sy in slots:
            cx = ox + (rx + 0.5 * (sx + rng.uniform(-0.03, 0.03))) * side
            cy = oy + (ry + 0.5 * (sy + rng.uniform(-0.03, 0.03))) * side
            if g.shape == "circle":
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
            else:
                angle = math.radians(rng.uniform(-12, 12))
                draw.polygon(_shape_polygon(g.shape, cx, cy, r, angle), fill=fill)
    if scene.hazard:
        hx, hy = _HAZARD_CENTER[scene.hazard_corner]
        _draw_hazard(img, ox + hx * side, oy + hy * side, _HAZARD_FRACTION * side)
    return img


# --- encoding and near-duplicate transforms --------------------------------------------------


def perturb(img: Image.Image, rng: random.Random) -> tuple[Image.Image, int, str]:
    """A near duplicate of ``img``: slightly resized and/or cropped (<= 4 % per side).

    Returns (image, JPEG quality to encode it with, a description of what was done such as
    ``"resize=0.83;crop=3,1,4,0;quality=55"``).
    """
    img = img.convert("RGB")
    ops: list[str] = []
    kind = rng.choice(("resize", "crop", "both", "quality"))
    if kind in ("crop", "both"):
        w, h = img.size
        c = [rng.randint(0, max(1, int(0.04 * d))) for d in (w, h, w, h)]
        img = img.crop((c[0], c[1], w - c[2], h - c[3]))
        ops.append("crop={},{},{},{}".format(*c))
    if kind in ("resize", "both"):
        f = rng.uniform(0.6, 0.95)
        img = img.resize(
            (max(8, round(img.width * f)), max(8, round(img.height * f))), Image.Resampling.BICUBIC
        )
        ops.append(f"resize={f:.3f}")
    quality = rng.randint(35, 75)
    ops.append(f"quality={quality}")
    return img, quality, ";".join(ops)


def encode_image(img: Image.Image, fmt: str, rng: random.Random) -> tuple[bytes, tuple[int, int]]:
    """Encode an RGB image in one of :data:`FORMATS`.

    Returns (file bytes, (width, height) as displayed, i.e. after applying any EXIF orientation).
    """
    buf = io.BytesIO()
    if fmt in ("jpeg", "large"):
        img.save(buf, "JPEG", quality=rng.randint(80, 95))
    elif fmt == "grayscale":
        img.convert("L").save(buf, "JPEG", quality=90)
    elif fmt == "cmyk_jpeg":
        img.convert("CMYK").save(buf, "JPEG", quality=90)
    elif fmt == "webp":
        img.save(buf, "WEBP", quality=85)
    elif fmt == "png_alpha":
        rgba = img.convert("RGBA")
        alpha = Image.new("L", img.size, 255)
        # A see-through frame: decoders must flatten alpha rather than choke on RGBA.
        edge = max(1, min(img.size) // 50)
        d = ImageDraw.Draw(alpha)
        d.rectangle((0, 0, img.width - 1, img.height - 1), outline=0, width=edge)
        d.rectangle(
            (edge, edge, img.width - 1 - edge, img.height - 1 - edge), outline=128, width=edge
        )
        rgba.putalpha(alpha)
        rgba.save(buf, "PNG")
    elif fmt == "gif_animated":
        first = img.quantize(colors=255)
        dimmed = img.point(lambda v: int(v * 0.85)).quantize(colors=255)
        first.save(buf, "GIF", save_all=True, append_images=[dimmed, first], duration=200, loop=0)
    elif fmt == "exif_rotated":
        orientation = rng.choice((3, 6, 8))
        # Store the pixels so that a viewer applying the tag shows the upright scene:
        # 6 = "rotate 90 CW to display", so store it rotated 90 CCW (and 8 the other way).
        stored = {
            3: Image.Transpose.ROTATE_180,
            6: Image.Transpose.ROTATE_90,
            8: Image.Transpose.ROTATE_270,
        }[orientation]
        exif = Image.Exif()
        exif[0x0112] = orientation
        img.transpose(stored).save(buf, "JPEG", quality=90, exif=exif.tobytes())
    else:
        raise ValueError(f"unknown format {fmt!r}; choose from {FORMATS}")
    return buf.getvalue(), img.size


def decode_display(data: bytes) -> Image.Image:
    """Decode file bytes as a viewer shows them: first frame, EXIF orientation applied, RGB
    (alpha flattened onto white)."""
    with Image.open(io.BytesIO(data)) as im:
        im.seek(0)
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            flat = Image.new("RGB", im.size, (255, 255, 255))
            flat.paste(im, mask=im.getchannel("A"))
            return flat
        return im.convert("RGB")


# --- the world on disk -----------------------------------------------------------------------


def _check_rate(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _pick_format(rng: random.Random, mix: Mapping[str, float]) -> str:
    names = list(mix)
    return rng.choices(names, weights=[mix[n] for n in names])[0]


def _image_size(rng: random.Random, fmt: str, min_side: int, max_side: int) -> tuple[int, int]:
    if fmt == "large":
        long_side = rng.randint(1500, 4000)
    else:
        long_side = rng.randint(min_side, max_side)
    short = max(8, round(long_side / rng.uniform(1.0, 1.33)))
    return (long_side, short) if rng.random() < 0.5 else (short, long_side)


GT_SCHEMA = pa.schema(
    [
        ("url", pa.string()),
        ("caption", pa.string()),
        ("_gt_row", pa.int64()),
        ("_gt_path", pa.string()),
        ("_gt_scene_id", pa.int64()),
        ("_gt_description", pa.string()),
        ("_gt_caption_matches", pa.bool_()),
        ("_gt_unsafe", pa.bool_()),
        ("_gt_hazard_in_caption", pa.bool_()),
        ("_gt_duplicate_kind", pa.string()),
        ("_gt_duplicate_of", pa.int64()),
        ("_gt_transform", pa.string()),
        ("_gt_format", pa.string()),
        ("_gt_width", pa.int32()),
        ("_gt_height", pa.int32()),
        ("_gt_bytes", pa.int64()),
        ("_gt_sha256", pa.string()),
        ("_gt_num_groups", pa.int8()),
        ("_gt_shape", pa.string()),
        ("_gt_color", pa.string()),
        ("_gt_background", pa.string()),
    ]
)
"""Columns of the URL list. ``_gt_*`` columns are ground truth: ``_gt_duplicate_kind`` is ""
(an original), "exact" (the same bytes as row ``_gt_duplicate_of``) or "near" (re-encoded,
resized or cropped from it, ``_gt_transform`` says how); ``_gt_duplicate_of`` is -1 for
originals. ``_gt_caption_matches`` False: the caption describes a scene that is not in the world
(``_gt_hazard_in_caption`` then says whether that caption names a hazard). ``_gt_unsafe``: the
image shows the hazard sign. ``_gt_shape``/``_gt_color`` describe the first object group. Widths and heights are as
displayed (after EXIF orientation)."""


def generate_world(
    out_dir: str | Path,
    rows: int,
    seed: int,
    base_url: str,
    *,
    mismatch_rate: float = 0.1,
    exact_dup_rate: float = 0.03,
    near_dup_rate: float = 0.05,
    unsafe_rate: float = 0.05,
    hazard_caption_rate: float = 0.5,
    second_object_rate: float = 0.5,
    formats: Mapping[str, float] | None = None,
    min_side: int = 256,
    max_side: int = 1024,
    languages: Mapping[str, float] | str | None = None,
) -> pa.Table:
    """Write ``rows`` images under ``out_dir/images/`` and the URL list ``out_dir/urls.parquet``.

    Each url is ``base_url`` + the image's path relative to ``out_dir`` (so serving ``out_dir``
    at ``base_url`` makes every url resolve). Deterministic in ``seed`` and the knobs.

    mismatch_rate: share of original rows whose caption describes a different scene.
    exact_dup_rate / near_dup_rate: share of rows that copy (byte for byte) / re-encode, resize
        or crop an original row's image under a new url.
    unsafe_rate: share of scenes containing the hazard sign; hazard_caption_rate: probability
        that a matched caption of such a scene mentions it.
    second_object_rate: share of scenes with a second object group.
    formats: format -> weight (keys from :data:`FORMATS`); default :data:`DEFAULT_FORMAT_MIX`.
    min_side, max_side: range of the longer image side in pixels ("large" images: 1500-4000).
    languages: caption language(s): one of :data:`LANGUAGES`, or language -> weight for a mix
        drawn per row. Images, mismatches, hazards and duplicates do not depend on it (the
        same seed gives the same rows in every language); None (default) is English and the
        classic schema, otherwise the table gains ``_gt_language``.
    Returns the URL list as a table with schema :data:`GT_SCHEMA` (+ ``_gt_language``).
    """
    for name, value in (
        ("mismatch_rate", mismatch_rate),
        ("exact_dup_rate", exact_dup_rate),
        ("near_dup_rate", near_dup_rate),
        ("unsafe_rate", unsafe_rate),
        ("hazard_caption_rate", hazard_caption_rate),
        ("second_object_rate", second_object_rate),
    ):
        _check_rate(name, value)
    if rows < 0:
        raise ValueError(f"rows must be >= 0, got {rows}")
    if not 8 <= min_side <= max_side:
        raise ValueError(f"need 8 <= min_side <= max_side, got {min_side}, {max_side}")
    mix = dict(DEFAULT_FORMAT_MIX if formats is None else formats)
    unknown = set(mix) - set(FORMATS)
    if unknown or not mix or any(v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError(
            f"formats must map names from {FORMATS} to non-negative weights, got {mix}"
        )

    lang_mix = _language_mix(languages)
    lang_rng = random.Random(f"languages-{seed}")

    def pick_language() -> str:
        if lang_mix is None:
            return "en"
        names = list(lang_mix)
        return lang_rng.choices(names, weights=[lang_mix[n] for n in names])[0]

    n_exact = round(rows * exact_dup_rate)
    n_near = round(rows * near_dup_rate)
    n_orig = rows - n_exact - n_near
    if n_orig <= 0 and rows > 0:
        raise ValueError("exact_dup_rate + near_dup_rate leave no original rows")

    scenes = sample_scenes(
        n_orig, seed, unsafe_rate=unsafe_rate, second_object_rate=second_object_rate, unique=True
    )
    descriptions = {describe(s) for s in scenes}
    cap_rng = random.Random(f"captions-{seed}")
    fmt_rng = random.Random(f"formats-{seed}")
    dup_rng = random.Random(f"duplicates-{seed}")
    # Mismatched captions come from scenes outside the world, so they never describe any row.
    decoy_rng = random.Random(f"decoys-{seed}")

    records: list[dict] = []
    payloads: list[bytes] = []
    for scene in scenes:
        fmt = _pick_format(fmt_rng, mix)
        img = render(scene, _image_size(fmt_rng, fmt, min_side, max_side))
        data, (w, h) = encode_image(img, fmt, fmt_rng)
        mentions = scene.hazard and cap_rng.random() < hazard_caption_rate
        matches = cap_rng.random() >= mismatch_rate
        if matches:
            lang = pick_language()
            text = caption(scene, cap_rng, mention_hazard=mentions, language=lang)
        else:
            while True:
                decoy = _sample_scene(decoy_rng, -1, unsafe_rate, second_object_rate)
                if describe(decoy) not in descriptions and describe(decoy) != describe(scene):
                    break
            mentions = decoy.hazard and cap_rng.random() < hazard_caption_rate
            lang = pick_language()
            text = caption(decoy, cap_rng, mention_hazard=mentions, language=lang)
        records.append(
            dict(scene=scene, caption=text, matches=matches, mentions=mentions, kind="", src=-1,
                 transform="", fmt=fmt, width=w, height=h, language=lang)
        )  # fmt: skip
        payloads.append(data)

    sources = [dup_rng.randrange(n_orig) for _ in range(n_exact + n_near)] if n_orig else []
    for i, src in enumerate(sources):
        rec = records[src]
        scene = rec["scene"]
        mentions = scene.hazard and cap_rng.random() < hazard_caption_rate
        lang = pick_language()
        text = caption(scene, cap_rng, mention_hazard=mentions, language=lang)
        if i < n_exact:
            data, fmt, transform, (w, h) = (
                payloads[src],
                rec["fmt"],
                "",
                (rec["width"], rec["height"]),
            )
            kind = "exact"
        else:
            near, quality, transform = perturb(decode_display(payloads[src]), dup_rng)
            buf = io.BytesIO()
            near.save(buf, "JPEG", quality=quality)
            data, fmt, (w, h), kind = buf.getvalue(), "jpeg", near.size, "near"
        records.append(
            dict(scene=scene, caption=text, matches=True, mentions=mentions, kind=kind, src=src,
                 transform=transform, fmt=fmt, width=w, height=h, language=lang)
        )  # fmt: skip
        payloads.append(data)

    # Interleave duplicates with originals, then name files by their final row number.
    order = list(range(len(records)))
    random.Random(f"order-{seed}").shuffle(order)
    new_index = {old: new for new, old in enumerate(order)}
    out = Path(out_dir)
    schema = GT_SCHEMA if lang_mix is None else GT_SCHEMA.append(pa.field("_gt_language", pa.string()))
    columns: dict[str, list] = {f.name: [] for f in schema}
    base = base_url if base_url.endswith("/") else base_url + "/"
    for new, old in enumerate(order):
        rec, data = records[old], payloads[old]
        rel = f"images/{new // 1000:05d}/{new:07d}.{EXTENSIONS[rec['fmt']]}"
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        scene: Scene = rec["scene"]
        first = scene.groups[0]
        row = {
            "url": base + rel,
            "caption": rec["caption"],
            "_gt_row": new,
            "_gt_path": rel,
            "_gt_scene_id": scene.scene_id,
            "_gt_description": describe(scene),
            "_gt_caption_matches": rec["matches"],
            "_gt_unsafe": scene.hazard,
            "_gt_hazard_in_caption": rec["mentions"],
            "_gt_duplicate_kind": rec["kind"],
            "_gt_duplicate_of": new_index[rec["src"]] if rec["src"] >= 0 else -1,
            "_gt_transform": rec["transform"],
            "_gt_format": rec["fmt"],
            "_gt_width": rec["width"],
            "_gt_height": rec["height"],
            "_gt_bytes": len(data),
            "_gt_sha256": hashlib.sha256(data).hexdigest(),
            "_gt_num_groups": len(scene.groups),
            "_gt_shape": first.shape,
            "_gt_color": first.color,
            "_gt_background": scene.background,
        }
        if lang_mix is not None:
            row["_gt_language"] = rec["language"]
        for k, v in row.items():
            columns[k].append(v)
    table = pa.table(columns, schema=schema)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out / "urls.parquet")
    return table


def _language_mix(languages: Mapping[str, float] | str | None) -> dict[str, float] | None:
    if languages is None:
        return None
    mix = {languages: 1.0} if isinstance(languages, str) else dict(languages)
    unknown = set(mix) - set(LANGUAGES)
    if unknown or not mix or any(v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError(
            f"languages must be one of {LANGUAGES} or map them to non-negative weights, got {languages!r}"
        )
    return mix


def _parse_formats(text: str) -> dict[str, float]:
    """Parse ``jpeg=0.8,webp=0.2`` (or a JSON object) into a format mix."""
    text = text.strip()
    if text.startswith("{"):
        return {str(k): float(v) for k, v in json.loads(text).items()}
    mix = {}
    for item in text.split(","):
        name, sep, weight = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"format weight {item!r} is not NAME=WEIGHT")
        mix[name.strip()] = float(weight)
    return mix


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m testkit.synthetic",
        description="Write a synthetic image world: DIR/images/... and DIR/urls.parquet.",
    )
    p.add_argument("--rows", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--base-url", required=True, help="URL prefix under which --out will be served")
    p.add_argument("--mismatch-rate", type=float, default=0.1)
    p.add_argument("--exact-dup-rate", type=float, default=0.03)
    p.add_argument("--near-dup-rate", type=float, default=0.05)
    p.add_argument("--unsafe-rate", type=float, default=0.05)
    p.add_argument("--hazard-caption-rate", type=float, default=0.5)
    p.add_argument("--second-object-rate", type=float, default=0.5)
    p.add_argument("--formats", type=_parse_formats, default=None,
                   help="format mix, e.g. 'jpeg=0.9,webp=0.1' (names: " + ", ".join(FORMATS) + ")")  # fmt: skip
    p.add_argument("--languages", type=_parse_formats, default=None,
                   help="caption languages, e.g. 'zh=1' or 'en=1,zh=1,ru=1,hi=1' (" + ", ".join(LANGUAGES) + ")")  # fmt: skip
    p.add_argument("--min-side", type=int, default=256)
    p.add_argument("--max-side", type=int, default=1024)
    a = p.parse_args(argv)
    try:
        table = generate_world(
            a.out, a.rows, a.seed, a.base_url,
            mismatch_rate=a.mismatch_rate, exact_dup_rate=a.exact_dup_rate,
            near_dup_rate=a.near_dup_rate, unsafe_rate=a.unsafe_rate,
            hazard_caption_rate=a.hazard_caption_rate, second_object_rate=a.second_object_rate,
            formats=a.formats, min_side=a.min_side, max_side=a.max_side, languages=a.languages,
        )  # fmt: skip
    except ValueError as e:
        p.error(str(e))
    print(f"wrote {table.num_rows} rows to {Path(a.out) / 'urls.parquet'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
