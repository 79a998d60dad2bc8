"""Pixel confirmation of near-duplicate pairs (pipeline/pixel_check.py) and its use by dedup."""

from __future__ import annotations

import dataclasses
import io
import os
import random

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline import schema as S
from pipeline.config import ConfigError, DedupConfig
from pipeline.decisions import dedup_reason
from pipeline.dedup import dedup_table
from pipeline.pixel_check import (
    BLOB_MAX,
    CHANNEL_BLOB_MAX,
    CHANNEL_MEAN_MAX,
    MEAN_MAX,
    PixelBounds,
    confirm_pairs,
    contrast,
    residuals,
)
from pipeline.thumbnails import (
    THUMB_BYTES,
    THUMB_SIDE,
    ThumbColumn,
    ThumbFile,
    thumbnail,
    thumbs_array,
)
from testkit.synthetic import ObjectGroup, Scene, perturb, render

SCENE = Scene(
    scene_id=0,
    background="blue",
    groups=(ObjectGroup("star", "yellow", 2, "large", "top left"),),
    hazard=False,
    hazard_corner="",
    layout_seed=11,
)


def _thumb(img: Image.Image) -> np.ndarray:
    return np.frombuffer(thumbnail(img), np.uint8).reshape(THUMB_SIDE, THUMB_SIDE, 3)


def _stored(scene: Scene, side: int = 128) -> Image.Image:
    """The scene as the decode stage stores it: a square of ``side`` px, JPEG round trip."""
    buf = io.BytesIO()
    render(scene, side).save(buf, "JPEG", quality=90)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _near_copy(img: Image.Image, seed: int) -> Image.Image:
    """A near duplicate as the synthetic world makes them (crop, resize, re-encode), brought
    back to the stored square size as the decode stage would."""
    near, quality, _ = perturb(img, random.Random(seed))
    buf = io.BytesIO()
    near.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB").resize(img.size)


def _variant(**changes) -> Scene:
    return dataclasses.replace(SCENE, groups=(dataclasses.replace(SCENE.groups[0], **changes),))


def test_thumbnail_bytes_and_array_round_trip() -> None:
    img = _stored(SCENE)
    data = thumbnail(img)
    assert len(data) == THUMB_BYTES == 32 * 32 * 3
    arr, ok = thumbs_array([data, None, b"short"])
    assert ok.tolist() == [True, False, False]
    expected = np.asarray(img.resize((32, 32), Image.Resampling.BILINEAR))
    assert np.array_equal(arr[0], expected) and not arr[1].any() and not arr[2].any()


@pytest.mark.parametrize("typ", [pa.binary(), pa.large_binary()])
def test_thumb_column_gathers_the_same_bytes_as_the_values(typ: pa.DataType) -> None:
    # Several chunks, one of them a slice (non-zero offset), nulls and wrong lengths: each
    # position's thumbnail is the value's bytes, missing ones zero and not ok.
    rng = np.random.default_rng(5)
    values = [rng.integers(0, 256, THUMB_BYTES, dtype=np.uint8).tobytes() for _ in range(30)]
    values[3] = None
    values[7] = b"short"
    values[20] = values[20] + b"x"
    whole = pa.array(values, typ)
    col = pa.chunked_array([whole.slice(0, 10), whole.slice(10, 12), whole.slice(22)])
    rows = np.array([29, 0, 3, 7, 12, 20, 21, 10, 9, 22], dtype=np.int64)
    view = ThumbColumn(col, rows)
    expected, expected_ok = thumbs_array([values[r] for r in rows.tolist()])
    for idx in (np.arange(len(rows)), np.array([4, 4, 0, 8, 2])):
        arr, ok = view.gather(idx)
        assert ok.tolist() == expected_ok[idx].tolist()
        assert np.array_equal(arr, expected[idx])
    assert not ThumbColumn(None, rows).gather(np.arange(3))[1].any()


