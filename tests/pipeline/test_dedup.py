"""Global dedup: hand-worked examples, planted ground truth, and the keeper rule's guarantees."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import ConfigError, DedupConfig, StorageConfig
from pipeline.dedup import (
    assign_clusters,
    cluster_members,
    dedup_table,
    earlier_neighbours,
    exact_groups,
    keep_greedily,
    pairs_within_clusters,
    priority_order,
    semantic_clusters,
    semantic_pairs,
)
from pipeline.global_pass import read_previous
from testkit.dedup_reference import choose_keepers


def _angles(*deg: float) -> np.ndarray:
    rad = np.radians(deg)
    return np.stack([np.cos(rad), np.sin(rad)], axis=1).astype(np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute_pairs(emb: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    """Every pair i < j with cosine >= threshold, in float64, 1000 rows at a time."""
    x = emb.astype(np.float64)
    out: set[tuple[int, int]] = set()
    for s in range(0, len(x), 1000):
        i, j = np.nonzero(x[s : s + 1000] @ x.T >= threshold)
        i = i + s
        out.update((a, b) for a, b in zip(i.tolist(), j.tolist(), strict=True) if a < b)
    return out


def _topical(n: int, dim: int, topics: int, seed: int) -> np.ndarray:
    """float16 unit rows around ``topics`` random centres (same-topic cosine ~0.5, so k-means
    with more clusters than topics must cut through dense regions); 30% of rows in groups of
    2..4 whose members are base + noise of norm U(0.05, 0.3): pair cosines 0.92..0.997,
    straddling 0.95."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((topics, dim)))
    x = centres[rng.integers(0, topics, n)] + rng.standard_normal((n, dim)) / math.sqrt(dim)
    sizes = rng.integers(2, 5, size=int(0.1 * n))
    sizes = sizes[np.cumsum(sizes) <= n]
    gid = np.full(n, -1)
    gid[rng.permutation(n)[: sizes.sum()]] = np.repeat(np.arange(len(sizes)), sizes)
    bases = _unit(
        centres[rng.integers(0, topics, len(sizes))]
        + rng.standard_normal((len(sizes), dim)) / math.sqrt(dim)
    )
    dup = gid >= 0
    e = rng.uniform(0.05, 0.3, size=(int(dup.sum()), 1))
    x[dup] = bases[gid[dup]] + e * rng.standard_normal((int(dup.sum()), dim)) / math.sqrt(dim)
    return _unit(x).astype(np.float16)


