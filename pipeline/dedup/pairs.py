"""Listing similar pairs: every pair of rows with cosine >= threshold that shares a cluster,
within one matrix or between this run's rows and an earlier run's (see :mod:`pipeline.dedup`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.dedup.clusters import (
    BLOCK_ENTRIES,
    assign_clusters,
    auto_n_clusters,
    cluster_members,
    fit_centroids,
    semantic_clusters,
)


@dataclass(frozen=True)
class Pairs:
    """Similar pairs found by :func:`semantic_pairs`.

    ``i`` and ``j`` are int64 row indices of equal length E, ``sim`` the float32 cosine of each
    pair. Without ``other`` both index ``emb`` and ``i < j``; with ``other``, ``i`` indexes
    ``emb`` and ``j`` indexes ``other``. Pairs are unique and sorted by (i, j).
    """

    i: np.ndarray
    j: np.ndarray
    sim: np.ndarray

    def __len__(self) -> int:
        return int(self.i.shape[0])


def _unique_pairs(
    i_parts: list[np.ndarray], j_parts: list[np.ndarray], s_parts: list[np.ndarray], n_j: int
) -> Pairs:
    if not i_parts:
        empty = np.empty(0, dtype=np.int64)
        return Pairs(empty, empty.copy(), np.empty(0, dtype=np.float32))
    i = np.concatenate(i_parts)
    j = np.concatenate(j_parts)
    s = np.concatenate(s_parts)
    code = i * np.int64(max(n_j, 1)) + j
    code, first = np.unique(code, return_index=True)
    return Pairs(i[first], j[first], s[first].astype(np.float32))


def pairs_within_clusters(
    emb: np.ndarray,
    members: list[np.ndarray],
    threshold: float,
    other: np.ndarray | None = None,
    other_members: list[np.ndarray] | None = None,
) -> Pairs:
    """All pairs with cosine >= ``threshold`` that share a cluster.

    ``emb``: [N, D] float16/32 unit norm; ``members[c]``: ascending int64 row indices of
    cluster c. Without ``other`` pairs are within ``emb`` (i < j); with ``other`` ([M, D]) and
    ``other_members`` (same clustering) pairs are (row of emb, row of other). Similarities are
    computed in float32, one block of at most 16 Mi entries at a time.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    i_parts: list[np.ndarray] = []
    j_parts: list[np.ndarray] = []
    s_parts: list[np.ndarray] = []
    cross = other is not None
    if cross and (other_members is None or len(other_members) != len(members)):
        raise ValueError("other_members must hold one index array per cluster of members")
    for c, idx in enumerate(members):
        cols_idx = other_members[c] if cross else idx
        if len(idx) == 0 or len(cols_idx) == 0 or (not cross and len(idx) < 2):
            continue
        xa = torch.from_numpy(np.asarray(emb[idx], dtype=np.float32))
        xb = torch.from_numpy(np.asarray(other[cols_idx], dtype=np.float32)) if cross else xa
        step = max(1, BLOCK_ENTRIES // len(cols_idx))
        for s in range(0, len(idx), step):
            if cross:
                sims = xa[s : s + step] @ xb.T
                col0 = 0
            else:
                # A row of this block pairs only with later rows (j > i): columns before the
                # block are skipped and the triangle inside it is masked.
                sims = torch.triu(xa[s : s + step] @ xb[s:].T, diagonal=1)
                col0 = s
            r, q = torch.nonzero(sims >= threshold, as_tuple=True)
            i_parts.append(idx[(r + s).numpy()])
            j_parts.append(cols_idx[(q + col0).numpy()])
            s_parts.append(sims[r, q].numpy())
    n_j = other.shape[0] if cross else emb.shape[0]
    return _unique_pairs(i_parts, j_parts, s_parts, n_j)


def semantic_pairs(
    emb: np.ndarray,
    threshold: float = 0.95,
    n_clusters: int | None = None,
    sample_size: int = 100_000,
    seed: int = 0,
    second_cluster_margin: float = 0.05,
    kmeans_iterations: int = 10,
    other: np.ndarray | None = None,
) -> Pairs:
    """Pairs of rows whose cosine similarity is >= ``threshold``, SemDeDup-style.

    ``emb``: [N, D] float16 or float32, rows unit norm (the pipeline stores them so). With
    ``other`` ([M, D], same contract, e.g. an earlier run's kept embeddings) the pairs are
    between ``emb`` and ``other`` instead of within ``emb``; the clustering is fitted on the
    union. ``n_clusters=None`` picks :func:`auto_n_clusters`. Pairs split across clusters are
    found only through ``second_cluster_margin`` (see :func:`assign_clusters`); with one
    cluster the result is exact. Memory: O(N) besides ``emb`` plus fixed-size blocks.
    """
    if emb.ndim != 2:
        raise ValueError(f"emb must be 2-D [N, D], got shape {emb.shape}")
    if other is not None and (other.ndim != 2 or other.shape[1] != emb.shape[1]):
        raise ValueError(f"other must be [M, {emb.shape[1]}], got shape {other.shape}")
    n = emb.shape[0]
    m = 0 if other is None else other.shape[0]
    if n == 0 or (other is None and n < 2) or (other is not None and m == 0):
        return _unique_pairs([], [], [], 1)
    if other is None:
        members = semantic_clusters(
            emb, n_clusters, sample_size, seed, second_cluster_margin, kmeans_iterations
        )
        return pairs_within_clusters(emb, members, threshold)
    k = n_clusters if n_clusters is not None else auto_n_clusters(n + m)
    if k <= 1:
        members = [np.arange(n, dtype=np.int64)]
        return pairs_within_clusters(emb, members, threshold, other, [np.arange(m, dtype=np.int64)])
    # Fit on a sample of the union without concatenating the two full matrices.
    rng = np.random.default_rng(seed)
    take = min(sample_size, n + m)
    pick = np.sort(rng.choice(n + m, size=take, replace=False))
    both = np.concatenate([emb[pick[pick < n]], other[pick[pick >= n] - n]])
    cent = fit_centroids(both, k, take, kmeans_iterations, seed)
    del both
    k = cent.shape[0]
    p, s2 = assign_clusters(emb, cent, second_cluster_margin)
    members = cluster_members(p, s2, k)
    # A row of this run already carries two clusters when its margin is small; giving the
    # earlier rows a second cluster as well covers a boundary crossing from either side.
    po, so = assign_clusters(other, cent, second_cluster_margin)
    other_members = cluster_members(po, so, k)
    return pairs_within_clusters(emb, members, threshold, other, other_members)