def test_thumb_file_reads_back_what_the_column_holds() -> None:
    # Appended a file at a time (the last part without a thumbnail column: all nulls), read
    # back in any order with repeats: the same bytes and ok flags as the values themselves;
    # the file is gone once closed.
    rng = np.random.default_rng(9)
    values = [rng.integers(0, 256, THUMB_BYTES, dtype=np.uint8).tobytes() for _ in range(20)]
    values[2], values[11], values[19] = None, b"short", values[19] + b"x"
    with ThumbFile() as spill:
        spill.append(pa.array(values[:10], pa.binary()))
        spill.append(pa.chunked_array([pa.array(values[10:], pa.large_binary())]))
        spill.append(pa.nulls(5, pa.binary()))
        assert spill.rows == 25
        expected, expected_ok = thumbs_array(values + [None] * 5)
        idx = np.array([24, 0, 2, 11, 12, 13, 14, 19, 3, 3, 18, 20])
        arr, ok = spill.gather(idx)
        assert ok.tolist() == expected_ok[idx].tolist() and np.array_equal(arr, expected[idx])
        assert ok.sum() == 7
        view = ThumbColumn(spill, np.array([5, 2, 18]))
        arr, ok = view.gather(np.array([2, 0, 1, 2]))
        assert ok.tolist() == [True, True, False, True]
        assert np.array_equal(arr, expected[[18, 5, 2, 18]])
        with pytest.raises(IndexError):
            spill.gather(np.array([25]))
        fd = spill._file.fileno()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_identical_and_offset_thumbnails_hand_worked() -> None:
    a = _thumb(_stored(SCENE))[None]
    for figure in residuals(a, a.copy()):
        assert figure[0] == pytest.approx(0.0, abs=1e-6)
    # Every pixel 10 levels brighter (the scene's colours stay inside 0..245): at the identity
    # pose the difference is exactly 10 everywhere. Another pose may blur edges into a slightly
    # lower mean, but no pose can remove a uniform offset.
    assert a.max() <= 245 and contrast(a)[0] >= 64
    r = residuals(a, a + np.uint8(10))
    assert 9.5 <= r.mean[0] <= 10.0 + 1e-4 and r.blob[0] >= 9.5
    # Every channel moved by the same 10: the channel that differs most says the same.
    assert 9.5 <= r.channel_mean[0] <= 10.0 + 1e-4 and r.channel_blob[0] >= 9.5


def test_contrast_is_the_spread_of_the_most_varied_channel() -> None:
    t = np.zeros((1, 4, 4, 3), np.uint8)
    t[0, :, :, 1] = np.arange(16).reshape(4, 4) * 10  # green 0..150
    t[0, :, :, 2] = 7
    ref = np.percentile(np.arange(16) * 10.0, 99) - np.percentile(np.arange(16) * 10.0, 1)
    assert contrast(t)[0] == pytest.approx(ref)


@pytest.mark.parametrize("seed", range(6))
def test_near_copies_are_confirmed(seed: int) -> None:
    img = _stored(SCENE)
    a, b = _thumb(img)[None], _thumb(_near_copy(img, seed))[None]
    assert confirm_pairs(a, np.array([True]), b, np.array([True]), [0], [0]).tolist() == [True]


@pytest.mark.parametrize(
    "changes",
    [{"position": "bottom right"}, {"position": "center"}, {"count": 3}, {"shape": "square"}, {"color": "red"}],
)
def test_different_scenes_are_not_confirmed(changes: dict) -> None:
    a = _thumb(_stored(SCENE))[None]
    b = _thumb(_stored(_variant(**changes)))[None]
    assert not confirm_pairs(a, np.array([True]), b, np.array([True]), [0], [0])[0], residuals(a, b)


def test_a_difference_in_one_channel_is_bounded_in_that_channel() -> None:
    # Hand-worked: the scene with its green channel 12 levels higher everywhere (its colours
    # stay inside 0..243 there). Averaged over the channels that is a 4-level difference, within
    # the averaged bounds (two JPEG encodings of one picture differ more); in the channel that
    # differs it is 12, and no pose can remove a uniform offset.
    a = _thumb(_stored(SCENE))[None]
    assert a[..., 1].max() <= 243
    b = a.copy()
    b[..., 1] += 12
    r = residuals(a, b)
    assert 11.5 / 3 <= r.mean[0] <= 4.0 + 1e-4 and r.blob[0] <= 4.0 + 1e-4
    assert 11.5 <= r.channel_mean[0] <= 12.0 + 1e-4 and 11.5 <= r.channel_blob[0] <= 12.0 + 1e-4
    assert r.mean[0] <= MEAN_MAX < CHANNEL_MEAN_MAX < r.channel_mean[0]
    ok = np.array([True])
    assert not confirm_pairs(a, ok, b, ok, [0], [0])[0]
    # The per-channel bound is what tells them apart.
    averaged_only = PixelBounds(channel_mean_max=255.0, channel_blob_max=255.0)
    assert confirm_pairs(a, ok, b, ok, [0], [0], averaged_only)[0]


