"""The synthetic world: determinism, ground truth, formats, geometry and the CLI."""

from __future__ import annotations

import hashlib
import io
import random
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from testkit import subprocess_env
from testkit import synthetic as syn

BASE = "http://127.0.0.1:9999/world/"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    table = syn.generate_world(
        out,
        300,
        7,
        BASE,
        mismatch_rate=0.2,
        exact_dup_rate=0.05,
        near_dup_rate=0.1,
        unsafe_rate=0.2,
        min_side=64,
        max_side=256,
        formats={f: 1.0 for f in syn.FORMATS if f != "large"},
    )
    return out, table.to_pylist()


def _scene(**kw) -> syn.Scene:
    groups = kw.pop("groups")
    return syn.Scene(
        scene_id=0,
        groups=tuple(syn.ObjectGroup(*g) for g in groups),
        **{"background": "blue", "hazard": False, "hazard_corner": "", "layout_seed": 1, **kw},
    )


def test_same_seed_same_world_and_different_seed_differs(tmp_path):
    a = syn.generate_world(tmp_path / "a", 40, 3, BASE, min_side=64, max_side=128)
    b = syn.generate_world(tmp_path / "b", 40, 3, BASE, min_side=64, max_side=128)
    c = syn.generate_world(tmp_path / "c", 40, 4, BASE, min_side=64, max_side=128)
    assert a.equals(b)
    assert a.column("_gt_sha256").to_pylist() != c.column("_gt_sha256").to_pylist()
    for rel in a.column("_gt_path").to_pylist():
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def test_urls_point_at_the_written_files(world):
    root, rows = world
    on_disk = pq.read_table(root / "urls.parquet").to_pylist()
    assert on_disk == rows
    assert [r["_gt_row"] for r in rows] == list(range(300))
    for r in rows:
        assert r["url"] == BASE + r["_gt_path"]
        data = (root / r["_gt_path"]).read_bytes()
        assert len(data) == r["_gt_bytes"]
        assert hashlib.sha256(data).hexdigest() == r["_gt_sha256"]
        assert syn.decode_display(data).size == (r["_gt_width"], r["_gt_height"])


def test_duplicate_ground_truth(world):
    root, rows = world
    exact = [r for r in rows if r["_gt_duplicate_kind"] == "exact"]
    near = [r for r in rows if r["_gt_duplicate_kind"] == "near"]
    assert len(exact) == round(300 * 0.05) and len(near) == round(300 * 0.1)
    originals = [r for r in rows if r["_gt_duplicate_kind"] == ""]
    # Originals are distinct scenes: "different scene" means "different description".
    assert len({r["_gt_description"] for r in originals}) == len(originals)
    assert all(r["_gt_duplicate_of"] == -1 for r in originals)
    for r in exact + near:
        src = rows[r["_gt_duplicate_of"]]
        assert src["_gt_duplicate_kind"] == ""
        assert (src["_gt_scene_id"], src["_gt_description"]) == (
            r["_gt_scene_id"],
            r["_gt_description"],
        )
        assert r["url"] != src["url"]
        if r["_gt_duplicate_kind"] == "exact":
            assert r["_gt_sha256"] == src["_gt_sha256"]
        else:
            assert r["_gt_sha256"] != src["_gt_sha256"]
            assert "quality=" in r["_gt_transform"]
            # Still the same picture: small mean difference after aligning sizes.
            a = syn.decode_display((root / src["_gt_path"]).read_bytes()).resize((64, 64))
            b = syn.decode_display((root / r["_gt_path"]).read_bytes()).resize((64, 64))
            diff = np.abs(np.asarray(a, float) - np.asarray(b, float)).mean()
            assert diff < 25, (r["_gt_transform"], diff)


def _colors_and_shapes(text: str) -> tuple[set[str], set[str]]:
    for phrase in syn.HAZARD_PHRASES:  # "yellow and black striped diamond" is not an object
        text = text.replace(phrase, "")
    words = {w.strip(",") for w in text.split()}
    shapes = {s for s in syn.SHAPES if s in words or syn.PLURALS[s] in words}
    return words & set(syn.COLORS), shapes


def test_captions_match_or_describe_another_scene(world):
    _, rows = world
    originals = [r for r in rows if r["_gt_duplicate_kind"] == ""]
    mismatched = [r for r in rows if not r["_gt_caption_matches"]]
    assert all(r["_gt_duplicate_kind"] == "" for r in mismatched)
    assert 0.12 < len(mismatched) / len(originals) < 0.3
    differ = 0
    for r in rows:
        cap = _colors_and_shapes(r["caption"])
        desc_colors, desc_shapes = _colors_and_shapes(r["_gt_description"])
        if r["_gt_caption_matches"]:
            # Matched captions name every group's colour and shape, and nothing else
            # (the background may be left out).
            assert cap[1] == desc_shapes, r
            assert desc_colors - {r["_gt_background"]} <= cap[0] <= desc_colors, r
            assert r["_gt_hazard_in_caption"] <= r["_gt_unsafe"]
        else:
            differ += cap != (desc_colors, desc_shapes)
    # Mismatched captions describe another scene, nearly always with other colours or shapes.
    assert differ >= 0.9 * len(mismatched)


