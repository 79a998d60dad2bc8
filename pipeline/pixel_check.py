"""Pixel confirmation of near-duplicate candidates: small thumbnails, aligned, compared.

A CLIP image embedding says what a picture shows, not exactly where: with a weak model (the
bundled tiny one) two scenes in the same colours whose objects differ in count or position can
reach cosine 0.99, while a cropped and re-encoded copy of one picture can fall to 0.9. A near
duplicate, though, is the *same pixels* after a small crop, a resize and a re-encode. So dedup
can take embedding pairs at a looser cosine as candidates and keep only those whose thumbnails
agree once aligned:

1. Each row stores a ``THUMB_SIDE`` x ``THUMB_SIDE`` RGB thumbnail (uint8, 3 KiB) of the square
   the model sees, made by the decode task (:func:`pipeline.thumbnails.thumbnail`).
2. For a candidate pair, the second thumbnail is warped onto the first by a scale and shift
   search (245 coarse poses at half resolution: scale 0.94-1.06, shift up to 9 % of the side;
   then 27 finer poses around the best at full resolution), covering a crop of up to ~4 % per
   side and any resize.
3. At the best pose (lowest mean residual over the three channels), four numbers in 0-255
   pixel units, all over the interior (an 8 % border is ignored: a crop brings in or removes
   content there): ``mean`` = the mean absolute difference over pixels and channels; ``blob``
   = the largest 3 x 3 average of the per-pixel difference (channels averaged);
   ``channel_mean`` and ``channel_blob`` = the same two for the colour channel that differs
   most (:class:`Residuals`). Re-encoding and resampling spread small differences everywhere
   (low mean, low blob); a moved, added or reshaped object leaves one patch of large
   difference (high blob) even when the mean stays low. The per-channel pair catches what
   averaging dilutes: a yellow object on orange differs from the background in green alone,
   so a missing one counted a third of its difference, and so did a background whose shade
   differs in one channel.
4. All are scaled up for faint pictures: with ``contrast`` the spread (99th minus 1st
   percentile) of the pair's most varied channel, averaged over the two thumbnails, a pair
   below ``MIN_CONTRAST`` levels has its differences multiplied by ``MIN_CONTRAST / contrast``.
   Two faint grayscale scenes (objects 10-15 levels off the background) otherwise differ by less
   than two re-encodings of a vivid one.

A pair is confirmed when all four are within their bounds (:class:`PixelBounds`) with either
thumbnail warped onto the other. The averaged bounds (``MEAN_MAX``, ``BLOB_MAX``) were picked
on two 800-row synthetic worlds (seeds 2026 and 555: centre crop 128, tiny model, candidates at
cosine >= 0.9) and checked on three more (7, 99, 4242): all 640 duplicate pairs among the
candidates are confirmed and no pair of different scenes. The job's default run on fresh
worlds (default sizes and formats) later showed different scenes confirmed, by shades and
objects that differ in one or two channels; the per-channel bounds (``CHANNEL_MEAN_MAX``,
``CHANNEL_BLOB_MAX``) were added on top, so the check never confirms a pair the averaged bounds
reject. They trade: over 75 worlds (15 small, 60 default; ``bench/pixel_check.py``, RESULTS
2026-12-06) copy pairs missed 7 -> 8 of 6,860 and pairs of different scenes confirmed 8 -> 4 of
25,637 (the four left: two pairs of grayscale files whose colours map to the same greys, faint
dark objects beside a bright one, which the pair's contrast does not lift, and small crosses
against small squares, ~4 px at 32 x 32). On a 50,000-row world of 48-96 px images (around
the model's 64 px input; a re-encoded copy differs more per channel there) they keep 3,220 of
the 3,335 copy pairs the averaged bounds confirm, and 16 of the 28 pairs of different scenes.
Tighter bounds (6.5, 32) lose more copies there (176) for few more wrong pairs caught (12
left); looser ones (9, 45) keep all but 6 copies and catch 3. On the seven real camera photos
in ``../shared/testdata`` (centre crop 128), each against 8 near copies made the same way: 55
of 56 original/copy pairs confirmed, none of the 1,701 pairs of different photos (textured
photos sit closer to the mean bound: copy/copy pairs, two crops compounded, 175 of 196); the
per-channel bounds change none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

# The bounds (0-255 levels): the difference averaged over the colour channels, and in the
# channel that differs most (module docstring, step 3).
MEAN_MAX = 4.5
BLOB_MAX = 23.0
CHANNEL_MEAN_MAX = 7.0
CHANNEL_BLOB_MAX = 34.0
# Share of the side ignored at each border when comparing.
BORDER = 0.08
# Differences of fainter pairs are scaled up to this contrast (pixel levels), see step 4.
MIN_CONTRAST = 64.0
# Pairs compared per batch: each pair warps 245 half-size thumbnails (~0.6 MB of float32);
# small batches stay in cache.
_PAIRS_PER_BATCH = 8


class Residuals(NamedTuple):
    """A pair's aligned differences, float64 [P] each, in 0-255 levels (module docstring,
    step 3): ``mean`` and ``blob`` of the difference averaged over the colour channels,
    ``channel_mean`` and ``channel_blob`` of the channel that differs most. Also the type of
    their lower bounds (:func:`lower_bounds`, :func:`block_lower_bounds`)."""

    mean: np.ndarray
    blob: np.ndarray
    channel_mean: np.ndarray
    channel_blob: np.ndarray


@dataclass(frozen=True)
class PixelBounds:
    """The four bounds a pair must meet, in 0-255 levels (see :class:`Residuals`)."""

    mean_max: float = MEAN_MAX
    blob_max: float = BLOB_MAX
    channel_mean_max: float = CHANNEL_MEAN_MAX
    channel_blob_max: float = CHANNEL_BLOB_MAX

    @classmethod
    def of(cls, dedup: Any) -> PixelBounds:
        """The bounds of a resolved ``DedupConfig`` (its ``pixel_*`` fields)."""
        return cls(float(dedup.pixel_mean_max), float(dedup.pixel_blob_max),
                   float(dedup.pixel_channel_mean_max), float(dedup.pixel_channel_blob_max))

    def passes(self, r: Residuals, gain: np.ndarray | float = 1.0, slack: float = 0.0) -> np.ndarray:
        """bool [P]: every figure of ``r`` (times ``gain``) within its bound (plus ``slack``)."""
        return (
            (r.mean * gain <= self.mean_max + slack)
            & (r.blob * gain <= self.blob_max + slack)
            & (r.channel_mean * gain <= self.channel_mean_max + slack)
            & (r.channel_blob * gain <= self.channel_blob_max + slack)
        )


# The searched poses: x -> scale * x + shift on each axis, in grid_sample's [-1, 1]
# coordinates (the same scale on both axes, a shift for each). Coarse: every scale x shift-x x
# shift-y (245 poses); fine: the coarse best plus each step on each of the three (27 poses).
_SCALES = torch.tensor((0.94, 0.97, 1.0, 1.03, 1.06), dtype=torch.float32)
_SHIFTS = torch.tensor(np.linspace(-0.09, 0.09, 7), dtype=torch.float32)
_FINE_STEPS = torch.tensor((-0.015, 0.0, 0.015), dtype=torch.float32)
# How far (in output pixels) any searched pose moves a sample: |s - 1| <= 0.075 and
# |shift| <= 0.105 in [-1, 1] coordinates give at most 0.18 * S / 2 pixels; bilinear sampling
# reads the pixel below and the one after, so a warped pixel is a mix of the input within
# this many pixels of it (border padding keeps it inside the image).
_MAX_SCALE_DEV = 0.075
_MAX_SHIFT = 0.105


def _axis_weights(scale: torch.Tensor, shift: torch.Tensor, size: int, border: int) -> torch.Tensor:
    """float32 [..., size - 2 * border, size]: for each interior output sample along one axis,
    the weights of the input samples that bilinear ``grid_sample`` (border padding,
    align_corners=False, the grid from ``affine_grid``) mixes for the pose x -> ``scale`` * x +
    ``shift``. ``scale`` and ``shift``: float32 tensors of one shape [...], broadcast.

    A pose with one scale for both axes and no rotation warps each axis on its own, so the
    warp is ``Ry @ b @ Rx^T``: two small matrix products where grid_sample gathers four
    samples per output pixel (:func:`residuals` ~2x faster; the same values to ~3e-5 levels,
    tests/pipeline/test_pixel_check.py checks against grid_sample)."""
    scale, shift = torch.broadcast_tensors(scale, shift)
    base = torch.linspace(-1, 1, size) * ((size - 1) / size)  # affine_grid's sample centres
    x = base[border : size - border] * scale[..., None] + shift[..., None]
    ix = (((x + 1) * size - 1) / 2).clamp(0, size - 1)  # grid_sample's unnormalise + border
    left = ix.floor()
    w_right = ix - left
    left = left.long()
    weights = torch.zeros(*x.shape, size)
    weights.scatter_add_(-1, left[..., None], (1 - w_right)[..., None])
    weights.scatter_add_(-1, (left + 1).clamp(max=size - 1)[..., None], w_right[..., None])
    return weights


_COARSE_WEIGHTS: dict[tuple[int, int], torch.Tensor] = {}


def _coarse_weights(size: int, border: int) -> torch.Tensor:
    """:func:`_axis_weights` of every coarse (scale, shift): [5, 7, size - 2 * border, size]
    (the same for both axes and every pair, so made once)."""
    key = (size, border)
    if key not in _COARSE_WEIGHTS:
        _COARSE_WEIGHTS[key] = _axis_weights(_SCALES[:, None], _SHIFTS[None, :], size, border)
    return _COARSE_WEIGHTS[key]


def _warp_differences(
    a: torch.Tensor, b: torch.Tensor, rx: torch.Tensor, ry: torch.Tensor, border: int, per_channel: bool = False
) -> torch.Tensor:
    """|a - warp(b, pose)|, interior only, for every pose of a grid of scales x shifts-x x
    shifts-y: summed over channels, [P, nS * nX * nY, h, w] (poses in that order), or with
    ``per_channel`` each channel's, [P, nS * nX * nY, 3, h, w].

    a, b: [P, 3, S, S] float32; rx: [P, nS, nX, w, S] or, shared by every pair, [nS, nX, w, S]
    (:func:`_axis_weights` of each scale and x shift); ry likewise for the y shifts."""
    p, s = a.shape[0], a.shape[-1]
    if rx.ndim == 4:
        t = torch.einsum("pcyx,saXx->psacyX", b, rx)
        warped = torch.einsum("sbYy,psacyX->psabcYX", ry, t)
    else:
        t = torch.einsum("pcyx,psaXx->psacyX", b, rx)
        warped = torch.einsum("psbYy,psacyX->psabcYX", ry, t)
    inner = a[:, None, None, None, :, border : s - border, border : s - border]
    diff = warped.contiguous().sub_(inner).abs_()
    if per_channel:
        return diff.reshape(p, -1, 3, diff.shape[-2], diff.shape[-1])
    # Adding the three channel planes is ~3x faster than sum() over the middle dimension.
    total = diff[:, :, :, :, 0].add(diff[:, :, :, :, 1]).add_(diff[:, :, :, :, 2])
    return total.reshape(p, -1, total.shape[-2], total.shape[-1])


def contrast(t: np.ndarray) -> np.ndarray:
    """float64 [N]: 99th minus 1st percentile of the most varied channel of each thumbnail
    (uint8 [N, S, S, 3]), in pixel levels."""
    flat = t.reshape(t.shape[0], -1, 3).astype(np.float64)
    return (np.percentile(flat, 99, axis=1) - np.percentile(flat, 1, axis=1)).max(axis=1)


def residuals(
    a: np.ndarray, b: np.ndarray, contrast_a: np.ndarray | None = None, contrast_b: np.ndarray | None = None
) -> Residuals:
    """Aligned differences of thumbnail pairs ``a[i]``/``b[i]`` (uint8 [P, S, S, 3] each).

    Returns the four figures of :class:`Residuals` (float64 [P] each, 0-255 levels; see the
    module docstring): ``b`` is warped onto ``a`` at the pose that minimises the mean; all are
    scaled up for pairs fainter than ``MIN_CONTRAST``. ``contrast_a``/``contrast_b``:
    :func:`contrast` of ``a`` and ``b`` when the caller has them already.
    """
    if a.shape != b.shape or a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"a and b must both be [P, S, S, 3], got {a.shape} and {b.shape}")
    p, s = a.shape[0], a.shape[1]
    border = max(1, int(BORDER * s))
    out = np.zeros((4, p), dtype=np.float64)  # the four figures, in Residuals' order
    with torch.inference_mode(), _one_thread():
        for start in range(0, p, _PAIRS_PER_BATCH):
            # torch.tensor copies: the inputs may be read-only views of Arrow memory.
            ta = torch.tensor(a[start : start + _PAIRS_PER_BATCH]).permute(0, 3, 1, 2).float()
            tb = torch.tensor(b[start : start + _PAIRS_PER_BATCH]).permute(0, 3, 1, 2).float()
            m = ta.shape[0]
            # The coarse search runs at half resolution: a quarter of the cost, and its poses
            # only need to land within the fine search's reach.
            half = F.avg_pool2d(ta, 2)
            half_border = max(1, border // 2)
            weights = _coarse_weights(half.shape[-1], half_border)
            coarse = _warp_differences(half, F.avg_pool2d(tb, 2), weights, weights, half_border)
            best = coarse.sum((2, 3)).argmin(1)
            # Finer poses around each pair's best coarse pose: each step on scale and shifts.
            scale = _SCALES[best // 49][:, None, None] + _FINE_STEPS[None, :, None]
            rx = _axis_weights(scale, _SHIFTS[(best // 7) % 7][:, None, None] + _FINE_STEPS, s, border)
            ry = _axis_weights(scale, _SHIFTS[best % 7][:, None, None] + _FINE_STEPS, s, border)
            maps = _warp_differences(ta, tb, rx, ry, border, per_channel=True)
            channel_means = maps.mean((3, 4))  # [m, 27, 3]
            pick = channel_means.sum(2).argmin(1)
            rows = torch.arange(m)
            at_pick = channel_means[rows, pick]  # [m, 3]
            # 3 x 3 averages of each channel; their channel mean is the averaged map's (linear).
            boxed = F.avg_pool2d(maps[rows, pick], 3, 1)  # [m, 3, h - 2, w - 2]
            figures = (
                at_pick.mean(1),
                boxed.mean(1).amax((1, 2)),
                at_pick.amax(1),
                boxed.amax((1, 2, 3)),
            )
            for k, f in enumerate(figures):
                out[k, start : start + m] = f.double().numpy()
    ca = contrast(a) if contrast_a is None else contrast_a
    cb = contrast(b) if contrast_b is None else contrast_b
    gain = pair_gain(ca, cb)
    return Residuals(*(out * gain))


class _one_thread:
    """torch on one thread for the duration: these tensors are tiny, and idle OpenMP threads
    spinning for work cost far more CPU than they save (the driver runs this after the
    stream, often beside other work)."""

    def __enter__(self) -> None:
        self.before = torch.get_num_threads()
        if self.before != 1:
            torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        if self.before != 1:
            torch.set_num_threads(self.before)


def _reach(side: int) -> int:
    move = (_MAX_SCALE_DEV + _MAX_SHIFT) * side / 2
    return int(np.floor(move)) + 1


def _window_extremes(x: np.ndarray, axis: int, width: int, out_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(max, min) of ``x`` over windows of ``width`` consecutive entries along ``axis``, the
    first ``out_len`` windows. Doubling: windows of 2w from two overlapping windows of w,
    then the last step overlaps, so width 7 costs 3 maximum/minimum passes instead of 6."""

    def part(v: np.ndarray, start: int, length: int) -> np.ndarray:
        sl = [slice(None)] * v.ndim
        sl[axis] = slice(start, start + length)
        return v[tuple(sl)]

    hi = lo = x
    w = 1
    while w * 2 <= width:
        n = hi.shape[axis] - w
        hi = np.maximum(part(hi, 0, n), part(hi, w, n))
        lo = np.minimum(part(lo, 0, n), part(lo, w, n))
        w *= 2
    if w < width:  # width = w + (width - w), two windows of w overlapping
        shift = width - w
        hi = np.maximum(part(hi, 0, out_len), part(hi, shift, out_len))
        lo = np.minimum(part(lo, 0, out_len), part(lo, shift, out_len))
    return part(hi, 0, out_len), part(lo, 0, out_len)