def _scene(scene_id: int, background: str, group: ObjectGroup, layout_seed: int) -> Scene:
    return Scene(scene_id, background, (group,), hazard=False, hazard_corner="", layout_seed=layout_seed)


@pytest.mark.parametrize(
    ("pair", "averaged_confirms"),
    [
        # Pairs of rows that the check confirmed with the averaged bounds alone in the job's
        # default run on synthetic worlds 990066 and 990075, dropping a different picture as
        # a copy (the worlds' own scenes, layout seeds included: the shades differ in one or
        # two channels). Rendered here, the first is still confirmed that way; the second sits
        # just past the averaged mean bound (4.6 against 4.5).
        (
            (
                _scene(390, "purple", ObjectGroup("square", "blue", 2, "small", "bottom right"), 3553201667),
                _scene(866, "purple", ObjectGroup("circle", "blue", 2, "small", "bottom right"), 3708619082),
            ),
            True,
        ),
        (
            (
                _scene(530, "orange", ObjectGroup("star", "yellow", 2, "large", "bottom left"), 2432278981),
                _scene(473, "orange", ObjectGroup("star", "yellow", 1, "small", "bottom left"), 439203555),
            ),
            False,
        ),
    ],
    ids=["squares-circles", "two-stars-one"],
)
def test_scenes_that_differ_in_one_colour_channel_are_told_apart(pair: tuple[Scene, Scene], averaged_confirms: bool) -> None:
    a, b = (_thumb(_stored(s))[None] for s in pair)
    ok = np.array([True])
    assert not confirm_pairs(a, ok, b, ok, [0], [0])[0], (residuals(a, b), residuals(b, a))
    averaged_only = PixelBounds(channel_mean_max=255.0, channel_blob_max=255.0)
    assert confirm_pairs(a, ok, b, ok, [0], [0], averaged_only)[0] == averaged_confirms
    # Near copies of either scene are still confirmed.
    for scene, t in zip(pair, (a, b), strict=True):
        img = _stored(scene)
        for seed in range(3):
            assert confirm_pairs(t, ok, _thumb(_near_copy(img, seed))[None], ok, [0], [0])[0], (scene, seed)

def test_faint_pictures_are_compared_at_full_contrast() -> None:
    # Two scenes that differ in where the stars are, washed out to 8 % of their contrast (as a
    # dim grayscale file can be): raw differences are tiny, the contrast gain restores them.
    def faint(scene: Scene) -> np.ndarray:
        t = _thumb(_stored(scene)).astype(np.float64)
        return (128 + 0.08 * (t - t.mean())).round().astype(np.uint8)[None]

    a, b = faint(SCENE), faint(_variant(position="bottom right"))
    assert contrast(a)[0] < 20
    raw = np.abs(a.astype(float) - b.astype(float)).mean()
    assert raw < MEAN_MAX  # below the mean bound without the gain
    assert not confirm_pairs(a, np.array([True]), b, np.array([True]), [0], [0])[0]
    # A faint picture still matches itself.
    assert confirm_pairs(a, np.array([True]), a.copy(), np.array([True]), [0], [0])[0]


def test_pairs_without_a_thumbnail_are_not_confirmed() -> None:
    a = _thumb(_stored(SCENE))[None]
    got = confirm_pairs(a, np.array([False]), a, np.array([True]), [0], [0])
    assert got.tolist() == [False]


# ------------------------------------------------------------------------------ in dedup


def _table(thumbs: list[bytes | None], emb: np.ndarray) -> pa.Table:
    n = len(thumbs)
    flat = pa.array(emb.astype(np.float16).reshape(-1), pa.float16())
    return pa.table(
        {
            "key": [f"k{i}" for i in range(n)],
            "status": ["ok"] * n,
            "sha256": [f"h{i}" for i in range(n)],
            "clip_score": pa.array([0.5 - 0.01 * i for i in range(n)], pa.float32()),
            "image_embedding": pa.FixedSizeListArray.from_arrays(flat, emb.shape[1]),
            S.IMAGE_THUMB: pa.array(thumbs, pa.binary()),
        }
    )


