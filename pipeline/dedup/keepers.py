"""Which rows are kept: hash groups and their representatives, the priority order (best
``clip_score`` first, then the smallest key), and the greedy keeper over the similarity graph
that never lists every pair (see :mod:`pipeline.dedup` for the rule and its guarantees).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from pipeline.dedup.clusters import BLOCK_ENTRIES


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


def hash_representatives(sha256: Sequence[str | None], order: np.ndarray) -> np.ndarray:
    """The representative of each row's hash group: the group's first row in ``order`` (int64
    [N] row indices, best first; see :func:`priority_order`). Returns int64 [N]; a row without
    a hash represents itself."""
    n = len(sha256)
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n, dtype=np.int64)
    first = exact_groups(sha256)
    rep = np.arange(n, dtype=np.int64)
    has_hash = first >= 0
    if has_hash.any():
        groups = first[has_hash]
        members = np.flatnonzero(has_hash)
        best_rank = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(best_rank, groups, rank[members])
        rep[members] = order[best_rank[groups]]
    return rep


def priority_order(clip_score: np.ndarray, key: Sequence[str]) -> np.ndarray:
    """Row indices best first: highest ``clip_score`` (float [N], NaN counts as lowest), ties
    broken by the smallest ``key`` (N strings). Returns int64 [N]."""
    score = np.asarray(clip_score, dtype=np.float64)
    score = np.where(np.isnan(score), -np.inf, score)
    keys = np.asarray(list(key), dtype=str) if len(key) else np.empty(0, dtype=str)
    return np.lexsort((keys, -score)).astype(np.int64)


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
        step = max(1, BLOCK_ENTRIES // len(idx))
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
    confirm: Callable[[int, np.ndarray], np.ndarray] | None = None,
    skip: np.ndarray | None = None,
    limit: int = 16,
    ahead: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """The greedy keep rule over the graph "shares a cluster, cosine >= ``threshold`` and
    ``confirm(i, j)``", without listing every pair of it.

    A row is kept unless a kept row of higher priority is similar to it; then that row's
    keeper is the best-ranked such row. Each row's ``limit`` best-ranked similar rows
    (:func:`earlier_neighbours`) are tried first, in rank order; only a row all of whose listed
    rows were dropped, with more unlisted, is compared again with every kept row of its
    clusters. ``order``: int64 [N] rows best first; ``skip``: bool [N] rows that take no part
    (neither kept nor keepers). ``confirm(row, cands)`` (cands int64 [K], kept rows in rank
    order; returns bool [K]) is asked only about kept candidates, in growing batches (up to
    256) that stop at the first confirmed one, so a group of m copies costs about m
    checks, not m^2 / 2, and a row with many look-alikes that are not copies is checked in a
    few calls. ``ahead(rows, cands)`` (int64 [E] each; returns bool [E], the answers
    ``confirm`` will give for those pairs) is given, before the loop and in three batches,
    the questions the loop asks about listed rows (:func:`_likely_questions`), so that a
    ``confirm`` that remembers them answers most of the loop without a call of its own; the
    result is the same with or without it.
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
    if confirm is not None and ahead is not None:
        _likely_questions(start, nbr, busy, skip, ahead)
    clusters_of: dict[int, list[int]] | None = None
    for row in order[busy[order]].tolist():
        listed = nbr[start[row] : start[row + 1]]
        keeper = _first_confirmed(row, listed[kept[listed]], confirm)
        if keeper < 0 and overflow[row]:
            if clusters_of is None:
                clusters_of = {}
                for c, idx in enumerate(members):
                    for r in idx[overflow[idx]].tolist():
                        clusters_of.setdefault(r, []).append(c)
            cand = np.unique(np.concatenate([members[c] for c in clusters_of[row]]))
            cand = cand[kept[cand] & (rank[cand] < rank[row]) & ~np.isin(cand, listed)]
            if len(cand):
                sims = torch.from_numpy(np.asarray(emb[cand], dtype=np.float32)) @ torch.from_numpy(
                    np.asarray(emb[row], dtype=np.float32)
                )
                cand = cand[(sims >= threshold).numpy()]
                # Past the listed ones a copy is unlikely: start with larger batches.
                ranked = cand[np.argsort(rank[cand], kind="stable")]
                keeper = _first_confirmed(row, ranked, confirm, first=16)
        if keeper >= 0:
            result[row] = keeper
        else:
            kept[row] = True
    return result


def _likely_questions(
    start: np.ndarray,
    nbr: np.ndarray,
    busy: np.ndarray,
    skip: np.ndarray,
    ahead: Callable[[np.ndarray, np.ndarray], np.ndarray],
) -> None:
    """Hand ``ahead`` what :func:`keep_greedily`'s loop will most likely ask, as three
    batches: each busy row with its best-ranked listed row (the loop's first question, asked
    whenever that row is still kept); for the rows where that pair failed, their next 4 listed
    rows (the loop's second batch); for the rows where those failed too, the rest of their
    listed rows (its third). Left to the loop's own calls: the fallback past the listed rows
    (:func:`earlier_neighbours`' overflow), and rows whose guessed keeper it dropped before
    asking. Rows taken by an earlier run (``skip``) are never kept, so never asked about. A
    guess may name a row the loop has dropped by then: a wasted comparison, never a different
    answer."""
    counts = np.diff(start)
    row_of = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    entry = np.flatnonzero(busy[row_of] & ~skip[nbr])
    if len(entry) == 0:
        return
    rows = row_of[entry]
    # position of each entry among its row's usable entries (CSR keeps a row's entries together)
    first_of_row = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    pos = np.arange(len(entry)) - np.repeat(first_of_row, np.diff(np.r_[first_of_row, len(entry)]))
    # The loop's batches: 1 row, then 4, then the rest of the listed rows (the third used to
    # be left to the loop, one row at a time, a few pairs per call, where each call's fixed
    # cost exceeded its pixel work: dedup 44 -> 33 s on the 50,000-row scale world).
    open_rows = np.ones(len(counts), dtype=bool)  # rows with no confirmed guess yet
    for lo, hi in ((0, 0), (1, 4), (5, len(counts))):
        batch = entry[(pos >= lo) & (pos <= hi) & open_rows[rows]]
        if len(batch) == 0:
            return
        hit = np.asarray(ahead(row_of[batch], nbr[batch]), dtype=bool)
        open_rows[row_of[batch][hit]] = False


def _first_confirmed(
    row: int,
    cands: np.ndarray,
    confirm: Callable[[int, np.ndarray], np.ndarray] | None,
    first: int = 1,
) -> int:
    """The first of ``cands`` (rank order) that ``confirm`` accepts for ``row``, else -1.
    Asked in growing batches: ``first`` candidates (1: the best-ranked alone, usually the
    answer for a real copy), then 4x as many each time, at most 256 (few calls for many
    look-alikes that are not copies)."""
    if len(cands) == 0:
        return -1
    if confirm is None:
        return int(cands[0])
    at, size = 0, first
    while at < len(cands):
        batch = cands[at : at + size]
        hit = np.flatnonzero(confirm(row, batch))
        if len(hit):
            return int(batch[hit[0]])
        at += size
        size = min(size * 4, 256)
    return -1