def test_hazard_mentions_are_a_ground_truth_split(world):
    _, rows = world
    unsafe = [r for r in rows if r["_gt_unsafe"] and r["_gt_caption_matches"]]
    said = [r for r in unsafe if r["_gt_hazard_in_caption"]]
    unsaid = [r for r in unsafe if not r["_gt_hazard_in_caption"]]
    assert said and unsaid
    phrases = syn.HAZARD_PHRASES
    assert all(any(p in r["caption"] for p in phrases) for r in said)
    assert not any(any(p in r["caption"] for p in phrases) for r in unsaid)
    assert all(r["_gt_description"].endswith("with a hazard sign") for r in unsafe)


def test_every_format_is_present_and_really_that_format(world):
    root, rows = world
    by_fmt: dict[str, list] = {}
    for r in rows:
        by_fmt.setdefault(r["_gt_format"], []).append(r)
    assert set(by_fmt) == set(syn.FORMATS) - {"large"}
    for fmt, rs in by_fmt.items():
        for r in rs[:3]:
            with Image.open(root / r["_gt_path"]) as im:
                if fmt == "grayscale":
                    assert im.mode == "L"
                elif fmt == "cmyk_jpeg":
                    assert (im.format, im.mode) == ("JPEG", "CMYK")
                elif fmt == "png_alpha":
                    assert (im.format, im.mode) == ("PNG", "RGBA")
                    assert im.getchannel("A").getextrema() == (0, 255)
                elif fmt == "webp":
                    assert im.format == "WEBP"
                elif fmt == "gif_animated":
                    assert im.format == "GIF" and im.n_frames == 3
                elif fmt == "exif_rotated":
                    orientation = im.getexif().get(0x0112)
                    assert orientation in (3, 6, 8)
                    if orientation in (6, 8):
                        assert im.size == (r["_gt_height"], r["_gt_width"])
                else:
                    assert (im.format, im.mode) == ("JPEG", "RGB")