def test_dedup_drops_only_pixel_confirmed_pairs() -> None:
    img = _stored(SCENE)
    thumbs = [
        thumbnail(img),  # k0: the picture
        thumbnail(_near_copy(img, 3)),  # k1: its near copy
        thumbnail(_stored(_variant(position="bottom right"))),  # k2: another scene
        None,  # k3: no thumbnail
    ]
    emb = np.tile(np.eye(1, 8), (4, 1))  # all four embed identically: cosine 1
    cfg = DedupConfig(threshold=0.9, pixel_check=True)
    lines: list[str] = []
    out = dedup_table(_table(thumbs, emb), cfg, progress=lines.append)
    # Checks, in rank order against kept rows only: k1-k0 passes; k2-k0 fails (k1, dropped, is
    # not asked about); k3-k0 and k3-k2 fail (no thumbnail).
    assert lines[0] == "  dedup: 4 rows, 4 distinct images by sha256"
    assert lines[1].startswith("  dedup: 1 semantic duplicates at cosine >= 0.9 in 1 clusters, 4 pixel checks (1 passed), ")
    assert out["duplicate_of"].to_pylist() == [None, "k0", None, None]
    assert out["dup_kind"].to_pylist() == [None, "semantic", None, None]
    # Without the check the embedding alone drops all three.
    plain = dedup_table(_table(thumbs, emb), DedupConfig(threshold=0.9))
    assert plain["duplicate_of"].to_pylist() == [None, "k0", "k0", "k0"]


def test_dedup_with_thumbnails_from_a_spill_file_decides_the_same() -> None:
    # The global pass hands dedup the run's thumbnails in a file instead of a column: same
    # links, same counts, and a file of another length is refused.
    img = _stored(SCENE)
    thumbs = [thumbnail(img), thumbnail(_near_copy(img, 3)), thumbnail(_stored(_variant(position="bottom right"))), None]
    emb = np.tile(np.eye(1, 8), (4, 1))
    cfg = DedupConfig(threshold=0.9, pixel_check=True)
    table = _table(thumbs, emb)
    by_column: list[str] = []
    want = dedup_table(table, cfg, progress=by_column.append)
    by_file: list[str] = []
    with ThumbFile() as spill:
        spill.append(table[S.IMAGE_THUMB])
        got = dedup_table(table.drop_columns([S.IMAGE_THUMB]), cfg, progress=by_file.append, thumbs=spill)
        assert got["duplicate_of"].to_pylist() == want["duplicate_of"].to_pylist() == [None, "k0", None, None]
        assert [line.split(" in ")[0] for line in by_file] == [line.split(" in ")[0] for line in by_column]
        with pytest.raises(ValueError, match="4 rows for a table of 3"):
            dedup_table(table.slice(0, 3), cfg, thumbs=spill)


def test_dedup_against_previous_run_checks_pixels_too() -> None:
    img = _stored(SCENE)
    other = _stored(_variant(count=3))
    emb = np.tile(np.eye(1, 8), (2, 1))
    previous = _table([thumbnail(img)], emb[:1]).set_column(0, "key", pa.array(["old"]))
    current = _table([thumbnail(_near_copy(img, 1)), thumbnail(other)], emb)
    out = dedup_table(current, DedupConfig(threshold=0.9, pixel_check=True), previous=previous)
    assert out["duplicate_of"].to_pylist() == ["old", None]
    assert out["dup_kind"].to_pylist() == ["previous_run", None]


def test_pixel_check_needs_thumbnails_and_valid_bounds() -> None:
    emb = np.tile(np.eye(1, 8), (2, 1))
    table = _table([None, None], emb).drop_columns([S.IMAGE_THUMB])
    with pytest.raises(ValueError, match="image_thumb"):
        dedup_table(table, DedupConfig(pixel_check=True))
    for field, bad in (("pixel_mean_max", -1.0), ("pixel_blob_max", 300.0), ("pixel_channel_mean_max", -1.0),
                       ("pixel_channel_blob_max", 300.0)):
        with pytest.raises(ConfigError, match=f"dedup.{field}"):
            DedupConfig(**{field: bad}).validate()


