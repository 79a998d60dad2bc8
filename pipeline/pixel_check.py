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
3. At the best pose (lowest mean residual), two numbers in 0-255 pixel units, both over the
   interior (an 8 % border is ignored: a crop brings in or removes content there):
   ``mean`` = mean absolute difference over pixels and channels; ``blob`` = the largest 3 x 3
   average of the per-pixel difference. Re-encoding and resampling spread small differences
   everywhere (low mean, low blob); a moved, added or reshaped object leaves one patch of large
   difference (high blob) even when the mean stays low.
4. Both are scaled up for faint pictures: with ``contrast`` the spread (99th minus 1st
   percentile) of the pair's most varied channel, averaged over the two thumbnails, a pair
   below ``MIN_CONTRAST`` levels has its differences multiplied by ``MIN_CONTRAST / contrast``.
   Two faint grayscale scenes (objects 10-15 levels off the background) otherwise differ by less
   than two re-encodings of a vivid one.

A pair is confirmed when ``mean <= mean_max`` and ``blob <= blob_max`` with either thumbnail
warped onto the other. The bounds were picked on two 800-row synthetic worlds (seeds 2026 and
555: centre crop 128, tiny model, candidates at cosine >= 0.9) and checked on three more (7, 99,
4242): all 640 duplicate pairs among the candidates are confirmed and no pair of different
scenes. Measured as the larger of mean / ``MEAN_MAX`` and blob / ``BLOB_MAX`` in the better
direction (<= 1 passes), duplicates reach 0.97 at most and different scenes 1.32 at least.
`bench/pixel_check.py` measures recall, precision and cost per world. On the seven real camera
photos in ``../shared/testdata`` (centre crop 128), each against 8 near copies made the same
way: 54 of 56 original/copy pairs confirmed, none of the 1,701 pairs of different photos
(textured photos sit closer to the mean bound: copy/copy pairs, two crops compounded, 230 of
252).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

MEAN_MAX = 4.5
BLOB_MAX = 23.0
# Share of the side ignored at each border when comparing.
BORDER = 0.08
# Differences of fainter pairs are scaled up to this contrast (pixel levels), see step 4.
MIN_CONTRAST = 64.0
# Pairs compared per batch: each pair warps 245 half-size thumbnails (~0.75 MB of float32);
# small batches stay in cache.
_PAIRS_PER_BATCH = 8


def _poses(scales: Sequence[float], shifts: Sequence[float]) -> torch.Tensor:
    """[K, 2, 3] affine matrices (affine_grid convention: output -> input, coordinates in
    [-1, 1]) for every scale x shift-x x shift-y."""
    out = [[[s, 0.0, dx], [0.0, s, dy]] for s in scales for dx in shifts for dy in shifts]
    return torch.tensor(out, dtype=torch.float32)


_COARSE = _poses((0.94, 0.97, 1.0, 1.03, 1.06), np.linspace(-0.09, 0.09, 7).tolist())
_FINE_DELTA = _poses((-0.015, 0.0, 0.015), (-0.015, 0.0, 0.015))


def _residual_maps(
    a: torch.Tensor, b: torch.Tensor, poses: torch.Tensor, border: int
) -> torch.Tensor:
    """|a - warp(b, pose)| averaged over channels, interior only: [P, K, h, w].

    a, b: [P, 3, S, S] float32; poses: [P, K, 2, 3]."""
    p, k = poses.shape[:2]
    s = a.shape[-1]
    grid = F.affine_grid(poses.reshape(p * k, 2, 3), [p * k, 3, s, s], align_corners=False)
    src = b[:, None].expand(p, k, 3, s, s).reshape(p * k, 3, s, s)
    warped = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
    diff = (warped.reshape(p, k, 3, s, s) - a[:, None]).abs().mean(2)
    return diff[..., border : s - border, border : s - border]


