"""The similarity-takedown index (pipeline/similar.py) against brute-force numpy range search."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from pipeline.similar import EXACT_BELOW, Match, VectorIndex, write_review


def _data(n: int, dim: int, queries: int, per_query: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[:queries].copy()
    for i in range(queries):
        slots = rng.choice(np.arange(queries, n), per_query, replace=False)
        cos = rng.uniform(0.8, 0.999, per_query)
        noise = rng.standard_normal((per_query, dim))
        noise -= (noise @ q[i])[:, None] * q[i][None, :]
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        x[slots] = (cos[:, None] * q[i][None, :] + np.sqrt(1 - cos**2)[:, None] * noise).astype(np.float32)
    return x, q


def _brute(x: np.ndarray, q: np.ndarray, t: float) -> list[set[int]]:
    sims = x.astype(np.float64) @ q.astype(np.float64).T
    return [set(np.flatnonzero(sims[:, k] >= t).tolist()) for k in range(len(q))]


def test_exact_index_equals_brute_force() -> None:
    x, q = _data(3000, 24, 5, 30)
    index = VectorIndex(x)
    assert index.kind.startswith("IndexFlatIP")
    got = index.within(q, 0.9)
    want = _brute(x, q, 0.9)
    for k, ((ids, sims), w) in enumerate(zip(got, want, strict=True)):
        assert set(ids.tolist()) == w
        assert np.all(np.diff(sims) <= 1e-6)  # most similar first
        assert np.allclose(sims, x[ids].astype(np.float64) @ q[k].astype(np.float64), atol=1e-5)


def test_ivf_index_recall_against_brute_force() -> None:
    x, q = _data(EXACT_BELOW + 10_000, 32, 10, 40, seed=3)
    index = VectorIndex(x)
    assert index.kind.startswith("IVF")
    want = _brute(x, q, 0.85)
    got = [set(ids.tolist()) for ids, _ in index.within(q, 0.85)]
    found = sum(len(g & w) for g, w in zip(got, want, strict=True))
    assert found / sum(map(len, want)) >= 0.95
    assert all(g <= w for g, w in zip(got, want, strict=True))  # nothing below the threshold


def test_review_page_escapes_what_it_shows(tmp_path) -> None:
    m = Match("000000001", None, "http://x.example/<a>", "<script>alert(1)</script>", 0.97, "q.jpg", True)
    pq_path, html_path = write_review([m], {"threshold": 0.9, "pixel_check": True, "index": "exact", "rows": 1},
                                      str(tmp_path / "out"), str(tmp_path / "review"))
    page = open(html_path, encoding="utf-8").read()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert pq.read_table(pq_path).to_pylist()[0]["key"] == "000000001"