def _reach_range(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi), int16 [P, S, S, 3] each: the minimum and maximum of ``b`` (uint8 [P, S, S, 3])
    over each pixel's :func:`_reach` window, edges replicated (where a warp samples from)."""
    s, r = b.shape[1], _reach(b.shape[1])
    edge = np.clip(np.arange(-r, s + r), 0, s - 1)  # replicate padding, by index (np.pad is slow)
    padded = b[:, edge][:, :, edge]
    # A square window's extreme is the extreme of its rows' extremes: one 1-D pass per axis.
    hi_rows, lo_rows = _window_extremes(padded, 1, 2 * r + 1, s)
    hi, _ = _window_extremes(hi_rows, 2, 2 * r + 1, s)
    _, lo = _window_extremes(lo_rows, 2, 2 * r + 1, s)
    return lo.astype(np.int16), hi.astype(np.int16)


def lower_bounds(
    a: np.ndarray, b: np.ndarray | None, reach_b: tuple[np.ndarray, np.ndarray] | None = None
) -> Residuals:
    """Lower bounds, over every pose the search tries, of the four :class:`Residuals` figures
    of |a - warp(b)| (uint8 [P, S, S, 3] each; before the contrast gain), float64 [P] each.
    A warped pixel of b is a convex mix of b's pixels within :func:`_reach` of it, so it lies
    between their minimum and maximum; its distance to a's pixel can be no smaller than a's
    distance to that range. That holds pixel by pixel and channel by channel at every pose,
    so those distances, averaged and 3 x 3 box-filtered as :func:`residuals` does, bound each
    figure whichever pose is best.
    Lets :func:`confirm_pairs` skip the search for pairs that cannot pass (no answer changes).
    ``reach_b``: :func:`_reach_range` of ``b`` when the caller has it (b may then be None)."""
    s = a.shape[1]
    border = max(1, int(BORDER * s))
    lo, hi = _reach_range(b) if reach_b is None else reach_b
    ta = a[:, border : s - border, border : s - border].astype(np.int16)
    lo, hi = lo[:, border : s - border, border : s - border], hi[:, border : s - border, border : s - border]
    dist = np.maximum(lo - ta, 0) + np.maximum(ta - hi, 0)  # int16 [P, h, w, 3], <= 255
    # 3 x 3 sums of each channel, in integers (exact; the channels' total fits int16: 6,885).
    rows3 = dist[:, :-2] + dist[:, 1:-1] + dist[:, 2:]
    box3 = rows3[:, :, :-2] + rows3[:, :, 1:-1] + rows3[:, :, 2:]  # [P, h - 2, w - 2, 3]
    means = dist.sum(axis=(1, 2), dtype=np.int64) / (dist.shape[1] * dist.shape[2])  # [P, 3]
    return Residuals(means.mean(axis=1), box3.sum(axis=3).max(axis=(1, 2)) / 27.0,
                     means.max(axis=1), box3.max(axis=(1, 2, 3)) / 9.0)


