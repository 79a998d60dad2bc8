"""Arrow in and out of dedup: :func:`dedup_table` reads a finished run's rows (and an earlier
run's kept rows), runs exact and semantic dedup (:mod:`.keepers`, :mod:`.pairs`,
:mod:`.clusters`), and returns the table with ``duplicate_of``, ``dup_group_size`` and
``dup_kind``. Also the adapters it needs: embedding columns to unit float16 matrices, and the
pixel check of candidate pairs by their thumbnails (:mod:`pipeline.pixel_check`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import schema as S
from pipeline.config import DedupConfig
from pipeline.dedup.clusters import semantic_clusters
from pipeline.dedup.keepers import hash_representatives, keep_greedily, priority_order
from pipeline.dedup.pairs import semantic_pairs
from pipeline.pixel_check import (
    PixelBounds,
    block_stats,
    block_stats_shape,
    confirm_pairs,
    contrast,
    may_confirm,
    pair_gain,
)
from pipeline.thumbnails import ThumbColumn, ThumbFile

log = logging.getLogger("pipeline.dedup")


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


# Pair (i, j) of positions is remembered as i * _CODE + j: room for 2^31 rows a side.
_CODE = np.int64(1) << 31


class _PixelConfirm:
    """Do rows look alike by their thumbnails (:func:`pipeline.pixel_check.confirm_pairs`)?

    Pairs are (row ``rows_i[i]`` of ``col_i``, row ``rows_j[j]`` of ``col_j``); the j side
    defaults to the i side. ``confirm(i, js)`` answers one row against candidates (what
    :func:`keep_greedily` asks), :meth:`many` any batch of pairs, :meth:`ahead` a batch the
    caller expects to ask about soon (answered in bulk and remembered: one greedy question
    at a time costs ~0.8 ms of fixed overhead per call, a pair in a batch of thousands
    ~0.3 ms). Thumbnails are read from the Arrow buffers per batch
    (:class:`pipeline.thumbnails.ThumbColumn`); each row's contrast is computed once, into
    one float64 array per side. A missing column or value confirms nothing.

    Before any pixels are compared, each pair is bounded from its rows' block statistics
    (:func:`pipeline.pixel_check.may_confirm`; 729 bytes a row, made once per row, in one
    array per side): most candidates are look-alikes that are not copies, and the bound
    rules out ~93 % of them at ~5 microseconds a pair, where the search and its per-pixel
    bound cost ~170 (on the 50,000-row scale world, bench/RESULTS.md 2026-12-06). No answer
    changes. ``calls``, ``passed`` and ``missing`` count pairs asked, pairs confirmed among
    them and rows without a thumbnail; ``computed`` counts pairs answered (asked or ahead),
    ``searched`` those that needed the pixels."""

    # Pairs compared per confirm_pairs call: enough to spread its fixed cost, small enough that
    # its temporaries (reach ranges and differences, ~25 KiB a pair) stay a few MiB. At 2,048
    # they reached ~50 MiB, and glibc then kept freed blocks of that size in the heap: the
    # driver's peak at 50,000 rows grew by 240 MiB (bench/scale.py).
    CHUNK = 256

    def __init__(
        self,
        cfg: DedupConfig,
        col_i: pa.ChunkedArray | ThumbFile | None,
        rows_i: np.ndarray,
        col_j: pa.ChunkedArray | ThumbFile | None = None,
        rows_j: np.ndarray | None = None,
    ) -> None:
        self.bounds = PixelBounds.of(cfg)
        side_i = self._side(col_i, rows_i)
        self.sides = (side_i, side_i if rows_j is None else self._side(col_j, rows_j))
        self.calls = self.passed = self.missing = self.computed = self.searched = 0
        # Answers given ahead, as sorted pair codes (i * _CODE + j) and their results: 9 bytes
        # a pair, so ~2 MiB for 50,000 rows' guesses.
        self._known_code = np.empty(0, dtype=np.int64)
        self._known_ok = np.empty(0, dtype=bool)

    @staticmethod
    def _side(col: pa.ChunkedArray | ThumbFile | None, rows: np.ndarray) -> _Side:
        return _Side(ThumbColumn(col, rows))

    def _thumbs(self, side: int, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(thumbnails, ok, contrast) of positions ``idx`` (unique) of one side."""
        sd = self.sides[side]
        arr, ok = sd.view.gather(idx)
        fresh = np.isnan(sd.con[idx])
        if fresh.any():
            sd.con[idx[fresh]] = contrast(arr[fresh])
        lost = idx[~ok & ~sd.counted[idx]]
        sd.counted[lost] = True
        self.missing += len(lost)
        return arr, ok, sd.con[idx]

    def _stats(self, side: int, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(block stats, ok, contrast) of positions ``idx`` (unique) of one side, made for the
        positions that have none yet."""
        sd = self.sides[side]
        need = idx[~sd.has[idx]]
        if len(need):
            arr, ok, _ = self._thumbs(side, need)
            if sd.stats is None:
                sd.stats = np.zeros((len(sd.view),) + block_stats_shape(sd.view.side), dtype=np.uint8)
            sd.stats[need[ok]] = block_stats(arr[ok])
            sd.ok[need] = ok
            sd.has[need] = True
        return sd.stats[idx], sd.ok[idx], sd.con[idx]

    def _compare(self, pi: np.ndarray, pj: np.ndarray) -> np.ndarray:
        """bool [E], computed (no memory of earlier answers), CHUNK pairs at a time."""
        out = np.zeros(len(pi), dtype=bool)
        self.computed += len(pi)
        live = np.flatnonzero(self._may_confirm(pi, pj))
        pi, pj = pi[live], pj[live]
        self.searched += len(live)
        for s in range(0, len(pi), self.CHUNK):
            ui, inv_i = np.unique(pi[s : s + self.CHUNK], return_inverse=True)
            uj, inv_j = np.unique(pj[s : s + self.CHUNK], return_inverse=True)
            ti, oki, ci = self._thumbs(0, ui)
            tj, okj, cj = self._thumbs(1, uj)
            out[live[s : s + self.CHUNK]] = confirm_pairs(
                ti, oki, tj, okj, inv_i, inv_j, self.bounds, ci, cj
            )
        return out

    def _may_confirm(self, pi: np.ndarray, pj: np.ndarray) -> np.ndarray:
        """bool [E]: False for pairs the block bound rules out (and pairs missing a
        thumbnail), CHUNK pairs at a time."""
        out = np.zeros(len(pi), dtype=bool)
        side = self.sides[0].view.side
        for s in range(0, len(pi), self.CHUNK):
            ui, inv_i = np.unique(pi[s : s + self.CHUNK], return_inverse=True)
            uj, inv_j = np.unique(pj[s : s + self.CHUNK], return_inverse=True)
            si, oki, ci = self._stats(0, ui)
            sj, okj, cj = self._stats(1, uj)
            both = oki[inv_i] & okj[inv_j]
            gain = pair_gain(ci[inv_i], cj[inv_j])
            may = may_confirm(si[inv_i], sj[inv_j], gain, side, self.bounds)
            out[s : s + self.CHUNK] = both & may
        return out

    def ahead(self, pi: np.ndarray, pj: np.ndarray) -> np.ndarray:
        """bool [E] for the pairs (``pi[e]``, ``pj[e]``), remembered for later questions and
        not counted as asked."""
        pi = np.asarray(pi, dtype=np.int64)
        pj = np.asarray(pj, dtype=np.int64)
        out = self._compare(pi, pj)
        code = np.concatenate([self._known_code, pi * _CODE + pj])
        ok = np.concatenate([self._known_ok, out])
        order = np.argsort(code, kind="stable")
        self._known_code, self._known_ok = code[order], ok[order]
        return out

    def many(self, pi: np.ndarray, pj: np.ndarray) -> np.ndarray:
        """bool [E] for the pairs (``pi[e]``, ``pj[e]``)."""
        if len(pi) == 0:
            return np.zeros(0, dtype=bool)
        pi = np.asarray(pi, dtype=np.int64)
        pj = np.asarray(pj, dtype=np.int64)
        out = np.zeros(len(pi), dtype=bool)
        todo = np.ones(len(pi), dtype=bool)
        if len(self._known_code):
            code = pi * _CODE + pj
            at = np.minimum(np.searchsorted(self._known_code, code), len(self._known_code) - 1)
            hit = self._known_code[at] == code
            out[hit], todo[hit] = self._known_ok[at[hit]], False
        fresh = np.flatnonzero(todo)
        if len(fresh):
            out[fresh] = self._compare(pi[fresh], pj[fresh])
        self.calls += len(out)
        self.passed += int(out.sum())
        return out

    def __call__(self, i: int, js: np.ndarray) -> np.ndarray:
        return self.many(np.full(len(js), i, dtype=np.int64), js)

    def warn_missing(self) -> None:
        if self.missing:
            log.warning(
                "dedup: %d rows in candidate pairs have no thumbnail; they are nobody's duplicate",
                self.missing,
            )


class _Side:
    """One side's rows for :class:`_PixelConfirm`: the thumbnail view and, per position,
    contrast (NaN: not yet computed), "counted as missing", and block statistics with their
    "made" and "has a thumbnail" flags (the statistics array is allocated at first use)."""

    def __init__(self, view: ThumbColumn) -> None:
        n = len(view)
        self.view = view
        self.con = np.full(n, np.nan)
        self.counted = np.zeros(n, dtype=bool)
        self.has = np.zeros(n, dtype=bool)
        self.ok = np.zeros(n, dtype=bool)
        self.stats: np.ndarray | None = None


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
    thumbs: ThumbFile | None = None,
) -> pa.Table:
    """Mark duplicates in a finished run's table.

    ``table`` needs ``key`` (string), ``sha256`` (string), ``clip_score`` (float) and
    ``image_embedding`` (fixed_size_list<float16>[D]); only rows with ``status == "ok"`` (when
    the column exists) and a non-null embedding take part. ``previous``: rows of earlier runs
    (at least ``key`` and ``image_embedding``; ``sha256``, ``status`` and ``duplicate_of`` are
    used when present); new rows that repeat one of them are dropped. With ``cfg.pixel_check``
    the input also needs ``image_thumb`` (binary, see :mod:`pipeline.pixel_check`), and an
    embedding pair counts only when the two thumbnails agree once aligned (an earlier run's row
    without a thumbnail then repeats nothing but its exact bytes). ``thumbs``: the table's
    thumbnails spilled to a file (row i of the table is row i of the file), used instead of
    the column.

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
    col: pa.ChunkedArray | ThumbFile | None = None
    if cfg.pixel_check and thumbs is not None:
        if thumbs.rows != table.num_rows:
            raise ValueError(f"thumbs: {thumbs.rows} rows for a table of {table.num_rows}")
        col = thumbs
    elif cfg.pixel_check:
        _require(table, (S.IMAGE_THUMB,), "input (dedup.pixel_check)")
        col = table[S.IMAGE_THUMB]
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
    rep = hash_representatives(hashes, order)
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
        cand_hashes = [hashes[r] for r in cand.tolist()]
        for c, key in _repeats_of_previous(previous, cfg, emb, cand_hashes, col, rows[cand]).items():
            r = int(cand[c])
            prev_key[r], kind[r] = key, S.DUP_PREVIOUS_RUN
            claimed[c] = True

    say = progress or (lambda line: None)
    say(
        f"  dedup: {n:,} rows, {len(cand):,} distinct images by sha256"
        + (f", {int(claimed.sum()):,} repeat an earlier run" if previous is not None else "")
    )
    # Semantic, among the representatives that no earlier run claims.
    if len(cand) >= 2:
        keep_of = _semantic_keepers(
            emb, cfg, np.argsort(rank[cand], kind="stable"), col, rows[cand], claimed, say
        )
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

    dup_of, size = _links(keys, keeper_idx, prev_key, kind)
    n_rows = table.num_rows
    full_dup: list[str | None] = [None] * n_rows
    full_kind: list[str | None] = [None] * n_rows
    full_size: list[int | None] = [None] * n_rows
    for pos, r in enumerate(rows.tolist()):
        full_dup[r], full_kind[r], full_size[r] = dup_of[pos], kind[pos], int(size[pos])
    out = S.set_column(table, S.DUPLICATE_OF, pa.array(full_dup, pa.string()))
    out = S.set_column(out, S.DUP_GROUP_SIZE, pa.array(full_size, pa.int32()))
    return S.set_column(out, S.DUP_KIND, pa.array(full_kind, pa.string()))


def _repeats_of_previous(
    previous: pa.Table,
    cfg: DedupConfig,
    emb: np.ndarray,
    hashes: list[str | None],
    thumbs: pa.ChunkedArray | ThumbFile | None,
    thumb_rows: np.ndarray,
) -> dict[int, str]:
    """The representatives (``emb``'s rows; ``hashes`` theirs, ``thumb_rows`` their rows in
    ``thumbs``) that repeat a row an earlier run kept: {index into emb: that row's key}. Same
    sha256 first; else the most similar earlier row (ties: the earlier row read first), pixel
    checked when ``cfg.pixel_check``."""
    prev = _previous_kept(previous)
    pkeys = prev[S.KEY].to_pylist()
    claims: dict[int, str] = {}
    if S.SHA256 in prev.column_names and prev.num_rows:
        by_hash = {
            h: k
            for h, k in zip(prev[S.SHA256].to_pylist(), pkeys, strict=True)
            if h is not None
        }
        for c, h in enumerate(hashes):
            if h is not None and h in by_hash:
                claims[c] = by_hash[h]
    pemb = _embedding_matrix(prev[S.IMAGE_EMBEDDING], "previous")
    if pemb.shape[0] and emb.shape[1] != pemb.shape[1]:
        raise ValueError(
            f"previous embeddings have dimension {pemb.shape[1]}, this run {emb.shape[1]}"
        )
    pemb, _ = _unit_rows(pemb)
    if not (len(emb) and len(pemb)):
        return claims
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
    claimed = np.zeros(len(emb), dtype=bool)
    claimed[list(claims)] = True
    live = ~claimed[pp.i]
    pi, pj, psim = pp.i[live], pp.j[live], pp.sim[live]
    if cfg.pixel_check:
        pthumbs = prev[S.IMAGE_THUMB] if S.IMAGE_THUMB in prev.column_names else None
        check = _PixelConfirm(cfg, thumbs, thumb_rows, pthumbs, np.arange(prev.num_rows))
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
        claims[c] = pkeys[b]
    return claims


def _semantic_keepers(
    emb: np.ndarray,
    cfg: DedupConfig,
    order: np.ndarray,
    thumbs: pa.ChunkedArray | ThumbFile | None,
    thumb_rows: np.ndarray,
    skip: np.ndarray,
    say: Callable[[str], None],
) -> np.ndarray:
    """:func:`keep_greedily` over ``emb``'s clusters (``order``: its rows best first; ``skip``:
    rows an earlier run claims, which are gone already and must not keep anyone out), pixel
    checked when ``cfg.pixel_check``. Returns int64 [N]: -1 kept, else the keeper's index."""
    started = time.perf_counter()
    members = semantic_clusters(
        emb,
        cfg.n_clusters,
        cfg.sample_size,
        cfg.seed,
        cfg.second_cluster_margin,
        cfg.kmeans_iterations,
    )
    confirm = _PixelConfirm(cfg, thumbs, thumb_rows) if cfg.pixel_check else None
    keep_of = keep_greedily(
        emb, members, cfg.threshold, order, confirm, skip=skip, ahead=confirm.ahead if confirm else None
    )
    checks = ""
    if confirm is not None:
        unused = confirm.computed - confirm.calls
        checks = f", {confirm.calls:,} pixel checks ({confirm.passed:,} passed)" + (
            f", {unused:,} more compared ahead" if unused > 0 else ""
        ) + f", {confirm.searched:,} past the block bound"
    say(
        f"  dedup: {int((keep_of >= 0).sum()):,} semantic duplicates at cosine >= "
        f"{cfg.threshold:g} in {len(members):,} clusters{checks}, "
        f"{time.perf_counter() - started:.1f} s"
    )
    if confirm is not None:
        confirm.warn_missing()
    return keep_of


def _links(
    keys: list[str], keeper_idx: np.ndarray, prev_key: list[str | None], kind: list[str | None]
) -> tuple[list[str | None], np.ndarray]:
    """Each row's ``duplicate_of`` (an earlier run's key, else its keeper's key, else None) and
    ``dup_group_size`` (int32 [N])."""
    n = len(keys)
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
    return dup_of, size
