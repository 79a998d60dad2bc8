"""Spherical k-means over unit embeddings and cluster membership: which rows semantic dedup
compares with each other (see :mod:`pipeline.dedup`). Every product is computed in float32 on
blocks of rows; the [N, D] matrix stays in its storage dtype.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# Similarity blocks are capped at this many float32 entries (64 MiB) whatever the cluster size.
BLOCK_ENTRIES = 16 * 1024 * 1024
# Below this many rows the automatic cluster count is 1: comparing all pairs exactly costs
# less than a second and gives recall 1.0.
AUTO_SINGLE_CLUSTER_MAX = 10_000


def auto_n_clusters(n: int) -> int:
    """The cluster count used when none is configured: 1 up to
    ``AUTO_SINGLE_CLUSTER_MAX`` rows, else round(sqrt(n)), which balances the cost of assigning
    rows to centroids (n * k) against comparing within clusters (n * n / k)."""
    if n <= AUTO_SINGLE_CLUSTER_MAX:
        return 1
    return int(round(math.sqrt(n)))


def _rows_f32(emb: np.ndarray, start: int, stop: int) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(emb[start:stop], dtype=np.float32))


def _normalize_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def fit_centroids(
    emb: np.ndarray,
    n_clusters: int,
    sample_size: int = 100_000,
    n_iter: int = 10,
    seed: int = 0,
    block_rows: int = 16_384,
) -> np.ndarray:
    """Spherical k-means (cosine) on a random sample of ``emb``.

    ``emb``: [N, D] float16 or float32, rows unit norm. Returns float32 [K, D] unit-norm
    centroids with K = min(n_clusters, sample rows). Deterministic for a given ``seed``: the
    sample and the initial centroids come from ``numpy.random.default_rng(seed)``. A cluster
    that empties is re-seeded with the sample point farthest from its centroid.
    """
    n, d = emb.shape
    if n == 0:
        raise ValueError("fit_centroids needs at least one row")
    rng = np.random.default_rng(seed)
    take = min(sample_size, n)
    sample_idx = np.sort(rng.choice(n, size=take, replace=False)) if take < n else np.arange(n)
    x = torch.from_numpy(np.asarray(emb[sample_idx], dtype=np.float32))
    k = max(1, min(n_clusters, take))
    cent = x[torch.from_numpy(rng.choice(take, size=k, replace=False))].clone()
    for _ in range(n_iter):
        labels = torch.empty(take, dtype=torch.int64)
        best = torch.empty(take, dtype=torch.float32)
        for s in range(0, take, block_rows):
            sims = x[s : s + block_rows] @ cent.T
            best[s : s + block_rows], labels[s : s + block_rows] = sims.max(dim=1)
        sums = torch.zeros(k, d, dtype=torch.float32).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k)
        empty = torch.nonzero(counts == 0).flatten()
        if len(empty):
            # The worst-served points become the new centroids of the empty clusters.
            far = torch.argsort(best)[: len(empty)]
            sums[empty] = x[far]
        new = _normalize_rows(sums)
        if torch.equal(new, cent):
            break
        cent = new
    return cent.numpy()


def assign_clusters(
    emb: np.ndarray,
    centroids: np.ndarray,
    second_cluster_margin: float = 0.0,
    block_rows: int = 16_384,
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every row, and the second-nearest where it is almost as near.

    ``emb``: [N, D] float16/32 unit norm; ``centroids``: [K, D] float32 unit norm. Returns
    (``primary`` int64 [N], ``secondary`` int64 [N]): ``secondary`` is the second-nearest
    cluster when cos(primary) - cos(second) <= ``second_cluster_margin``, else -1. Near
    duplicates that straddle a cluster boundary have small margins, so the second assignment
    is what recovers them (a margin of 0 turns it off).
    """
    n = emb.shape[0]
    cent = torch.from_numpy(np.asarray(centroids, dtype=np.float32))
    primary = np.empty(n, dtype=np.int64)
    secondary = np.full(n, -1, dtype=np.int64)
    k = cent.shape[0]
    for s in range(0, n, block_rows):
        sims = _rows_f32(emb, s, s + block_rows) @ cent.T
        if k == 1:
            primary[s : s + block_rows] = 0
            continue
        top, arg = sims.topk(2, dim=1)
        primary[s : s + block_rows] = arg[:, 0].numpy()
        close = (top[:, 0] - top[:, 1]) <= second_cluster_margin
        if second_cluster_margin > 0:
            sec = np.where(close.numpy(), arg[:, 1].numpy(), -1)
            secondary[s : s + block_rows] = sec
    return primary, secondary


def cluster_members(primary: np.ndarray, secondary: np.ndarray, k: int) -> list[np.ndarray]:
    """Members of each of the ``k`` clusters: a list of k ascending int64 index arrays, a row
    listed under its ``primary`` cluster and, where ``secondary`` >= 0, under that one too."""
    rows = np.arange(primary.shape[0], dtype=np.int64)
    has2 = secondary >= 0
    lab = np.concatenate([primary, secondary[has2]])
    idx = np.concatenate([rows, rows[has2]])
    order = np.lexsort((idx, lab))
    lab, idx = lab[order], idx[order]
    bounds = np.searchsorted(lab, np.arange(k + 1))
    return [idx[bounds[c] : bounds[c + 1]] for c in range(k)]


def semantic_clusters(
    emb: np.ndarray,
    n_clusters: int | None = None,
    sample_size: int = 100_000,
    seed: int = 0,
    second_cluster_margin: float = 0.05,
    kmeans_iterations: int = 10,
) -> list[np.ndarray]:
    """The clusters :func:`pipeline.dedup.pairs.semantic_pairs` compares within: ``members[c]`` ascending int64 row
    indices of ``emb`` ([N, D] unit rows); one cluster of every row when ``n_clusters`` (or
    :func:`auto_n_clusters`) is 1."""
    n = emb.shape[0]
    k = n_clusters if n_clusters is not None else auto_n_clusters(n)
    if k <= 1 or n < 2:
        return [np.arange(n, dtype=np.int64)]
    cent = fit_centroids(emb, k, sample_size, kmeans_iterations, seed)
    p, s2 = assign_clusters(emb, cent, second_cluster_margin)
    return cluster_members(p, s2, cent.shape[0])