def _planted(n_groups: int, n_single: int, dim: int, seed: int, noise: float = 0.15):
    """float16 unit rows: groups of 2..6 near duplicates (base + noise of norm ~``noise``,
    pair cosine ~1/(1+noise^2) = 0.978) and random distinct rows. Returns (emb, group id or -1)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 7, size=n_groups)
    bases = _unit(rng.standard_normal((n_groups, dim)))
    gid = np.concatenate([np.repeat(np.arange(n_groups), sizes), np.full(n_single, -1)])
    perm = rng.permutation(len(gid))
    gid = gid[perm]
    x = rng.standard_normal((len(gid), dim))
    dup = gid >= 0
    x[dup] = bases[gid[dup]] + noise * x[dup] / math.sqrt(dim)
    return _unit(x).astype(np.float16), gid


def _table(keys, emb, sha=None, score=None, status=None, extra=None) -> pa.Table:
    n = len(keys)
    d = emb.shape[1]
    flat = pa.array(np.asarray(emb, dtype=np.float16).reshape(-1), pa.float16())
    col = pa.FixedSizeListArray.from_arrays(flat, d)
    cols = {
        "key": pa.array(keys, pa.string()),
        "status": pa.array(status or ["ok"] * n, pa.string()),
        "sha256": pa.array(sha if sha is not None else [f"h{k}" for k in keys], pa.string()),
        "clip_score": pa.array(score if score is not None else [0.3] * n, pa.float32()),
        "image_embedding": col,
    }
    cols.update(extra or {})
    return pa.table(cols)


def _result(t: pa.Table) -> dict[str, tuple]:
    return {
        k: (d, s, kind)
        for k, d, s, kind in zip(
            t["key"].to_pylist(),
            t["duplicate_of"].to_pylist(),
            t["dup_group_size"].to_pylist(),
            t["dup_kind"].to_pylist(),
            strict=True,
        )
    }


# ---------------------------------------------------------------------- building blocks


def test_exact_groups_points_at_first_row_with_same_hash():
    got = exact_groups(["a", None, "b", "a", "b", "c", None, "a"])
    assert got.dtype == np.int64
    assert got.tolist() == [0, -1, 2, 0, 2, 5, -1, 0]


def test_semantic_pairs_hand_worked_angles():
    # cos(10 deg) = 0.985 >= 0.95, cos(20 deg) = 0.940 < 0.95, cos(80 deg) = 0.17
    emb = _angles(0, 10, 20, 100)
    pairs = semantic_pairs(emb, threshold=0.95)
    assert list(zip(pairs.i.tolist(), pairs.j.tolist(), strict=True)) == [(0, 1), (1, 2)]
    np.testing.assert_allclose(pairs.sim, [math.cos(math.radians(10))] * 2, rtol=1e-6)
    # Lowering the threshold below cos(20 deg) adds the (0, 2) pair and nothing else.
    lower = semantic_pairs(emb, threshold=0.93)
    assert set(zip(lower.i.tolist(), lower.j.tolist(), strict=True)) == {(0, 1), (1, 2), (0, 2)}


def test_semantic_pairs_against_other_matrix():
    emb = _angles(0, 45, 90)
    other = _angles(44, 200, 1)
    pairs = semantic_pairs(emb, threshold=0.99, other=other)
    assert list(zip(pairs.i.tolist(), pairs.j.tolist(), strict=True)) == [(0, 2), (1, 0)]


def test_second_cluster_rescues_a_pair_split_by_the_boundary():
    cent = _angles(0, 90)
    # 44 and 46 degrees sit either side of the 45-degree boundary: cos to the two centroids
    # differ by 2*sin(1 deg)*sin(45 deg) = 0.0247, and the pair's own cosine is cos(2 deg).
    emb = _angles(44, 46, 5, 85)
    p, s = assign_clusters(emb, cent, second_cluster_margin=0.0)
    assert p.tolist() == [0, 1, 0, 1] and s.tolist() == [-1, -1, -1, -1]
    missed = pairs_within_clusters(emb, cluster_members(p, s, 2), threshold=0.99)
    assert len(missed) == 0

    p, s = assign_clusters(emb, cent, second_cluster_margin=0.03)
    assert s.tolist() == [1, 0, -1, -1]  # only the two boundary rows get a second cluster
    found = pairs_within_clusters(emb, cluster_members(p, s, 2), threshold=0.99)
    # Found from both clusters, reported once.
    assert list(zip(found.i.tolist(), found.j.tolist(), strict=True)) == [(0, 1)]

    p, s = assign_clusters(emb, cent, second_cluster_margin=0.02)  # margin just too small
    assert s.tolist() == [-1, -1, -1, -1]


def test_one_cluster_is_exact_brute_force():
    emb, _ = _planted(60, 400, 32, seed=3, noise=0.3)  # noise 0.3 puts many pairs near 0.92
    got = semantic_pairs(emb, threshold=0.92, n_clusters=1)
    assert set(zip(got.i.tolist(), got.j.tolist(), strict=True)) == _brute_pairs(emb, 0.92)


def test_clustered_search_recall_against_brute_force():
    emb = _topical(8000, 48, topics=8, seed=5)
    truth = _brute_pairs(emb, 0.95)
    assert len(truth) > 1500
    got = semantic_pairs(emb, threshold=0.95, n_clusters=64, sample_size=4000)
    found = set(zip(got.i.tolist(), got.j.tolist(), strict=True))
    assert found <= truth  # every reported pair really is that similar
    recall = len(found) / len(truth)
    assert recall >= 0.98, recall
    # Without the second cluster, pairs split by a boundary are lost: the margin does real work.
    base = semantic_pairs(
        emb, threshold=0.95, n_clusters=64, sample_size=4000, second_cluster_margin=0.0
    )
    assert len(base) / len(truth) < recall - 0.03


# -------------------------------------------------------------------------- keeper rule


def _oracle(emb, members, threshold, order, confirm=None, skip=None):
    """choose_keepers over every pair (the graph keep_greedily must reproduce)."""
    p = pairs_within_clusters(emb, members, threshold)
    i, j = p.i, p.j
    live = np.ones(len(i), dtype=bool)
    if confirm is not None:
        live &= np.array([confirm(a, b) for a, b in zip(i.tolist(), j.tolist(), strict=True)], dtype=bool)
    if skip is not None:
        live &= ~(skip[i] | skip[j])
    return choose_keepers(len(emb), i[live], j[live], order)


@pytest.mark.parametrize("limit", [1, 2, 16])
@pytest.mark.parametrize("with_confirm", [False, True])
def test_keep_greedily_equals_choose_keepers_over_all_pairs(limit: int, with_confirm: bool):
    # Topical data (rows in two clusters near boundaries), chains straddling the threshold; a
    # tiny limit forces the "all listed neighbours were dropped" fallback.
    emb = _topical(1500, 24, 5, seed=3)
    members = semantic_clusters(emb, n_clusters=6, second_cluster_margin=0.1, seed=1)
    assert sum(len(m) for m in members) > len(emb)  # some rows are in two clusters
    rng = np.random.default_rng(4)
    order = priority_order(rng.random(len(emb)), [f"{i:05d}" for i in range(len(emb))])
    confirm = (lambda a, b: (a + b) % 5 != 0) if with_confirm else None
    batch = (lambda a, bs: np.array([confirm(a, b) for b in bs.tolist()], dtype=bool)) if with_confirm else None
    skip = rng.random(len(emb)) < 0.02
    for sk in (None, skip):
        got = keep_greedily(emb, members, 0.95, order, batch, skip=sk, limit=limit)
        assert np.array_equal(got, _oracle(emb, members, 0.95, order, confirm, sk))
    assert (got >= 0).sum() > 50  # there was something to decide


@pytest.mark.parametrize("world", ["topical, most pairs copies", "one look-alike group, few copies"])
def test_answers_asked_ahead_change_nothing_and_save_calls(world: str):
    """keep_greedily with ``ahead`` decides exactly as without it; a confirm that remembers
    the answers it gave ahead is then asked about few listed rows of its own (the fallback's
    questions, about unlisted kept rows, are not guessed), and every pair ``ahead`` names is
    one of an eligible row and one of its listed earlier neighbours. The look-alike group is
    the bundled model on the synthetic world: rows list many look-alikes, few of them
    copies, so most rows go through all their listed rows."""
    rng = np.random.default_rng(4)
    if world.startswith("topical"):
        emb = _topical(1500, 24, 5, seed=3)
        members = semantic_clusters(emb, n_clusters=6, second_cluster_margin=0.1, seed=1)
        order = priority_order(rng.random(len(emb)), [f"{i:05d}" for i in range(len(emb))])
    else:
        emb, members, order = _one_blob(600, 0.05, seed=2)
    rank = np.empty(len(emb), dtype=np.int64)
    rank[order] = np.arange(len(emb))
    skip = rng.random(len(emb)) < 0.02

    def truth(a, b):
        return (a * 7 + b) % 3 != 0 if world.startswith("topical") else (a * 7 + b) % 11 == 0

    for limit in (2, 16):
        start, nbr, overflow = earlier_neighbours(emb, members, 0.95, rank, limit)
        plain = keep_greedily(emb, members, 0.95, order, lambda a, bs: np.array([truth(a, b) for b in bs.tolist()]),
                              skip=skip, limit=limit)  # fmt: skip
        known: dict[tuple[int, int], bool] = {}
        fresh: list[tuple[int, int]] = []
        asked: list[tuple[int, int]] = []

        def ahead(pi, pj, known=known):
            pairs = list(zip(pi.tolist(), pj.tolist(), strict=True))
            assert all(rank[b] < rank[a] and not skip[a] and not skip[b] for a, b in pairs)
            for pair in pairs:
                known[pair] = truth(*pair)
            return np.array([known[pair] for pair in pairs], dtype=bool)

        def confirm(a, bs, known=known, asked=asked, fresh=fresh):
            pairs = [(a, b) for b in bs.tolist()]
            asked.extend(pairs)
            fresh.extend(p for p in pairs if p not in known)
            return np.array([truth(*p) for p in pairs], dtype=bool)

        got = keep_greedily(emb, members, 0.95, order, confirm, skip=skip, limit=limit, ahead=ahead)
        assert np.array_equal(got, plain)
        assert (got >= 0).sum() > 50 and len(asked) > 200
        # The guesses answer nearly every question about listed rows (the fallback's are not
        # guessed): what is left are rows whose guessed keeper the loop dropped before. With
        # two guessed batches only, 1,202 of the look-alike group's 2,744 were left (258 now).
        def is_listed(pair: tuple[int, int], start=start, nbr=nbr) -> bool:
            return pair[1] in nbr[start[pair[0]] : start[pair[0] + 1]]

        listed_asked = [p for p in asked if is_listed(p)]
        listed_fresh = [p for p in fresh if is_listed(p)]
        assert len(listed_asked) > 200
        assert len(listed_fresh) < 0.15 * len(listed_asked), (len(listed_fresh), len(listed_asked))


def _one_blob(n: int, noise: float, seed: int) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """``n`` float16 unit rows around one direction (all look alike), one cluster, rank = row."""
    rng = np.random.default_rng(seed)
    base = _unit(rng.standard_normal((1, 32)))
    emb = _unit(base + noise * rng.standard_normal((n, 32))).astype(np.float16)
    return emb, [np.arange(n, dtype=np.int64)], np.arange(n, dtype=np.int64)


def test_keep_greedily_on_many_copies_lists_few_pairs_and_checks_few():
    # 3,000 near copies of one picture: all pairs would be 4.5 million; each row lists at most
    # `limit` earlier neighbours and the check is asked about one pair per dropped copy.
    emb, members, order = _one_blob(3000, 0.02, seed=0)
    rank = order.copy()
    start, nbr, overflow = earlier_neighbours(emb, members, 0.95, rank, 4)
    assert len(nbr) <= 4 * 3000 and overflow[5:].all() and not overflow[:5].any()
    calls = []

    def confirm(a, bs):
        calls.extend((a, b) for b in bs.tolist())
        return np.ones(len(bs), dtype=bool)

    got = keep_greedily(emb, members, 0.95, order, confirm, limit=4)
    assert got[0] == -1 and (got[1:] == 0).all()
    assert len(calls) == 2999


def test_keep_greedily_checks_look_alikes_in_few_batches():
    # 400 rows that all look alike to the embedding but no pair is a copy: row r (rank order)
    # has r kept candidates; they are asked in growing batches (at most 256), so each row costs
    # a handful of calls (one per candidate would be ~80,000) and every row is kept.
    emb, members, order = _one_blob(400, 0.01, seed=1)
    sizes = []

    def confirm(a, bs):
        sizes.append(len(bs))
        assert (bs < a).all() and np.array_equal(bs, np.sort(bs))  # kept, earlier, rank order
        return np.zeros(len(bs), dtype=bool)

    got = keep_greedily(emb, members, 0.95, order, confirm, limit=4)
    assert (got == -1).all()
    assert sum(sizes) == 399 * 400 // 2  # every (row, earlier row) pair asked exactly once
    assert len(sizes) < 400 * 7 and max(sizes) == 256


def test_chain_keeps_both_ends_when_they_differ():
    # A ~ B ~ C but A !~ C (angles 0, 10, 20 at threshold 0.95).
    emb = _angles(0, 10, 20)
    out = dedup_table(_table(["A", "B", "C"], emb, score=[0.9, 0.5, 0.1]), DedupConfig())
    assert out["duplicate_of"].to_pylist() == [None, "A", None]
    assert out["dup_kind"].to_pylist() == [None, "semantic", None]
    assert out["dup_group_size"].to_pylist() == [2, 2, 1]
    # With B best, B absorbs both ends.
    out = dedup_table(_table(["A", "B", "C"], emb, score=[0.5, 0.9, 0.1]), DedupConfig())
    assert out["duplicate_of"].to_pylist() == ["B", None, "B"]
    assert out["dup_group_size"].to_pylist() == [3, 3, 3]


def test_priority_is_clip_score_then_smallest_key():
    order = priority_order(np.array([0.2, np.nan, 0.9, 0.2]), ["d", "a", "c", "b"])
    assert order.tolist() == [2, 3, 0, 1]


@settings(max_examples=60, deadline=None)
@given(
    st.integers(min_value=1, max_value=25).flatmap(
        lambda n: st.tuples(
            st.just(n),
            st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=60),
            st.permutations(list(range(n))),
        )
    )
)
def test_choose_keepers_guarantees(case):
    n, edges, order = case
    edges = [(a, b) for a, b in edges if a != b]
    i = np.array([a for a, _ in edges], dtype=np.int64)
    j = np.array([b for _, b in edges], dtype=np.int64)
    got = choose_keepers(n, i, j, np.array(order, dtype=np.int64))
    adj = {(a, b) for a, b in edges} | {(b, a) for a, b in edges}
    kept = {r for r in range(n) if got[r] < 0}
    rank = {r: p for p, r in enumerate(order)}
    assert not any((a, b) in adj for a in kept for b in kept)  # no two kept rows similar
    for r in range(n):
        if got[r] >= 0:
            k = int(got[r])
            assert k in kept and (r, k) in adj and rank[k] < rank[r]
            # ...and it is the best kept neighbour.
            assert all(rank[k] <= rank[o] for o in kept if (r, o) in adj)


# ------------------------------------------------------------------- table, planted truth


def test_planted_groups_precision_recall_and_no_cross_group_drop():
    emb, gid = _planted(250, 2500, 64, seed=11)
    n = len(gid)
    # Re-submit 200 rows byte for byte: same hash, same embedding.
    rng = np.random.default_rng(1)
    copies = rng.choice(n, size=200, replace=False)
    emb_all = np.concatenate([emb, emb[copies]])
    keys = [f"r{r:05d}" for r in range(n)] + [f"c{r:05d}" for r in range(200)]
    sha = [f"sha-{r}" for r in range(n)] + [f"sha-{r}" for r in copies]
    origin = np.concatenate([np.arange(n), copies])  # the item each row shows
    gid_all = gid[origin]
    score = rng.uniform(0.1, 0.4, size=len(keys)).tolist()
    out = dedup_table(
        _table(keys, emb_all, sha=sha, score=score),
        DedupConfig(n_clusters=16, sample_size=1500),
    )
    dup_of = out["duplicate_of"].to_pylist()
    kind = out["dup_kind"].to_pylist()
    index = {k: r for r, k in enumerate(keys)}

    # Exact: a row is an exact duplicate iff its hash repeats and it is not the group's keeper.
    exact_pred = {r for r in range(len(keys)) if kind[r] == "exact"}
    # Of each original/copy pair the one with the lower priority (score, then key) is dropped.
    exact_true = {
        max(int(r), n + c, key=lambda x: (-score[x], keys[x])) for c, r in enumerate(copies)
    }
    tp = len(exact_pred & exact_true)
    assert (tp / len(exact_pred), tp / len(exact_true)) == (1.0, 1.0)
    for r in exact_pred:
        assert sha[index[dup_of[r]]] == sha[r]

    # Never across two different items: an exact duplicate names a row with the same bytes,
    # a semantic one a kept row of its own planted group.
    for r, d in enumerate(dup_of):
        if d is None:
            continue
        k = index[d]
        if kind[r] == "exact":
            assert origin[k] == origin[r]
        else:
            assert dup_of[k] is None and gid_all[k] >= 0 and gid_all[k] == gid_all[r]

    # Semantic: within each planted group exactly one item survives (pair cosines ~0.978).
    items_dropped = {int(origin[r]) for r in range(len(keys)) if kind[r] == "semantic"}
    should_drop = sum(int((gid == g).sum()) - 1 for g in range(250))
    true_dropped = items_dropped & {r for r in range(n) if gid[r] >= 0}
    recall = len(true_dropped) / should_drop
    precision = len(true_dropped) / len(items_dropped)
    assert recall >= 0.9 and precision >= 0.95, (recall, precision)
    # Distinct random items are all kept.
    assert all(dup_of[r] is None for r in range(n) if gid[r] < 0 and kind[r] != "exact")


def test_exact_keeper_is_best_score_then_smallest_key_and_failed_rows_untouched():
    rng = np.random.default_rng(0)
    emb = _unit(rng.standard_normal((6, 16))).astype(np.float16)
    emb[1] = emb[2] = emb[3] = emb[0]
    keys = ["k0", "k1", "k2", "k3", "k4", "k5"]
    sha = ["X", "X", "X", "X", None, "Y"]
    score = [0.2, 0.3, 0.3, None, 0.2, 0.2]  # a null clip_score ranks last
    status = ["ok", "ok", "ok", "ok", "ok", "http_404"]
    table = _table(keys, emb, sha=sha, score=score, status=status).set_column(
        4,
        "image_embedding",
        pa.FixedSizeListArray.from_arrays(
            pa.array(emb.reshape(-1), pa.float16()), 16, mask=pa.array([False] * 5 + [True])
        ),
    )
    res = _result(dedup_table(table, DedupConfig()))
    # k1 and k2 tie on score 0.3: the smaller key wins.
    assert res["k1"] == (None, 4, None)
    assert res["k0"] == ("k1", 4, "exact")
    assert res["k2"] == ("k1", 4, "exact")
    assert res["k3"] == ("k1", 4, "exact")
    assert res["k4"] == (None, 1, None)  # no hash, different embedding
    assert res["k5"] == (None, None, None)  # failed row: not considered


def test_exact_duplicate_of_a_semantically_dropped_row():
    emb = _angles(0, 0, 1, 50)
    keys = ["x1", "x2", "k", "other"]
    out = dedup_table(
        _table(keys, emb, sha=["X", "X", "K", "O"], score=[0.5, 0.4, 0.9, 0.1]),
        DedupConfig(threshold=0.99),
    )
    res = _result(out)
    assert res["k"] == (None, 3, None)
    assert res["x1"] == ("k", 3, "semantic")
    assert res["x2"] == ("x1", 3, "exact")  # same bytes as x1; x1 names the kept row
    assert res["other"] == (None, 1, None)


def test_other_columns_untouched_and_existing_dup_columns_replaced():
    emb = _angles(0, 1, 2, 90)
    table = _table(
        ["a", "b", "c", "d"],
        emb,
        score=[0.9, 0.8, 0.7, 0.6],
        extra={
            "keep": pa.array([True, True, False, True]),
            "drop_reason": pa.array([None, None, "unsafe", None], pa.string()),
            "duplicate_of": pa.array(["stale"] * 4, pa.string()),
        },
    )
    out = dedup_table(table, DedupConfig(threshold=0.99))
    assert out["duplicate_of"].to_pylist() == [None, "a", "a", None]
    assert out.column_names == table.column_names + ["dup_group_size", "dup_kind"]
    for name in table.column_names:
        if name != "duplicate_of":
            assert out[name].equals(table[name]), name


def test_result_does_not_depend_on_row_order():
    emb, _ = _planted(40, 300, 32, seed=2)
    keys = [f"k{r}" for r in range(len(emb))]
    score = np.random.default_rng(0).uniform(size=len(emb)).tolist()
    table = _table(keys, emb, score=score)
    perm = np.random.default_rng(1).permutation(len(emb))
    a = _result(dedup_table(table, DedupConfig()))
    b = _result(dedup_table(table.take(pa.array(perm)), DedupConfig()))
    assert a == b
    assert sum(v[2] == "semantic" for v in a.values()) > 50


# ------------------------------------------------------------------------- previous run


def test_dedup_against_previous_run_drops_resubmitted_items(tmp_path):
    emb, gid = _planted(30, 200, 32, seed=7)
    keys1 = [f"run1/{r}" for r in range(len(emb))]
    run1 = dedup_table(_table(keys1, emb, sha=[f"s{r}" for r in range(len(emb))]), DedupConfig())
    kept1 = [r for r, d in enumerate(run1["duplicate_of"].to_pylist()) if d is None]
    pq.write_table(run1, tmp_path / "part-00000.parquet")

    rng = np.random.default_rng(3)
    same = rng.choice(kept1, size=20, replace=False)  # byte-identical re-submissions
    near = rng.choice(kept1, size=20, replace=False)  # re-encoded: new hash, nearby embedding
    fresh, _ = _planted(0, 30, 32, seed=99)
    noisy = _unit(emb[near].astype(np.float64) + 0.01 * rng.standard_normal((20, 32)))
    emb2 = np.concatenate([emb[same], noisy.astype(np.float16), fresh])
    sha2 = [f"s{r}" for r in same] + [f"new{r}" for r in range(50)]
    keys2 = [f"run2/{r}" for r in range(len(emb2))]
    table2 = _table(keys2, emb2, sha=sha2)

    for previous in (run1, read_previous(str(tmp_path), StorageConfig())):
        res = dedup_table(table2, DedupConfig(), previous=previous)
        dup_of, kind = res["duplicate_of"].to_pylist(), res["dup_kind"].to_pylist()
        assert kind[:40] == ["previous_run"] * 40
        assert dup_of[:20] == [keys1[r] for r in same]
        assert dup_of[20:40] == [keys1[r] for r in near]
        assert dup_of[40:] == [None] * 30 and kind[40:] == [None] * 30


def test_previous_run_with_nothing_similar_drops_nothing():
    # No pair above the threshold with the earlier run (this once raised an IndexError).
    prev = _table(["p0"], _angles(0))
    res = dedup_table(_table(["n0", "n1"], _angles(40, 80)), DedupConfig(), previous=prev)
    assert res["duplicate_of"].to_pylist() == [None, None]
    assert res["dup_kind"].to_pylist() == [None, None]


def test_previous_run_rows_that_were_duplicates_are_not_targets():
    emb = _angles(0, 0.5, 60)
    prev = _table(["p0", "p1", "p2"], emb, extra={"duplicate_of": pa.array([None, "p0", None])})
    res = dedup_table(
        _table(["n0"], _angles(0.4), sha=["fresh"]), DedupConfig(threshold=0.9999), previous=prev
    )
    # n0 is closest to p1 (0.1 deg) but p1 was itself a duplicate; p0 (0.4 deg) is named.
    assert res["duplicate_of"].to_pylist() == ["p0"]


# --------------------------------------------------------------------------- bad input


def test_config_validation_names_the_field():
    for kwargs, field in (
        ({"threshold": 0.0}, "dedup.threshold"),
        ({"threshold": 1.5}, "dedup.threshold"),
        ({"n_clusters": 0}, "dedup.n_clusters"),
        ({"second_cluster_margin": -0.1}, "dedup.second_cluster_margin"),
        ({"sample_size": 0}, "dedup.sample_size"),
        ({"against": ""}, "dedup.against"),
    ):
        with pytest.raises(ConfigError, match=field):
            DedupConfig(**kwargs).validate()
    DedupConfig(n_clusters=5, against="s3://bucket/run").validate()


def test_bad_tables_get_clear_errors():
    emb = _angles(0, 1)
    with pytest.raises(ValueError, match="clip_score"):
        dedup_table(_table(["a", "b"], emb).drop_columns(["clip_score"]), DedupConfig())
    bad = _table(["a", "b"], emb).set_column(4, "image_embedding", pa.array(["x", "y"]))
    with pytest.raises(ValueError, match="image_embedding must be a list"):
        dedup_table(bad, DedupConfig())
    prev = _table(["p"], _angles(0, 1, 2).reshape(1, 6)[:, :3].astype(np.float16))
    with pytest.raises(ValueError, match="dimension 3"):
        dedup_table(_table(["a", "b"], emb), DedupConfig(), previous=prev)


def test_zero_and_nan_embeddings_fall_back_to_hash_dedup():
    emb = np.array([[0, 0], [0, 0], [np.nan, 1], [1, 0]], dtype=np.float16)
    out = dedup_table(_table(["a", "b", "c", "d"], emb, sha=["Z", "Z", "N", "D"]), DedupConfig())
    assert out["duplicate_of"].to_pylist() == [None, "a", None, None]
    assert out["dup_kind"].to_pylist() == [None, "exact", None, None]


def test_empty_and_single_row_tables():
    empty = _table([], np.zeros((0, 4), np.float16))
    out = dedup_table(empty, DedupConfig())
    assert out.num_rows == 0 and "duplicate_of" in out.column_names
    one = dedup_table(_table(["a"], _angles(0)), DedupConfig())
    assert _result(one) == {"a": (None, 1, None)}