# Side of the square blocks of :func:`block_stats`: a block is one of the 3 x 3 windows the
# blob is the largest average of, so the blob bound needs no factor.
BLOCK = 3


def block_stats_shape(side: int) -> tuple[int, int, int, int]:
    """The shape of one thumbnail's :func:`block_stats` at side S = ``side``: (3, n, n, 3),
    n = (S - 2 * border) // BLOCK."""
    n = (side - 2 * max(1, int(BORDER * side))) // BLOCK
    return (3, n, n, 3)


def _block_means(t: np.ndarray, side: int) -> np.ndarray:
    """float32 [P, n, n, 3]: means of the ``BLOCK`` x ``BLOCK`` blocks that tile the interior
    of ``t`` ([P, side, side, 3], any integer dtype) from its top-left corner (n = interior //
    BLOCK; a last partial row and column of pixels is left out)."""
    border = max(1, int(BORDER * side))
    n = block_stats_shape(side)[1]
    v = t[:, border : border + n * BLOCK, border : border + n * BLOCK].astype(np.float32)
    return v.reshape(len(t), n, BLOCK, n, BLOCK, 3).mean(axis=(2, 4))


def block_stats(t: np.ndarray) -> np.ndarray:
    """uint8 [P, 3, n, n, 3] per thumbnail (uint8 [P, S, S, 3]): ``[:, 0]`` the rounded mean of
    each interior block (:data:`BLOCK` pixels a side, n = (S - 2 * border) // BLOCK), ``[:, 1]``
    the floor of the block's mean of :func:`_reach_range`'s minimum, ``[:, 2]`` the ceiling of
    its mean of the maximum. 243 bytes a plane at S = 32: what :func:`block_lower_bounds` needs
    of a row, made once per row however many pairs it is in."""
    side = t.shape[1]
    lo, hi = _reach_range(t)
    out = np.empty((len(t),) + block_stats_shape(side), dtype=np.uint8)
    out[:, 0] = np.rint(_block_means(t, side))
    out[:, 1] = np.floor(_block_means(lo, side))
    out[:, 2] = np.ceil(_block_means(hi, side))
    return out