def contrast(t: np.ndarray) -> np.ndarray:
    """float64 [N]: 99th minus 1st percentile of the most varied channel of each thumbnail
    (uint8 [N, S, S, 3]), in pixel levels."""
    flat = t.reshape(t.shape[0], -1, 3).astype(np.float64)
    return (np.percentile(flat, 99, axis=1) - np.percentile(flat, 1, axis=1)).max(axis=1)


def residuals(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Aligned differences of thumbnail pairs ``a[i]``/``b[i]`` (uint8 [P, S, S, 3] each).

    Returns float64 [P] ``mean`` and [P] ``blob`` in 0-255 units (see the module docstring):
    ``b`` is warped onto ``a`` at the pose that minimises the mean; both are scaled up for
    pairs fainter than ``MIN_CONTRAST``.
    """
    if a.shape != b.shape or a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"a and b must both be [P, S, S, 3], got {a.shape} and {b.shape}")
    p, s = a.shape[0], a.shape[1]
    border = max(1, int(BORDER * s))
    mean = np.zeros(p, dtype=np.float64)
    blob = np.zeros(p, dtype=np.float64)
    with torch.inference_mode():
        for start in range(0, p, _PAIRS_PER_BATCH):
            # torch.tensor copies: the inputs may be read-only views of Arrow memory.
            ta = torch.tensor(a[start : start + _PAIRS_PER_BATCH]).permute(0, 3, 1, 2).float()
            tb = torch.tensor(b[start : start + _PAIRS_PER_BATCH]).permute(0, 3, 1, 2).float()
            m = ta.shape[0]
            # The coarse search runs at half resolution: a quarter of the cost, and its poses
            # only need to land within the fine search's reach.
            coarse = _residual_maps(
                F.avg_pool2d(ta, 2),
                F.avg_pool2d(tb, 2),
                _COARSE.expand(m, -1, -1, -1),
                max(1, border // 2),
            )
            best = coarse.mean((2, 3)).argmin(1)
            # Finer poses around each pair's best coarse pose.
            fine = _COARSE[best][:, None] + _FINE_DELTA[None]
            maps = _residual_maps(ta, tb, fine, border)
            means = maps.mean((2, 3))
            pick = means.argmin(1)
            rows = torch.arange(m)
            mean[start : start + m] = means[rows, pick].double().numpy()
            at_best = maps[rows, pick][:, None]
            blob[start : start + m] = F.avg_pool2d(at_best, 3, 1).amax((1, 2, 3)).double().numpy()
    pair_contrast = (contrast(a) + contrast(b)) / 2
    gain = MIN_CONTRAST / np.clip(pair_contrast, 1.0, MIN_CONTRAST)
    return mean * gain, blob * gain


def confirm_pairs(
    thumbs_i: np.ndarray,
    ok_i: np.ndarray,
    thumbs_j: np.ndarray,
    ok_j: np.ndarray,
    i: np.ndarray,
    j: np.ndarray,
    mean_max: float = MEAN_MAX,
    blob_max: float = BLOB_MAX,
) -> np.ndarray:
    """bool [E]: which candidate pairs (``thumbs_i[i[e]]``, ``thumbs_j[j[e]]``) look like the
    same picture: either thumbnail, warped onto the other, passes both bounds. Symmetric, so
    the answer does not depend on which row a caller names first (the warp is not: borders
    and the pose grid differ by direction). A pair with a missing thumbnail on either side is
    not confirmed (dedup then keeps both rows: a wrong drop loses data, a missed one only
    keeps a copy)."""
    i = np.asarray(i, dtype=np.int64)
    j = np.asarray(j, dtype=np.int64)
    out = np.zeros(len(i), dtype=bool)
    have = np.flatnonzero(ok_i[i] & ok_j[j])
    if len(have):
        a, b = thumbs_i[i[have]], thumbs_j[j[have]]
        mean, blob = residuals(a, b)
        out[have] = (mean <= mean_max) & (blob <= blob_max)
        retry = ~out[have]
        if retry.any():
            mean, blob = residuals(b[retry], a[retry])
            out[have[retry]] = (mean <= mean_max) & (blob <= blob_max)
    return out