@pytest.mark.parametrize("fmt", syn.FORMATS)
def test_encoded_formats_decode_back_to_the_rendered_scene(fmt):
    scene = _scene(
        groups=[("star", "red", 2, "large", "top left")], hazard=True, hazard_corner="bottom right"
    )
    img = syn.render(scene, (180, 150))
    data, size = syn.encode_image(img, fmt, random.Random(0))
    assert size == img.size
    shown = syn.decode_display(data)
    assert shown.size == img.size
    ref = img.convert("L").convert("RGB") if fmt == "grayscale" else img
    a, b = np.asarray(shown, float), np.asarray(ref, float)
    if fmt == "png_alpha":  # the see-through frame is flattened onto white
        edge = 2 * max(1, min(img.size) // 50)
        a, b = a[edge:-edge, edge:-edge], b[edge:-edge, edge:-edge]
    assert np.abs(a - b).mean() < 6, fmt
    if fmt == "exif_rotated":
        # Ignoring the tag shows a rotated picture: the tag really carries the orientation.
        with Image.open(io.BytesIO(data)) as raw:
            raw_rgb = raw.convert("RGB")
        assert raw_rgb.size != img.size or np.abs(np.asarray(raw_rgb, float) - b).mean() > 20
        assert ImageOps.exif_transpose(Image.open(io.BytesIO(data))).size == img.size


def test_large_format_sizes(tmp_path):
    t = syn.generate_world(
        tmp_path, 2, 0, BASE, formats={"large": 1.0}, exact_dup_rate=0, near_dup_rate=0
    )
    for w, h in zip(
        t.column("_gt_width").to_pylist(), t.column("_gt_height").to_pylist(), strict=True
    ):
        assert 1500 <= max(w, h) <= 4000
        assert min(w, h) >= max(w, h) / 1.34


def _mask(img: Image.Image, rgb, tol: int = 40) -> np.ndarray:
    a = np.asarray(img, dtype=int)
    return np.abs(a - np.array(rgb)).max(axis=-1) <= tol


def test_render_puts_each_group_in_its_region_and_the_hazard_in_its_corner():
    scenes = syn.sample_scenes(150, 11, unsafe_rate=0.5)
    side = 200
    for scene in scenes:
        img = syn.render(scene, side)
        hazard_colors = {"yellow", "black"} if scene.hazard else set()
        for g in scene.groups:
            m = _mask(img, syn.COLORS[g.color])
            if g.color in hazard_colors:
                hx, hy = syn._HAZARD_CENTER[scene.hazard_corner]
                h = syn._HAZARD_FRACTION / 2 + 0.02
                m[
                    int((hy - h) * side) : int((hy + h) * side),
                    int((hx - h) * side) : int((hx + h) * side),
                ] = False
            ys, xs = np.nonzero(m)
            rx, ry = syn._REGION_ORIGIN[g.position]
            # Every pixel of the group's colour is inside its region (0.5 x 0.5 of the scene).
            assert xs.min() >= rx * side - 1 and xs.max() <= (rx + 0.5) * side + 1, scene
            assert ys.min() >= ry * side - 1 and ys.max() <= (ry + 0.5) * side + 1, scene
            # ... and covers about count x the shape's area (no overlaps, nothing clipped).
            r = syn.object_radius(g, side)
            area = {"circle": np.pi * r * r, "square": (1.6 * r) ** 2}.get(g.shape)
            if area is not None and not hazard_colors & {g.color}:
                assert abs(m.sum() - g.count * area) < 0.15 * g.count * area, (scene, m.sum())
        if scene.hazard:
            hx, hy = syn._HAZARD_CENTER[scene.hazard_corner]
            box = img.crop(
                (
                    int((hx - 0.1) * side),
                    int((hy - 0.1) * side),
                    int((hx + 0.1) * side),
                    int((hy + 0.1) * side),
                )
            )
            assert _mask(box, (245, 200, 0), 30).mean() > 0.1  # yellow stripes
            assert _mask(box, (10, 10, 10), 30).mean() > 0.1  # black stripes


def test_render_background_and_non_square_layout():
    scene = _scene(groups=[("circle", "red", 1, "large", "center")], background="green")
    img = syn.render(scene, (300, 200))
    assert img.size == (300, 200)
    assert _mask(img, syn.COLORS["green"], 15)[:, :50].all()  # margins are background
    ys, xs = np.nonzero(_mask(img, syn.COLORS["red"]))
    assert abs(xs.mean() - 150) < 6 and abs(ys.mean() - 100) < 6
    assert syn.render(scene, (300, 200)).tobytes() == img.tobytes()


def test_descriptions_rarely_collide_and_unique_mode_forbids_it():
    scenes = syn.sample_scenes(2000, 5)
    distinct = len({s.description for s in scenes})
    assert distinct >= 0.97 * 2000
    unique = syn.sample_scenes(2000, 5, unique=True)
    assert len({s.description for s in unique}) == 2000


def test_caption_grammar_and_hazard_switch():
    rng = random.Random(1)
    scene = _scene(groups=[("circle", "orange", 1, "small", "top left")], background="orange",
                   hazard=True, hazard_corner="bottom right")  # fmt: skip
    assert syn.describe(scene) == (
        "a small orange circle in the top left on an orange background with a hazard sign"
    )
    for _ in range(50):
        text = syn.caption(scene, rng, mention_hazard=True)
        assert "a orange" not in text and "orange circle" in text
        assert any(p in text for p in syn.HAZARD_PHRASES)
        assert not any(
            p in syn.caption(scene, rng, mention_hazard=False) for p in syn.HAZARD_PHRASES
        )


def test_bad_knobs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="mismatch_rate"):
        syn.generate_world(tmp_path, 10, 0, BASE, mismatch_rate=1.5)
    with pytest.raises(ValueError, match="formats"):
        syn.generate_world(tmp_path, 10, 0, BASE, formats={"tiff": 1.0})
    with pytest.raises(ValueError, match="no original rows"):
        syn.generate_world(tmp_path, 10, 0, BASE, exact_dup_rate=0.5, near_dup_rate=0.5)


def test_cli_writes_images_and_url_list(tmp_path):
    out = tmp_path / "w"
    cmd = [sys.executable, "-m", "testkit.synthetic", "--rows", "25", "--seed", "2",
           "--out", str(out), "--base-url", "http://127.0.0.1:8000", "--formats", "jpeg=1,webp=1"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, env=subprocess_env())
    t = pq.read_table(out / "urls.parquet")
    assert t.num_rows == 25
    assert set(t.column("_gt_format").to_pylist()) <= {"jpeg", "webp"}
    for url, rel in zip(t.column("url").to_pylist(), t.column("_gt_path").to_pylist(), strict=True):
        assert url == "http://127.0.0.1:8000/" + rel and (out / rel).is_file()
    bad = subprocess.run(cmd[:-1] + ["tiff=1"], capture_output=True, text=True, env=subprocess_env())
    assert bad.returncode == 2 and "formats" in bad.stderr


def test_default_world_generation_is_fast(tmp_path):
    start = time.process_time()
    syn.generate_world(tmp_path, 200, 1, BASE)
    # 2,000 default rows must take well under a minute on one core; 200 rows get a tenth.
    assert time.process_time() - start < 6