def block_lower_bounds(stats_a: np.ndarray, stats_b: np.ndarray, side: int) -> Residuals:
    """Lower bounds of the four :class:`Residuals` figures of |a - warp(b)| over every pose
    the search tries (before the contrast gain), float64 [P] each, from :func:`block_stats` of
    a and b ([P, 3, n, n, 3] each) alone; ``side``: the thumbnails' S.

    Looser than :func:`lower_bounds` but ~20x cheaper a pair, with no pixels read. Why it holds:
    at any pose a warped pixel of b lies between b's reach minimum and maximum there (see
    :func:`lower_bounds`), so over a block B and channel c the mean of |a - warp(b)| is at
    least |mean_B a - mean_B warp(b)|, which is at least the distance from mean_B a to
    [mean_B lo, mean_B hi]; the stored rounding moves a's mean by <= 0.5 and widens the
    interval, so the distance less 0.5 is still a bound of the block's mean of D_c, channel c's
    per-pixel difference. ``blob`` is the largest 3 x 3 average of any D_c and each block is
    such a window: the largest block value bounds it. The blocks are disjoint and D_c >= 0:
    their sum times BLOCK^2 / interior^2 bounds channel c's mean, and the largest over
    channels bounds ``mean``."""
    border = max(1, int(BORDER * side))
    inner = side - 2 * border
    a = stats_a[:, 0].astype(np.int16)
    lo = stats_b[:, 1].astype(np.int16)
    hi = stats_b[:, 2].astype(np.int16)
    dist = (np.maximum(lo - a, 0) + np.maximum(a - hi, 0)).astype(np.float32) - 0.5
    per_block = np.maximum(dist, 0)  # [P, n, n, 3]
    averaged = per_block.mean(axis=3)  # [P, n, n]
    share = BLOCK * BLOCK / (inner * inner)
    return Residuals(
        averaged.sum(axis=(1, 2), dtype=np.float64) * share,
        averaged.max(axis=(1, 2)).astype(np.float64),
        per_block.sum(axis=(1, 2), dtype=np.float64).max(axis=1) * share,
        per_block.max(axis=(1, 2, 3)).astype(np.float64),
    )