def test_drop_reason_names_the_pixel_bounds() -> None:
    cfg = DedupConfig(threshold=0.9, pixel_check=True)
    assert dedup_reason("semantic", "tiny-synthetic@sha256:ab", cfg).startswith(
        "dedup:semantic(cos>=0.9 & pixels(mean<=4.5,blob<=23; per channel mean<=7,blob<=34); "
    )
    assert "pixels" not in dedup_reason("semantic", "m", DedupConfig(threshold=0.9))


def test_real_photographs_near_copies_confirmed_other_photos_not() -> None:
    # The bounds were set on flat synthetic scenes; camera photos have texture, which JPEG and
    # resampling disturb more. The seven img2dataset test photos, decoded as the demo stores
    # images (centre crop 128), each against 8 near copies made as the synthetic world makes them.
    from pipeline.config import DecodeConfig
    from pipeline.stages.decode import DecodeStage
    from testkit.testdata import photos

    paths = photos()
    assert len(paths) == 7
    blobs, source = [], []
    for k, path in enumerate(paths):
        data = path.read_bytes()
        blobs.append(data)
        source.append(k)
        for s in range(8):
            near, quality, _ = perturb(Image.open(io.BytesIO(data)).convert("RGB"), random.Random(100 * k + s))
            buf = io.BytesIO()
            near.save(buf, "JPEG", quality=quality)
            blobs.append(buf.getvalue())
            source.append(k)
    n = len(blobs)
    rows = pa.table(
        {
            S.KEY: [f"{i:09d}" for i in range(n)],
            S.STATUS: [S.OK] * n,
            S.ERROR: pa.nulls(n, pa.string()),
            S.IMAGE_BYTES: pa.array(blobs, pa.binary()),
        }
    )
    stored = DecodeStage(cfg=DecodeConfig(image_size=128, resize_mode="center_crop")).process_batch(rows)
    thumbs, ok = thumbs_array([thumbnail(Image.open(io.BytesIO(b))) for b in stored.column(S.IMAGE).to_pylist()])
    src = np.array(source)
    i, j = np.triu_indices(n, 1)
    confirmed = confirm_pairs(thumbs, ok, thumbs, ok, i, j)
    originals = np.flatnonzero(np.r_[True, src[1:] != src[:-1]])
    to_copies = np.isin(i, originals) & (src[i] == src[j])
    assert confirmed[to_copies].sum() >= 52, confirmed[to_copies].sum()  # of 56; 54 when written
    assert not confirmed[src[i] != src[j]].any()  # 1,701 pairs of different photos
    # Symmetric: the same answer whichever row is named first.
    assert np.array_equal(confirm_pairs(thumbs, ok, thumbs, ok, j, i), confirmed)


