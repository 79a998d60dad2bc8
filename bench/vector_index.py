"""Similarity takedown: which vector index answers "every row within cosine T of this image"?

Data: ``--n`` unit vectors of ``--dim`` dimensions (float32), random, plus ``--queries`` planted
groups: each query vector gets ``--per-query`` neighbours at cosines spread over
[T - 0.04, 0.999] (a near copy sits close to its original; random vectors in 512-d sit near
cosine 0 +- 0.045). Ground truth: exact range search (brute force, float32 inner products).

Candidates, each with its build time, memory and per-query latency (one query at a time, as
``jobs/takedown.py --like`` asks), recall of the rows with cosine >= T:

* faiss ``IndexIVFFlat`` / ``IndexIVFScalarQuantizer`` (fp16), ``nlist`` cells, range search
  over ``nprobe`` cells;
* usearch HNSW (``metric=cos``, f16 storage), a k-nearest search with k = ``--k`` filtered at T
  (usearch has no range search);
* faiss ``IndexFlatIP`` range search: the brute-force reference itself, timed.

    .venv/bin/python bench/vector_index.py --n 1000000 --append bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import resource
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MACHINE = "2-core CI box, CPU, shared with other work"


def make_data(n: int, dim: int, queries: int, per_query: int, threshold: float, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[rng.choice(n, queries, replace=False)].copy()
    slots = rng.choice(n, queries * per_query, replace=False).reshape(queries, per_query)
    for i in range(queries):
        cos = rng.uniform(threshold - 0.04, 0.999, per_query).astype(np.float32)
        noise = rng.standard_normal((per_query, dim), dtype=np.float32)
        noise -= (noise @ q[i])[:, None] * q[i][None, :]
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        x[slots[i]] = cos[:, None] * q[i][None, :] + np.sqrt(1 - cos**2)[:, None] * noise
    return x, q


def truth(x: np.ndarray, q: np.ndarray, threshold: float) -> list[set[int]]:
    out = []
    for i in range(len(q)):
        sims = x @ q[i]
        out.append(set(np.flatnonzero(sims >= threshold).tolist()))
    return out


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_queries(fn, q: np.ndarray) -> tuple[list[set[int]], float]:
    found = []
    t0 = time.perf_counter()
    for i in range(len(q)):
        found.append(fn(q[i : i + 1]))
    return found, (time.perf_counter() - t0) / len(q)


def recall(found: list[set[int]], want: list[set[int]]) -> float:
    hit = sum(len(f & w) for f, w in zip(found, want, strict=True))
    return hit / max(1, sum(len(w) for w in want))


def bench_faiss_ivf(x, q, threshold, nlist, nprobes, kind):
    import faiss

    dim = x.shape[1]
    t0 = time.perf_counter()
    quant = faiss.IndexFlatIP(dim)
    if kind == "flat":
        index = faiss.IndexIVFFlat(quant, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexIVFScalarQuantizer(quant, dim, nlist, faiss.ScalarQuantizer.QT_fp16,
                                              faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(1)
    index.train(x[rng.choice(len(x), min(len(x), 64 * nlist), replace=False)])
    index.add(x)
    build = time.perf_counter() - t0
    rows = []
    for nprobe in nprobes:
        index.nprobe = nprobe

        def search(v, index=index):
            _lims, _d, ids = index.range_search(v, threshold - 1e-6)
            return set(ids.tolist())

        found, per_q = timed_queries(search, q)
        rows.append((f"faiss IVF{nlist},{'Flat' if kind == 'flat' else 'SQfp16'} nprobe={nprobe}", build, per_q, found))
    del index
    return rows


def bench_faiss_flat(x, q, threshold):
    import faiss

    t0 = time.perf_counter()
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    build = time.perf_counter() - t0

    def search(v):
        _lims, _d, ids = index.range_search(v, threshold - 1e-6)
        return set(ids.tolist())

    found, per_q = timed_queries(search, q)
    return [("faiss IndexFlatIP (brute force)", build, per_q, found)]


def bench_usearch(x, q, threshold, k, threads):
    from usearch.index import Index

    t0 = time.perf_counter()
    index = Index(ndim=x.shape[1], metric="cos", dtype="f16")
    index.add(np.arange(len(x)), x, threads=threads)
    build = time.perf_counter() - t0

    def search(v):
        m = index.search(v[0], k)
        keep = m.distances <= (1 - threshold) + 1e-6
        return set(m.keys[keep].tolist())

    found, per_q = timed_queries(search, q)
    return [(f"usearch HNSW f16 k={k}", build, per_q, found)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=20)
    p.add_argument("--per-query", type=int, default=50)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--nprobe", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--skip", nargs="*", default=[], help="candidates to skip: ivf sq usearch flat")
    p.add_argument("--append", help="append the table to this Markdown file")
    a = p.parse_args(argv)
    threads = os.cpu_count() or 1
    t0 = time.perf_counter()
    x, q = make_data(a.n, a.dim, a.queries, a.per_query, a.threshold, 0)
    want = truth(x, q, a.threshold)
    print(f"data {a.n} x {a.dim} in {time.perf_counter() - t0:.1f} s; {sum(map(len, want))} true matches", flush=True)
    rows = []
    if "flat" not in a.skip:
        rows += bench_faiss_flat(x, q, a.threshold)
        print(rows[-1][:3], flush=True)
    if "ivf" not in a.skip:
        rows += bench_faiss_ivf(x, q, a.threshold, a.nlist, a.nprobe, "flat")
        print([r[:3] for r in rows[-len(a.nprobe):]], flush=True)
    if "sq" not in a.skip:
        rows += bench_faiss_ivf(x, q, a.threshold, a.nlist, a.nprobe, "sq")
        print([r[:3] for r in rows[-len(a.nprobe):]], flush=True)
    if "usearch" not in a.skip:
        rows += bench_usearch(x, q, a.threshold, a.k, threads)
        print(rows[-1][:3], flush=True)
    lines = [
        f"### Similarity-takedown index, {a.n:,} x {a.dim} ({dt.date.today()}, {MACHINE})",
        "",
        f"`{' '.join(shlex.quote(s) for s in ['.venv/bin/python', 'bench/vector_index.py', *(argv if argv is not None else sys.argv[1:])])}`",
        "",
        f"{a.queries} queries, each with {a.per_query} planted neighbours at cosine {a.threshold - 0.04:.2f}-0.999; "
        f"recall of all rows with cosine >= {a.threshold} (brute-force truth: {sum(map(len, want))} rows). "
        f"Peak RSS of the whole run {rss_mb():,.0f} MB.",
        "",
        "| index | build s | ms per query | recall |",
        "|---|---:|---:|---:|",
    ]
    for name, build, per_q, found in rows:
        lines.append(f"| {name} | {build:.1f} | {per_q * 1e3:.2f} | {recall(found, want):.4f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.append:
        with open(a.append, "a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