def pair_gain(contrast_a: np.ndarray, contrast_b: np.ndarray) -> np.ndarray:
    """float64 [P]: the factor a pair's differences are scaled by (module docstring, step 4)."""
    return MIN_CONTRAST / np.clip((contrast_a + contrast_b) / 2, 1.0, MIN_CONTRAST)


def may_confirm(
    stats_a: np.ndarray, stats_b: np.ndarray, gain: np.ndarray, side: int, bounds: PixelBounds = PixelBounds()
) -> np.ndarray:
    """bool [P]: pairs that :func:`confirm_pairs` might confirm, from :func:`block_stats` of
    both sides and :func:`pair_gain`: False means it cannot (in neither direction does even
    the best pose come within the bounds), so the search is skipped without changing any
    answer."""
    fwd = _may_pass(block_lower_bounds(stats_a, stats_b, side), gain, bounds)
    back = _may_pass(block_lower_bounds(stats_b, stats_a, side), gain, bounds)
    return fwd | back


def _may_pass(lower: Residuals, gain: np.ndarray, bounds: PixelBounds) -> np.ndarray:
    """bool [P]: pairs whose lower bounds leave room to pass. The search computes in
    float32; the slack keeps a pair whose exact bound sits within rounding of a limit."""
    return bounds.passes(lower, gain, slack=1e-3)


