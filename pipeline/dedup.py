"""Global deduplication after the stream: exact (same image hash) and semantic (near-identical
CLIP image embeddings), optionally against the rows an earlier run kept.

Semantic dedup follows SemDeDup (Abbas et al., 2023): spherical k-means on a sample of the
embeddings, every row assigned to its nearest centroid (and, when the margin to the
second-nearest is small, to that one too), then all pairs inside each cluster are compared with
blocked matrix products. No N x N matrix is ever built: the largest temporary is one block of
``block_rows x cluster_size`` similarities, and the N x D embedding matrix stays in its storage
dtype (float16 in the output schema) while each block is converted to float32.

Choosing keepers, and how chains are handled
--------------------------------------------
Similarity is not transitive: A ~ B and B ~ C do not imply A ~ C. Keeping one row per connected
component (what plain union-find grouping gives) would drop C as a duplicate of A although the
two differ. We keep greedily instead, in priority order (highest ``clip_score`` first, then the
smallest ``key``): a row is kept unless it is similar to a row kept before it; a dropped row's
``duplicate_of`` is the highest-priority kept row it is directly similar to. Two guarantees
follow and are tested: every dropped row is similar (cosine >= threshold) to the row it names,
and no two kept rows are similar. In the chain A ~ B ~ C (A first) A is kept, B is dropped as
a duplicate of A, and C is kept.

The keep decision needs, for each row, only its similar rows of higher priority, and among
them only the best-ranked one that was kept. So :func:`keep_greedily` never lists every
similar pair (m near copies of one picture make m^2 / 2 of them: 10,000 copies, 5e7 pairs):
each row keeps its 16 best-ranked similar rows (:func:`earlier_neighbours`), tries them in
order, and only a row whose listed rows were all dropped while more exist is compared again
with the kept rows of its clusters. The result equals :func:`choose_keepers` over all pairs
(tested, and checked by bench/dedup.py). :func:`semantic_pairs` still lists pairs where they
are the answer (an earlier run's rows; the benchmark's recall).

Rows with the same ``sha256`` are one item: the best of them (same priority rule) represents
the hash group in the semantic pass and the others are dropped with ``dup_kind`` = ``"exact"``
and ``duplicate_of`` = the representative. Rows kept by an earlier run always win: a row of
this run similar to one of them (or with the same hash) is dropped with ``dup_kind`` =
``"previous_run"`` and ``duplicate_of`` = that row's key. ``duplicate_of`` therefore always
states a direct relation (same bytes, cosine >= threshold, or a repeat of an earlier run). It
names a kept row except for an exact duplicate whose representative was itself dropped; one
more step along ``duplicate_of`` reaches the kept row then. ``dup_group_size`` counts every
row whose chain ends at the same kept row.

Pixel check (``dedup.pixel_check``): an embedding pair is also required to pass
:func:`pipeline.pixel_check.confirm_pairs` (the two rows' 32 x 32 thumbnails, aligned by a
scale and shift search, differ little on average and nowhere by much). ``threshold`` then only
selects candidates and can be looser; every "similar" above means "similar and confirmed".
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline import schema as S
from pipeline.config import DedupConfig
from pipeline.pixel_check import confirm_pairs
from pipeline.thumbnails import thumbs_array

log = logging.getLogger(__name__)

# Similarity blocks are capped at this many float32 entries (64 MiB) whatever the cluster size.
_BLOCK_ENTRIES = 16 * 1024 * 1024
# Below this many rows the automatic cluster count is 1: comparing all pairs exactly costs
# less than a second and gives recall 1.0.
AUTO_SINGLE_CLUSTER_MAX = 10_000

# Columns read from an earlier run's Parquet files.
PREVIOUS_COLUMNS = (S.KEY, S.SHA256, S.IMAGE_EMBEDDING, S.STATUS, S.DUPLICATE_OF, S.IMAGE_THUMB)


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


# ----------------------------------------------------------------------------- exact


def exact_groups(sha256: Sequence[str | None]) -> np.ndarray:
    """Group rows by identical hash.

    ``sha256``: N hex strings, ``None`` where the row has no image. Returns int64 [N]: for each
    row the index of the first row with the same hash (a row that is first points at itself),
    -1 for ``None``.
    """
    first: dict[str, int] = {}
    out = np.full(len(sha256), -1, dtype=np.int64)
    for idx, h in enumerate(sha256):
        if h is None:
            continue
        out[idx] = first.setdefault(h, idx)
    return out


# -------------------------------------------------------------------------- semantic


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
        step = max(1, _BLOCK_ENTRIES // len(cols_idx))
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


def semantic_clusters(
    emb: np.ndarray,
    n_clusters: int | None = None,
    sample_size: int = 100_000,
    seed: int = 0,
    second_cluster_margin: float = 0.05,
    kmeans_iterations: int = 10,
) -> list[np.ndarray]:
    """The clusters :func:`semantic_pairs` compares within: ``members[c]`` ascending int64 row
    indices of ``emb`` ([N, D] unit rows); one cluster of every row when ``n_clusters`` (or
    :func:`auto_n_clusters`) is 1."""
    n = emb.shape[0]
    k = n_clusters if n_clusters is not None else auto_n_clusters(n)
    if k <= 1 or n < 2:
        return [np.arange(n, dtype=np.int64)]
    cent = fit_centroids(emb, k, sample_size, kmeans_iterations, seed)
    p, s2 = assign_clusters(emb, cent, second_cluster_margin)
    return cluster_members(p, s2, cent.shape[0])


# --------------------------------------------------------------------------- keepers


def priority_order(clip_score: np.ndarray, key: Sequence[str]) -> np.ndarray:
    """Row indices best first: highest ``clip_score`` (float [N], NaN counts as lowest), ties
    broken by the smallest ``key`` (N strings). Returns int64 [N]."""
    score = np.asarray(clip_score, dtype=np.float64)
    score = np.where(np.isnan(score), -np.inf, score)
    keys = np.asarray(list(key), dtype=str) if len(key) else np.empty(0, dtype=str)
    return np.lexsort((keys, -score)).astype(np.int64)


def choose_keepers(
    n: int, pairs_i: np.ndarray, pairs_j: np.ndarray, order: np.ndarray
) -> np.ndarray:
    """Greedy keep in priority order over an undirected similarity graph.

    ``n`` rows; ``pairs_i``/``pairs_j``: int64 [E] edges; ``order``: int64 [N] row indices best
    first (see :func:`priority_order`). Returns int64 [N]: -1 for a kept row, else the index of
    the best kept row it has an edge to. A row is kept iff no earlier-kept row is adjacent to
    it, so no two kept rows are adjacent and every dropped row is adjacent to its keeper.
    """
    result = np.full(n, -1, dtype=np.int64)
    if len(pairs_i) == 0:
        return result
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n, dtype=np.int64)
    a = np.concatenate([pairs_i, pairs_j])
    b = np.concatenate([pairs_j, pairs_i])
    # Adjacency in CSR form with each row's neighbours sorted best first.
    sort = np.lexsort((rank[b], a))
    a, b = a[sort], b[sort]
    start = np.searchsorted(a, np.arange(n + 1))
    decided = np.zeros(n, dtype=bool)
    # Only rows with edges need a decision; walking them best first is what makes the rule greedy.
    for row in order[np.isin(order, a)]:
        if decided[row]:
            continue
        decided[row] = True
        nb = b[start[row] : start[row + 1]]
        nb = nb[~decided[nb]]
        result[nb] = row
        decided[nb] = True
    return result


def earlier_neighbours(
    emb: np.ndarray, members: list[np.ndarray], threshold: float, rank: np.ndarray, limit: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's best-ranked similar rows: of the rows that share a cluster with it, rank
    before it and have cosine >= ``threshold``, the ``limit`` with the smallest rank.

    ``emb``: [N, D] unit rows; ``members``: as :func:`cluster_members`; ``rank``: int64 [N]
    (0 = best). Returns CSR (``start`` int64 [N + 1], ``nbr`` int64 [E], each row's slice in
    rank order) and ``overflow`` bool [N]: True where more such rows exist than are listed.
    Memory: O(N * limit) however large a group of near copies is (all pairs would be m^2 / 2).
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    n = emb.shape[0]
    rows_parts: list[np.ndarray] = []
    nbr_parts: list[np.ndarray] = []
    overflow = np.zeros(n, dtype=bool)
    for idx in members:
        if len(idx) < 2:
            continue
        idx = idx[np.argsort(rank[idx], kind="stable")]  # cluster members best first
        x = torch.from_numpy(np.asarray(emb[idx], dtype=np.float32))
        step = max(1, _BLOCK_ENTRIES // len(idx))
        for s in range(0, len(idx), step):
            e = min(s + step, len(idx))
            # Row s + r may only name columns before it: the strictly lower triangle of
            # [s:e, :e] (zeroed entries are below any threshold > 0).
            hit = torch.tril(x[s:e] @ x[:e].T, diagonal=s - 1) >= threshold
            over = hit.sum(dim=1) > limit
            if over.any():
                # Only rows with more than ``limit`` hits pay for a running count.
                overflow[idx[s:e][over.numpy()]] = True
                sub = hit[over]
                hit[over] = sub & (sub.to(torch.int32).cumsum(dim=1, dtype=torch.int32) <= limit)
            r, q = torch.nonzero(hit, as_tuple=True)
            rows_parts.append(idx[(r + s).numpy()])
            nbr_parts.append(idx[q.numpy()])
    if rows_parts:
        rows = np.concatenate(rows_parts)
        nbr = np.concatenate(nbr_parts)
    else:
        rows = nbr = np.empty(0, dtype=np.int64)
    # A row in two clusters may list a neighbour twice and more than ``limit`` in all.
    code = np.unique(rows * np.int64(max(n, 1)) + nbr)
    rows, nbr = code // max(n, 1), code % max(n, 1)
    order = np.lexsort((rank[nbr], rows))
    rows, nbr = rows[order], nbr[order]
    start = np.searchsorted(rows, np.arange(n + 1))
    within = np.arange(len(rows)) - start[rows]
    overflow[rows[within >= limit]] = True
    keep = within < limit
    rows, nbr = rows[keep], nbr[keep]
    return np.searchsorted(rows, np.arange(n + 1)), nbr, overflow


def keep_greedily(
    emb: np.ndarray,
    members: list[np.ndarray],
    threshold: float,
    order: np.ndarray,
    confirm: Callable[[int, int], bool] | None = None,
    skip: np.ndarray | None = None,
    limit: int = 16,
) -> np.ndarray:
    """:func:`choose_keepers` over the graph "shares a cluster, cosine >= ``threshold`` and
    ``confirm(i, j)``", without listing every pair of it.

    A row is kept unless a kept row of higher priority is similar to it; then that row's
    keeper is the best-ranked such row. Each row's ``limit`` best-ranked similar rows
    (:func:`earlier_neighbours`) are tried first, in rank order; only a row all of whose listed
    rows were dropped, with more unlisted, is compared again with every kept row of its
    clusters. ``order``: int64 [N] rows best first; ``skip``: bool [N] rows that take no part
    (neither kept nor keepers). ``confirm`` is asked only about (row, kept row) candidates, in
    rank order, so a group of m copies costs about m checks, not m^2 / 2.
    Returns int64 [N]: -1 for a kept (or skipped) row, else the keeper's index.
    """
    n = emb.shape[0]
    result = np.full(n, -1, dtype=np.int64)
    if n == 0:
        return result
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n, dtype=np.int64)
    start, nbr, overflow = earlier_neighbours(emb, members, threshold, rank, limit)
    skip = np.zeros(n, dtype=bool) if skip is None else np.asarray(skip, dtype=bool)
    # Rows with nothing similar before them are kept whatever happens to the others.
    kept = ~skip
    busy = (np.diff(start) > 0) | overflow
    busy &= ~skip
    kept[busy] = False
    clusters_of: dict[int, list[int]] | None = None
    for row in order[busy[order]].tolist():
        keeper = -1
        for j in nbr[start[row] : start[row + 1]].tolist():
            if kept[j] and (confirm is None or confirm(row, j)):
                keeper = j
                break
        if keeper < 0 and overflow[row]:
            if clusters_of is None:
                clusters_of = {}
                for c, idx in enumerate(members):
                    for r in idx[overflow[idx]].tolist():
                        clusters_of.setdefault(r, []).append(c)
            listed = nbr[start[row] : start[row + 1]]
            cand = np.unique(np.concatenate([members[c] for c in clusters_of[row]]))
            cand = cand[kept[cand] & (rank[cand] < rank[row]) & ~np.isin(cand, listed)]
            if len(cand):
                sims = torch.from_numpy(np.asarray(emb[cand], dtype=np.float32)) @ torch.from_numpy(
                    np.asarray(emb[row], dtype=np.float32)
                )
                cand = cand[(sims >= threshold).numpy()]
                for j in cand[np.argsort(rank[cand], kind="stable")].tolist():
                    if confirm is None or confirm(row, j):
                        keeper = j
                        break
        if keeper >= 0:
            result[row] = keeper
        else:
            kept[row] = True
    return result


# ------------------------------------------------------------------------------ table


def _embedding_matrix(col: pa.ChunkedArray | pa.Array, what: str) -> np.ndarray:
    """[N, D] float16 (the storage dtype; a view of the Arrow buffer where it can be) from a
    non-null list-of-floats column; errors name ``<what>.image_embedding``."""
    emb, _ = S.embedding_matrix(col, dtype=np.float16, copy=False, name=f"{what}.{S.IMAGE_EMBEDDING}")
    return emb


def _unit_rows(emb: np.ndarray, block_rows: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """``emb`` with rows rescaled to unit norm, and bool [N], False for rows that are zero or
    not finite (these are set to zero and can only be deduplicated by hash). The pipeline writes unit rows, so the
    input (possibly a read-only view of Arrow memory) is returned as is unless a row is off
    by more than float16 rounding; only then is it copied."""
    norms = np.empty(emb.shape[0], dtype=np.float32)
    for s in range(0, emb.shape[0], block_rows):
        norms[s : s + block_rows] = np.linalg.norm(
            emb[s : s + block_rows].astype(np.float32), axis=1
        )
    good = np.isfinite(norms) & (norms > 1e-6)
    if good.all() and np.all(np.abs(norms - 1) <= 2e-3):
        return emb, good
    fixed = np.array(emb, dtype=emb.dtype, copy=True)
    scale = np.where(good, norms, 1.0).astype(np.float32)[:, None]
    for s in range(0, emb.shape[0], block_rows):
        fixed[s : s + block_rows] = (
            emb[s : s + block_rows].astype(np.float32) / scale[s : s + block_rows]
        )
    # Zero rows have cosine 0 with everything, so they never pair and never skew k-means.
    fixed[~good] = 0
    return fixed, good


class _PixelConfirm:
    """Do rows look alike by their thumbnails (:func:`pipeline.pixel_check.confirm_pairs`)?

    Pairs are (row ``rows_i[i]`` of ``col_i``, row ``rows_j[j]`` of ``col_j``); the j side
    defaults to the i side. ``confirm(i, j)`` answers one pair (what :func:`keep_greedily`
    asks), :meth:`many` a batch. Each row's thumbnail is decoded once, when first needed
    (3 KiB each); a missing column or value confirms nothing. ``calls``, ``passed`` and
    ``missing`` count pairs asked, pairs confirmed and rows without a thumbnail."""

    def __init__(
        self,
        cfg: DedupConfig,
        col_i: pa.ChunkedArray | None,
        rows_i: np.ndarray,
        col_j: pa.ChunkedArray | None = None,
        rows_j: np.ndarray | None = None,
    ) -> None:
        self.cfg = cfg
        side_i = (col_i, rows_i, {})
        self.sides = (side_i, side_i if rows_j is None else (col_j, rows_j, {}))
        self.calls = self.passed = self.missing = 0

    def _thumbs(self, side: int, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        col, rows, cache = self.sides[side]
        for i in idx.tolist():
            if i not in cache:
                value = None if col is None else col[int(rows[i])].as_py()
                arr, ok = thumbs_array([value])
                cache[i] = (arr[0], bool(ok[0]))
                self.missing += int(not ok[0])
        got = [cache[i] for i in idx.tolist()]
        return np.stack([g[0] for g in got]), np.array([g[1] for g in got], dtype=bool)

    def many(self, pi: np.ndarray, pj: np.ndarray) -> np.ndarray:
        """bool [E] for the pairs (``pi[e]``, ``pj[e]``)."""
        if len(pi) == 0:
            return np.zeros(0, dtype=bool)
        ui, inv_i = np.unique(np.asarray(pi, dtype=np.int64), return_inverse=True)
        uj, inv_j = np.unique(np.asarray(pj, dtype=np.int64), return_inverse=True)
        ti, oki = self._thumbs(0, ui)
        tj, okj = self._thumbs(1, uj)
        cfg = self.cfg
        out = confirm_pairs(ti, oki, tj, okj, inv_i, inv_j, cfg.pixel_mean_max, cfg.pixel_blob_max)
        self.calls += len(out)
        self.passed += int(out.sum())
        return out

    def __call__(self, i: int, j: int) -> bool:
        return bool(self.many(np.array([i]), np.array([j]))[0])

    def warn_missing(self) -> None:
        if self.missing:
            log.warning(
                "dedup: %d rows in candidate pairs have no thumbnail; they are nobody's duplicate",
                self.missing,
            )


def _eligible(table: pa.Table) -> np.ndarray:
    mask = pc.is_valid(table[S.IMAGE_EMBEDDING])
    if S.STATUS in table.column_names:
        mask = pc.and_(mask, pc.fill_null(pc.equal(table[S.STATUS], S.OK), False))
    return np.flatnonzero(mask.to_numpy(zero_copy_only=False))


def _require(table: pa.Table, cols: Sequence[str], what: str) -> None:
    missing = [c for c in cols if c not in table.column_names]
    if missing:
        raise ValueError(f"{what} table lacks column(s) {missing}; it has {table.column_names}")


def _previous_kept(previous: pa.Table) -> pa.Table:
    """The rows of an earlier run that new rows are compared with: ok, with an embedding, not
    themselves a duplicate."""
    _require(previous, (S.KEY, S.IMAGE_EMBEDDING), "previous")
    mask = pc.is_valid(previous[S.IMAGE_EMBEDDING])
    if S.STATUS in previous.column_names:
        mask = pc.and_(mask, pc.fill_null(pc.equal(previous[S.STATUS], S.OK), False))
    if S.DUPLICATE_OF in previous.column_names:
        mask = pc.and_(mask, pc.is_null(previous[S.DUPLICATE_OF]))
    return previous.filter(mask)


def dedup_table(
    table: pa.Table,
    cfg: DedupConfig,
    previous: pa.Table | None = None,
    progress: Callable[[str], None] | None = None,
) -> pa.Table:
    """Mark duplicates in a finished run's table.

    ``table`` needs ``key`` (string), ``sha256`` (string), ``clip_score`` (float) and
    ``image_embedding`` (fixed_size_list<float16>[D]); only rows with ``status == "ok"`` (when
    the column exists) and a non-null embedding take part. ``previous``: rows of earlier runs
    (at least ``key`` and ``image_embedding``; ``sha256``, ``status`` and ``duplicate_of`` are
    used when present); new rows that repeat one of them are dropped. With ``cfg.pixel_check``
    the input also needs ``image_thumb`` (binary, see :mod:`pipeline.pixel_check`), and an
    embedding pair counts only when the two thumbnails agree once aligned (an earlier run's row
    without a thumbnail then repeats nothing but its exact bytes).

    Returns ``table`` with ``duplicate_of`` (string, the kept row's key, null when the row is
    kept or did not take part), ``dup_group_size`` (int32: the kept row plus every row whose
    ``duplicate_of`` chain ends at it; null when the row did not take part) and ``dup_kind`` (string: ``exact``,
    ``semantic``, ``previous_run`` or null), replacing those columns if present. Rows are
    never removed or reordered, and ``keep``/``drop_reason`` are left alone: the final decision
    (which also weighs the other filters) is :func:`pipeline.decisions.decide`'s. ``progress``
    receives one line per phase (counts and seconds), for the job log.
    """
    cfg.validate()
    _require(table, (S.KEY, S.SHA256, S.CLIP_SCORE, S.IMAGE_EMBEDDING), "input")
    if cfg.pixel_check:
        _require(table, (S.IMAGE_THUMB,), "input (dedup.pixel_check)")
    thumbs = table[S.IMAGE_THUMB] if cfg.pixel_check else None
    n_rows = table.num_rows
    rows = _eligible(table)
    take = pa.array(rows, pa.int64())
    n = len(rows)
    keys = table[S.KEY].take(take).to_pylist()
    hashes = table[S.SHA256].take(take).to_pylist()
    score = pc.cast(table[S.CLIP_SCORE].take(take), pa.float64()).to_numpy(zero_copy_only=False)
    order = priority_order(score, keys)
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n, dtype=np.int64)

    # Exact: the best row of each hash group represents it.
    first = exact_groups(hashes)
    rep = np.arange(n, dtype=np.int64)
    has_hash = first >= 0
    if has_hash.any():
        groups = first[has_hash]
        members = np.flatnonzero(has_hash)
        best_rank = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(best_rank, groups, rank[members])
        rep[members] = order[best_rank[groups]]
    is_rep = rep == np.arange(n)
    cand = np.flatnonzero(is_rep)  # row positions (in the eligible rows) of the representatives

    # Only the representatives' embeddings are materialised: one copy, in the column's dtype.
    emb = _embedding_matrix(
        table[S.IMAGE_EMBEDDING].take(pa.array(rows[cand], pa.int64())), "input"
    )
    emb, emb_ok = _unit_rows(emb)
    if not emb_ok.all():
        log.warning(
            "dedup: %d rows have a zero or non-finite embedding; hash dedup only",
            int((~emb_ok).sum()),
        )

    keeper_idx = np.full(n, -1, dtype=np.int64)  # row position in this run of the keeper
    prev_key: list[str | None] = [None] * n  # key of an earlier run's keeper
    kind: list[str | None] = [None] * n
    # claimed[c]: representative c (index into cand/emb) is already dropped.
    claimed = np.zeros(len(cand), dtype=bool)

    # Earlier runs: a representative that repeats a previous row is dropped.
    if previous is not None:
        prev = _previous_kept(previous)
        pkeys = prev[S.KEY].to_pylist()
        if S.SHA256 in prev.column_names and prev.num_rows:
            by_hash = {
                h: k
                for h, k in zip(prev[S.SHA256].to_pylist(), pkeys, strict=True)
                if h is not None
            }
            for c, r in enumerate(cand.tolist()):
                h = hashes[r]
                if h is not None and h in by_hash:
                    prev_key[r], kind[r] = by_hash[h], S.DUP_PREVIOUS_RUN
                    claimed[c] = True
        pemb = _embedding_matrix(prev[S.IMAGE_EMBEDDING], "previous")
        if pemb.shape[0] and emb.shape[1] != pemb.shape[1]:
            raise ValueError(
                f"previous embeddings have dimension {pemb.shape[1]}, this run {emb.shape[1]}"
            )
        pemb, _ = _unit_rows(pemb)
        if len(cand) and len(pemb):
            pp = semantic_pairs(
                emb,
                cfg.threshold,
                cfg.n_clusters,
                cfg.sample_size,
                cfg.seed,
                cfg.second_cluster_margin,
                cfg.kmeans_iterations,
                other=pemb,
            )
            live = ~claimed[pp.i]
            pi, pj, psim = pp.i[live], pp.j[live], pp.sim[live]
            if cfg.pixel_check:
                pthumbs = prev[S.IMAGE_THUMB] if S.IMAGE_THUMB in prev.column_names else None
                check = _PixelConfirm(cfg, thumbs, rows[cand], pthumbs, np.arange(prev.num_rows))
                sure = check.many(pi, pj)
                check.warn_missing()
                pi, pj, psim = pi[sure], pj[sure], psim[sure]
            # The most similar earlier row is named (ties: the earlier row read first).
            by_best = np.lexsort((pj, -psim, pi))
            a_sorted = pi[by_best]
            first = np.ones(len(a_sorted), dtype=bool)  # the first (best) pair of each new row
            first[1:] = a_sorted[1:] != a_sorted[:-1]
            first_of_row = by_best[first]
            for c, b in zip(pi[first_of_row].tolist(), pj[first_of_row].tolist(), strict=True):
                r = int(cand[c])
                prev_key[r], kind[r] = pkeys[b], S.DUP_PREVIOUS_RUN
                claimed[c] = True
        del pemb

    say = progress or (lambda line: None)
    say(
        f"  dedup: {n:,} rows, {len(cand):,} distinct images by sha256"
        + (f", {int(claimed.sum()):,} repeat an earlier run" if previous is not None else "")
    )
    # Semantic, among the representatives that no earlier run claims.
    if len(cand) >= 2:
        started = time.perf_counter()
        members = semantic_clusters(
            emb,
            cfg.n_clusters,
            cfg.sample_size,
            cfg.seed,
            cfg.second_cluster_margin,
            cfg.kmeans_iterations,
        )
        confirm = _PixelConfirm(cfg, thumbs, rows[cand]) if cfg.pixel_check else None
        # Rows an earlier run claims are gone already and must not keep anyone out.
        keep_of = keep_greedily(
            emb,
            members,
            cfg.threshold,
            np.argsort(rank[cand], kind="stable"),
            confirm,
            skip=claimed,
        )
        checks = f", {confirm.calls:,} pixel checks ({confirm.passed:,} passed)" if confirm else ""
        say(
            f"  dedup: {int((keep_of >= 0).sum()):,} semantic duplicates at cosine >= "
            f"{cfg.threshold:g} in {len(members):,} clusters{checks}, "
            f"{time.perf_counter() - started:.1f} s"
        )
        if confirm is not None:
            confirm.warn_missing()
        dropped = np.flatnonzero(keep_of >= 0)
        keeper_idx[cand[dropped]] = cand[keep_of[dropped]]
        for r in cand[dropped].tolist():
            kind[r] = S.DUP_SEMANTIC
    del emb

    # Hash-group members are exact duplicates of their representative, whatever became of it.
    not_rep = np.flatnonzero(~is_rep)
    keeper_idx[not_rep] = rep[not_rep]
    for r in not_rep:
        kind[r] = S.DUP_EXACT

    dup_of: list[str | None] = [
        prev_key[r]
        if prev_key[r] is not None
        else (keys[keeper_idx[r]] if keeper_idx[r] >= 0 else None)
        for r in range(n)
    ]
    # A group is everything whose duplicate_of chain ends at the same kept row (here or in an
    # earlier run): an exact duplicate of a dropped representative counts toward the row that
    # representative names.
    # Keys of an earlier run may repeat this run's keys (the same input list resubmitted),
    # so a group is identified by (from an earlier run, key).
    final: list[tuple[bool, str]] = []
    for r in range(n):
        g = int(keeper_idx[r]) if kind[r] == S.DUP_EXACT else r
        if prev_key[g] is not None:
            final.append((True, prev_key[g]))
        else:
            final.append((False, keys[keeper_idx[g]] if keeper_idx[g] >= 0 else keys[g]))
    counts: dict[tuple[bool, str], int] = {}
    for f in final:
        counts[f] = counts.get(f, 0) + 1
    # The kept row of an earlier run is not in this table but belongs to its group.
    size = np.array([counts[f] + int(f[0]) for f in final], dtype=np.int32)

    full_dup: list[str | None] = [None] * n_rows
    full_kind: list[str | None] = [None] * n_rows
    full_size: list[int | None] = [None] * n_rows
    for pos, r in enumerate(rows.tolist()):
        full_dup[r], full_kind[r], full_size[r] = dup_of[pos], kind[pos], int(size[pos])
    out = S.set_column(table, S.DUPLICATE_OF, pa.array(full_dup, pa.string()))
    out = S.set_column(out, S.DUP_GROUP_SIZE, pa.array(full_size, pa.int32()))
    return S.set_column(out, S.DUP_KIND, pa.array(full_kind, pa.string()))


def read_previous_run(path: str, filesystem: object | None = None) -> pa.Table:
    """The Parquet rows of an earlier run (a local folder or an ``s3://`` URI), only the columns
    dedup uses (``key``, ``sha256``, ``image_embedding``, ``status``, ``duplicate_of``,
    ``image_thumb``; all but ``key`` and ``image_embedding`` when present). ``filesystem``: a ``pyarrow.fs.FileSystem`` for object stores
    that need an endpoint or credentials (then ``path`` has no scheme)."""
    import pyarrow.dataset as ds

    dataset = ds.dataset(path, format="parquet", filesystem=filesystem)
    names = dataset.schema.names
    missing = [c for c in (S.KEY, S.IMAGE_EMBEDDING) if c not in names]
    if missing:
        raise ValueError(f"previous run {path!r} lacks column(s) {missing}; it has {names}")
    cols = [c for c in PREVIOUS_COLUMNS if c in names]
    return dataset.to_table(columns=cols)