def test_the_lower_bounds_never_exceed_the_searched_mean_and_blob_and_skips_change_no_answer() -> None:
    """confirm_pairs skips the pose search where lower_bounds proves it cannot pass; the
    bounds must hold for every pose the search tries (reference: the search itself)."""
    from pipeline.pixel_check import MIN_CONTRAST, lower_bounds

    rng = np.random.default_rng(11)
    n = 60
    a = rng.integers(0, 256, (n, THUMB_SIDE, THUMB_SIDE, 3), dtype=np.uint8)
    b = a.copy()
    b[: n // 3] = np.roll(a[: n // 3], (2, -3), axis=(1, 2))  # shifted copies: must stay candidates
    b[n // 3 : 2 * n // 3] = rng.integers(0, 256, (n // 3, THUMB_SIDE, THUMB_SIDE, 3), dtype=np.uint8)
    b[2 * n // 3 :] = (a[2 * n // 3 :] // 2 + 60).astype(np.uint8)  # same layout, other colours
    # One more kind: the same picture with one square patch painted over, which the mean
    # forgives and the blob does not.
    ramp = 20 + 2 * np.arange(THUMB_SIDE)[None, :, None] + rng.integers(0, 30, (20, 1, 1, 3))  # gentle slopes
    smooth = np.broadcast_to(ramp, (20, THUMB_SIDE, THUMB_SIDE, 3)).astype(np.uint8)
    painted = smooth.copy()
    # 9 x 9: larger than the 7 x 7 window a pose can move a pixel within, small beside the mean.
    painted[:, 10:19, 10:19] += 150
    # And the same with the patch in the green channel only, 60 levels: within the averaged
    # blob bound, past the per-channel one.
    green = smooth.copy()
    green[:, 10:19, 10:19, 1] += 60
    a, b = np.concatenate([a, smooth, smooth]), np.concatenate([b, painted, green])
    n = len(a)
    searched = residuals(a, b)
    gain = MIN_CONTRAST / np.clip((contrast(a) + contrast(b)) / 2, 1.0, MIN_CONTRAST)
    bound = lower_bounds(a, b)
    for name in bound._fields:
        assert (getattr(bound, name) <= getattr(searched, name) / gain + 1e-4).all(), name
    assert (bound.mean[20:40] > 0).all()  # different pictures get a useful bound
    # The painted patch alone rules those pairs out, where the mean bound cannot.
    assert (bound.blob[60:80] * gain[60:80] > BLOB_MAX).all() and (bound.mean[60:80] * gain[60:80] <= MEAN_MAX).all()
    # The green patch: only the per-channel blob bound rules it out.
    g = slice(80, 100)
    assert (bound.channel_blob[g] * gain[g] > CHANNEL_BLOB_MAX).all() and (bound.blob[g] * gain[g] <= BLOB_MAX).all()
    ok = np.ones(n, bool)
    idx = np.arange(n)
    fast = confirm_pairs(a, ok, b, ok, idx, idx)
    full = PixelBounds().passes(residuals(a, b)) | PixelBounds().passes(residuals(b, a))
    assert np.array_equal(fast, full)


def _bound_cases() -> tuple[np.ndarray, np.ndarray]:
    """Pairs of every kind a bound must not misjudge: random pictures, shifted copies,
    recoloured layouts, smooth ramps with a painted patch, and near copies of scenes."""
    rng = np.random.default_rng(12)
    a = rng.integers(0, 256, (30, THUMB_SIDE, THUMB_SIDE, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (30, THUMB_SIDE, THUMB_SIDE, 3), dtype=np.uint8)
    b[:10] = np.roll(a[:10], (2, -3), axis=(1, 2))
    b[10:20] = (a[10:20] // 2 + 60).astype(np.uint8)
    ramp = 20 + 2 * np.arange(THUMB_SIDE)[None, :, None] + rng.integers(0, 30, (10, 1, 1, 3))
    smooth = np.broadcast_to(ramp, (10, THUMB_SIDE, THUMB_SIDE, 3)).astype(np.uint8)
    painted = smooth.copy()
    painted[:, 10:19, 10:19] += 150
    img = _stored(SCENE)
    scenes_a = [_thumb(img)] * 4 + [_thumb(_stored(_variant(count=3)))] * 2
    scenes_b = [_thumb(_near_copy(img, s)) for s in range(4)] + [_thumb(img), _thumb(_stored(_variant(position="bottom right")))]
    return (np.concatenate([a, smooth, np.stack(scenes_a)]), np.concatenate([b, painted, np.stack(scenes_b)]))


def test_block_bounds_never_exceed_the_per_pixel_bounds_or_the_search() -> None:
    """The block bound (from 729 bytes of statistics a row) is checked against the per-pixel
    bound it relaxes and against the searched mean and blob themselves (float64 reference,
    both directions)."""
    from pipeline.pixel_check import block_lower_bounds, block_stats, lower_bounds

    a, b = _bound_cases()
    sa, sb = block_stats(a), block_stats(b)
    assert sa.shape == (len(a), 3, 9, 9, 3) and sa.dtype == np.uint8
    for x, y, sx, sy in ((a, b, sa, sb), (b, a, sb, sa)):
        block = block_lower_bounds(sx, sy, THUMB_SIDE)
        pixel = lower_bounds(x, y)
        searched = residuals(x, y)
        gain = 64.0 / np.clip((contrast(x) + contrast(y)) / 2, 1.0, 64.0)
        for name in block._fields:
            lb = getattr(block, name)
            assert (lb <= getattr(pixel, name) + 1e-6).all(), name
            assert (lb <= getattr(searched, name) / gain + 1e-4).all(), name
    # Noise reaches every level within a few pixels (no bound to speak of), but a painted
    # patch on a smooth picture is ruled out by the block bound alone.
    block = block_lower_bounds(sa, sb, THUMB_SIDE)
    assert (block.blob[30:40] > BLOB_MAX).all() and (block.channel_blob[30:40] > CHANNEL_BLOB_MAX).all()


def test_block_bound_hand_worked() -> None:
    """A flat grey thumbnail (level 100) against one whose interior block at the top left is
    white: the block's stats are exact, and only that block may differ."""
    from pipeline.pixel_check import block_lower_bounds, block_stats

    a = np.full((1, THUMB_SIDE, THUMB_SIDE, 3), 100, np.uint8)
    b = a.copy()
    b[0, :12, :12] = 255  # covers the first interior blocks and the reach of their neighbours
    sa, sb = block_stats(a), block_stats(b)
    assert (sa[0, 0] == 100).all() and (sa[0, 1] == 100).all() and (sa[0, 2] == 100).all()
    assert (sb[0, 0, 0, 0] == 255).all() and (sb[0, 1, 0, 0] == 255).all()  # block (0, 0): all white, and all it can reach
    r = block_lower_bounds(sa, sb, THUMB_SIDE)
    # Grey and white move every channel alike: each channel's bound is the averaged one.
    assert r.channel_mean[0] == pytest.approx(r.mean[0]) and r.channel_blob[0] == pytest.approx(r.blob[0])
    # Block (0, 0) of b can only show white: |100 - 255| less the 0.5 rounding slack.
    assert r.blob[0] == pytest.approx(154.5)
    # By hand: a pose moves a pixel at most 3 px (reach 3 at S = 32), so b's minimum there is
    # white only where the whole 7 x 7 window is, rows and columns 0-8. Interior blocks start
    # at 2, 5, 8, ...: they hold 3, 3, 1, 0, ... such rows (and columns). A block with k of its
    # 9 pixels white-only has a minimum mean of 100 + 155 k / 9, floored: k = 9 in 4 blocks
    # (255: 154.5 each after the slack), k = 3 in 4 (151: 50.5), k = 1 in 1 (117: 16.5).
    assert r.mean[0] == pytest.approx((4 * 154.5 + 4 * 50.5 + 16.5) * 9 / 28**2)


def test_the_block_bound_changes_no_answer_of_dedup_pixel_checks() -> None:
    """_PixelConfirm skips the search for pairs the block bound rules out: its answers equal
    confirm_pairs' on every pair, and most different pictures never reach the search."""
    from pipeline.dedup.table import _PixelConfirm

    a, b = _bound_cases()
    thumbs = np.concatenate([a, b])
    col = pa.chunked_array([pa.array([t.tobytes() for t in thumbs], pa.binary())])
    n = len(a)
    rows = np.arange(2 * n)
    pi, pj = np.arange(n), np.arange(n) + n
    check = _PixelConfirm(DedupConfig(threshold=0.9, pixel_check=True), col, rows)
    got = check.many(pi, pj)
    ok = np.ones(2 * n, dtype=bool)
    assert np.array_equal(got, confirm_pairs(thumbs, ok, thumbs, ok, pi, pj))
    assert got[40:44].all() and not got[10:40].any() and not got[44:].any()
    assert check.searched <= n - 10  # the painted ramps, at least, stop at the bound


@pytest.mark.parametrize("side,border", [(16, 1), (32, 2), (9, 1)])
def test_separable_warp_equals_grid_sample(side: int, border: int) -> None:
    """The search warps by two small matrix products per pose; reference: torch's own
    affine_grid + grid_sample (bilinear, border padding) at the same poses, pixel by pixel."""
    import torch
    import torch.nn.functional as F

    from pipeline.pixel_check import (
        _SCALES,
        _SHIFTS,
        _axis_weights,
        _coarse_weights,
        _warp_differences,
    )

    rng = np.random.default_rng(side)
    a = torch.tensor(rng.uniform(0, 255, (3, 3, side, side)), dtype=torch.float32)
    b = torch.tensor(rng.uniform(0, 255, (3, 3, side, side)), dtype=torch.float32)
    scales, shifts = _SCALES.tolist(), _SHIFTS.tolist()
    theta = torch.tensor([[[sc, 0.0, dx], [0.0, sc, dy]] for sc in scales for dx in shifts for dy in shifts])
    grid = F.affine_grid(theta, [len(theta), 3, side, side], align_corners=False)
    inner = slice(border, side - border)
    w = _coarse_weights(side, border)
    got = _warp_differences(a, b, w, w, border)
    for p in range(3):
        warped = F.grid_sample(b[p].expand(len(theta), 3, side, side), grid, mode="bilinear",
                               padding_mode="border", align_corners=False)
        want = (warped - a[p]).abs().sum(1)[:, inner, inner]
        assert torch.allclose(got[p], want, atol=2e-3), float((got[p] - want).abs().max())
    # Per-pair poses (the fine search): the pair's own scale and shifts.
    sc = torch.tensor([[0.93], [1.0], [1.07]])[:, :, None]  # [P, 1, 1]
    dx = torch.tensor([[-0.1], [0.0], [0.05]])[:, :, None]
    dy = torch.tensor([[0.02], [-0.03], [0.1]])[:, :, None]
    got = _warp_differences(a, b, _axis_weights(sc, dx, side, border), _axis_weights(sc, dy, side, border), border)
    for p in range(3):
        th = torch.tensor([[[sc[p].item(), 0.0, dx[p].item()], [0.0, sc[p].item(), dy[p].item()]]])
        warped = F.grid_sample(b[p : p + 1], F.affine_grid(th, [1, 3, side, side], align_corners=False),
                               mode="bilinear", padding_mode="border", align_corners=False)
        want = (warped - a[p]).abs().sum(1)[:, inner, inner]
        assert torch.allclose(got[p], want, atol=2e-3)


@pytest.mark.parametrize("side", [8, 16, 32])
def test_reach_range_is_the_window_extreme_of_replicated_edges(side: int) -> None:
    # Reference: for each pixel, min and max over the (2r+1)^2 window, edges clamped, by loops.
    from pipeline.pixel_check import _reach, _reach_range

    rng = np.random.default_rng(side)
    b = rng.integers(0, 256, (2, side, side, 3), dtype=np.uint8)
    r = _reach(side)
    lo, hi = _reach_range(b)
    assert lo.shape == hi.shape == b.shape
    for y in range(side):
        for x in range(side):
            ys = np.clip(np.arange(y - r, y + r + 1), 0, side - 1)
            xs = np.clip(np.arange(x - r, x + r + 1), 0, side - 1)
            win = b[:, ys][:, :, xs]
            assert np.array_equal(hi[:, y, x], win.max((1, 2)))
            assert np.array_equal(lo[:, y, x], win.min((1, 2)))


def test_one_row_against_many_candidates_answers_as_pair_by_pair() -> None:
    # dedup asks one row against a batch; shared reach ranges must not change any answer.
    base = _thumb(_stored(SCENE))
    cands = [_thumb(_near_copy(_stored(SCENE), s)) for s in range(4)]
    cands += [_thumb(_stored(_variant(count=3))), _thumb(_stored(_variant(position="bottom right")))]
    thumbs = np.stack([base, *cands])
    ok = np.ones(len(thumbs), dtype=bool)
    j = np.array([1, 5, 2, 6, 3, 4, 1])
    batch = confirm_pairs(thumbs, ok, thumbs, ok, np.zeros(len(j), dtype=np.int64), j)
    single = [bool(confirm_pairs(thumbs, ok, thumbs, ok, np.array([0]), np.array([k]))[0]) for k in j.tolist()]
    assert batch.tolist() == single
    assert batch[[0, 2, 4, 5, 6]].all() and not batch[[1, 3]].any()


def test_answers_given_ahead_are_remembered_not_recomputed() -> None:
    from pipeline.dedup.table import _PixelConfirm

    img = _stored(SCENE)
    thumbs = [thumbnail(img), thumbnail(_near_copy(img, 3)), thumbnail(_stored(_variant(position="bottom right"))),
              thumbnail(_near_copy(img, 5))]  # fmt: skip
    col = pa.chunked_array([pa.array(thumbs, pa.binary())])
    rows = np.arange(4)
    cfg = DedupConfig(threshold=0.9, pixel_check=True)
    pi, pj = np.array([1, 2, 3, 3]), np.array([0, 0, 0, 2])
    want = _PixelConfirm(cfg, col, rows).many(pi, pj)
    assert want.tolist() == [True, False, True, False]
    check = _PixelConfirm(cfg, col, rows)
    assert check.ahead(pi[:2], pj[:2]).tolist() == [True, False]
    assert (check.calls, check.computed) == (0, 2)
    assert check.many(pi, pj).tolist() == want.tolist()
    # asked 4, of which 2 were known: only the other 2 were compared
    assert (check.calls, check.passed, check.computed) == (4, 2, 4)
    assert check.many(pi[::-1], pj[::-1]).tolist() == want[::-1].tolist()
    assert check.computed == 6  # answers to questions (not asked ahead) are not remembered