def confirm_pairs(
    thumbs_i: np.ndarray,
    ok_i: np.ndarray,
    thumbs_j: np.ndarray,
    ok_j: np.ndarray,
    i: np.ndarray,
    j: np.ndarray,
    bounds: PixelBounds = PixelBounds(),
    contrast_i: np.ndarray | None = None,
    contrast_j: np.ndarray | None = None,
) -> np.ndarray:
    """bool [E]: which candidate pairs (``thumbs_i[i[e]]``, ``thumbs_j[j[e]]``) look like the
    same picture: either thumbnail, warped onto the other, is within all four ``bounds``.
    Symmetric, so the answer does not depend on which row a caller names first (the warp is
    not: borders and the pose grid differ by direction). A pair with a missing thumbnail on either side is
    not confirmed (dedup then keeps both rows: a wrong drop loses data, a missed one only
    keeps a copy). ``contrast_i`` / ``contrast_j``: :func:`contrast` of every thumbnail of
    each side, for a caller that asks about the same rows many times."""
    i = np.asarray(i, dtype=np.int64)
    j = np.asarray(j, dtype=np.int64)
    out = np.zeros(len(i), dtype=bool)
    have = np.flatnonzero(ok_i[i] & ok_j[j])
    if len(have):
        # Each thumbnail's reach range is made once however many pairs it is in (dedup asks
        # about one row against many candidates).
        ui, at_i = np.unique(i[have], return_inverse=True)
        uj, at_j = np.unique(j[have], return_inverse=True)
        a, b = thumbs_i[i[have]], thumbs_j[j[have]]
        ca = contrast(a) if contrast_i is None else contrast_i[i[have]]
        cb = contrast(b) if contrast_j is None else contrast_j[j[have]]
        gain = pair_gain(ca, cb)
        # Most candidates are different pictures: skip each direction's search when even
        # the best pose cannot bring the mean, or the worst patch, within bounds.
        lo, hi = _reach_range(thumbs_j[uj])
        forward = np.flatnonzero(_may_pass(lower_bounds(a, None, (lo[at_j], hi[at_j])), gain, bounds))
        passed = np.zeros(len(have), dtype=bool)
        if len(forward):
            passed[forward] = bounds.passes(residuals(a[forward], b[forward], ca[forward], cb[forward]))
        retry = np.flatnonzero(~passed)
        if len(retry):
            back = np.unique(at_i[retry])
            lo_i = np.zeros((len(ui),) + a.shape[1:], np.int16)
            hi_i = np.zeros_like(lo_i)
            lo_i[back], hi_i[back] = _reach_range(thumbs_i[ui[back]])
            reach_a = (lo_i[at_i[retry]], hi_i[at_i[retry]])
            retry = retry[_may_pass(lower_bounds(b[retry], None, reach_a), gain[retry], bounds)]
        if len(retry):
            passed[retry] = bounds.passes(residuals(b[retry], a[retry], cb[retry], ca[retry]))
        out[have] = passed
    return out
