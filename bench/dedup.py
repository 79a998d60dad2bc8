"""Semantic dedup at scale: recall and cost of pipeline.dedup's clustered search.

Generates N unit embeddings in float16 around random topic centres (the "random-cluster" data:
CLIP embeddings are clustered too), with a fraction of the rows in planted near-duplicate groups
whose pairwise cosines straddle the threshold. Runs the same steps ``semantic_pairs`` runs
(k-means on a sample, assignment, compare within clusters), once per second-cluster margin,
then measures recall and precision against exact brute force for a random sample of query
rows: every row j with cos(q, j) >= threshold, decided in float64 from the stored float16
vectors. Peak RSS is the process's maximum resident set so far, read after each phase.

    .venv/bin/python bench/dedup.py --n 1000000 --dim 512 --append bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import resource
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # testkit is not installed
from pipeline.dedup import (  # noqa: E402
    assign_clusters,
    auto_n_clusters,
    cluster_members,
    fit_centroids,
    keep_greedily,
    pairs_within_clusters,
)
from testkit.dedup_reference import choose_keepers  # noqa: E402

MACHINE = "2-core CI box, CPU, shared with other work"


def peak_rss_gib() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def generate(
    n: int, dim: int, topics: int, dup_fraction: float, seed: int, chunk: int = 16_384
) -> tuple[np.ndarray, np.ndarray]:
    """float16 [n, dim] unit rows and int64 [n] planted group id (-1 for singletons).

    Topic spread 1.0 puts same-topic rows at cosine ~0.5; with fewer topics than clusters,
    k-means has to cut through dense regions, which is where boundary pairs are lost. A group
    member is its base plus noise of norm e ~ U(0.05, 0.3), so two members have cosine
    ~1/sqrt((1+e1^2)(1+e2^2)) in [0.92, 0.997]: some planted pairs fall below a 0.95
    threshold, as real near-duplicates do. Built in chunks so that only the float16 output is
    of size n x dim.
    """
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((topics, dim), dtype=np.float32))
    n_groups = int(n * dup_fraction / 3)
    sizes = rng.integers(2, 5, size=n_groups)  # 2..4 members, mean 3
    sizes = sizes[np.cumsum(sizes) <= n]
    n_groups = len(sizes)
    group_of = np.full(n, -1, dtype=np.int64)
    slots = rng.permutation(n)[: int(sizes.sum())]
    group_of[slots] = np.repeat(np.arange(n_groups), sizes)
    group_topic = rng.integers(0, topics, size=n_groups)
    bases = np.empty((n_groups, dim), dtype=np.float16)
    for s in range(0, n_groups, chunk):
        t = group_topic[s : s + chunk]
        g = rng.standard_normal((len(t), dim), dtype=np.float32) / np.sqrt(dim)
        bases[s : s + chunk] = _unit(centres[t] + g)
    row_topic = rng.integers(0, topics, size=n)
    out = np.empty((n, dim), dtype=np.float16)
    for s in range(0, n, chunk):
        g = group_of[s : s + chunk]
        noise = rng.standard_normal((len(g), dim), dtype=np.float32) / np.sqrt(dim)
        x = centres[row_topic[s : s + chunk]] + noise  # singletons
        dup = g >= 0
        e = rng.uniform(0.05, 0.3, size=int(dup.sum())).astype(np.float32)
        x[dup] = bases[g[dup]].astype(np.float32) + e[:, None] * noise[dup]
        out[s : s + chunk] = _unit(x)
    return out, group_of


def brute_force_truth(
    emb: np.ndarray, queries: np.ndarray, threshold: float, block: int = 16_384
) -> set[tuple[int, int]]:
    """All (min, max) pairs with a query row and cosine >= threshold, exactly: float32 blocked
    search with a 1e-3 slack, then each candidate re-decided in float64."""
    q32 = torch.from_numpy(emb[queries].astype(np.float32))
    q64 = emb[queries].astype(np.float64)
    truth: set[tuple[int, int]] = set()
    for s in range(0, emb.shape[0], block):
        sims = q32 @ torch.from_numpy(emb[s : s + block].astype(np.float32)).T
        r, c = torch.nonzero(sims >= threshold - 1e-3, as_tuple=True)
        r, c = r.numpy(), c.numpy() + s
        exact = np.einsum("ij,ij->i", q64[r], emb[c].astype(np.float64))
        keep = (exact >= threshold) & (queries[r] != c)
        for a, b in zip(queries[r][keep].tolist(), c[keep].tolist(), strict=True):
            truth.add((min(a, b), max(a, b)))
    return truth


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument(
        "--topics", type=int, default=100, help="fewer than clusters: k-means splits topics"
    )
    ap.add_argument(
        "--dup-fraction", type=float, default=0.3, help="rows in planted near-dup groups"
    )
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--n-clusters", type=int, default=None, help="default: auto (~sqrt(N))")
    ap.add_argument("--sample-size", type=int, default=100_000)
    ap.add_argument("--kmeans-iterations", type=int, default=10)
    ap.add_argument("--margins", type=float, nargs="+", default=[0.0, 0.05, 0.1])
    ap.add_argument("--queries", type=int, default=2000, help="rows checked against brute force")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--append", metavar="RESULTS_MD", help="append the table to this file")
    args = ap.parse_args(argv)

    phases: list[tuple[str, float, float]] = []

    def phase(name: str, t0: float) -> None:
        phases.append((name, time.perf_counter() - t0, peak_rss_gib()))
        print(f"{name:<28s} {phases[-1][1]:8.1f} s  peak RSS {phases[-1][2]:.2f} GiB", flush=True)

    t0 = time.perf_counter()
    emb, _ = generate(args.n, args.dim, args.topics, args.dup_fraction, args.seed)
    phase("generate (not dedup)", t0)

    k = args.n_clusters or auto_n_clusters(args.n)
    t0 = time.perf_counter()
    cent = fit_centroids(emb, k, args.sample_size, args.kmeans_iterations, args.seed)
    phase(f"k-means (sample {min(args.sample_size, args.n)})", t0)

    t0 = time.perf_counter()
    rng = np.random.default_rng(args.seed + 1)
    queries = np.sort(rng.choice(args.n, size=min(args.queries, args.n), replace=False))
    truth = brute_force_truth(emb, queries, args.threshold)
    phase(f"brute force ({len(queries)} queries)", t0)
    qset = set(queries.tolist())

    rows = []
    for margin in args.margins:
        t0 = time.perf_counter()
        p, s2 = assign_clusters(emb, cent, margin)
        members = cluster_members(p, s2, cent.shape[0])
        phase(f"assign (margin {margin:g})", t0)
        t_assign = phases[-1][1]
        t0 = time.perf_counter()
        pairs = pairs_within_clusters(emb, members, args.threshold)
        phase(f"compare (margin {margin:g})", t0)
        t_compare = phases[-1][1]
        t0 = time.perf_counter()
        order = np.random.default_rng(args.seed).permutation(args.n)
        via_pairs = choose_keepers(args.n, pairs.i, pairs.j, order)
        phase(f"keepers (margin {margin:g})", t0)
        t_keep = phases[-1][1]
        # What dedup_table runs: the same keepers without listing every pair.
        t0 = time.perf_counter()
        greedy = keep_greedily(emb, members, args.threshold, order)
        phase(f"keep_greedily (margin {margin:g})", t0)
        t_greedy = phases[-1][1]
        same = bool(np.array_equal(greedy, via_pairs))
        touch = np.isin(pairs.i, queries) | np.isin(pairs.j, queries)
        found = {(int(a), int(b)) for a, b in zip(pairs.i[touch], pairs.j[touch], strict=True)}
        found = {e for e in found if e[0] in qset or e[1] in qset}
        hit = len(found & truth)
        recall = hit / len(truth) if truth else float("nan")
        precision = hit / len(found) if found else float("nan")
        sizes = np.array([len(m) for m in members])
        rows.append(
            (
                margin,
                int(sizes.sum()),
                int(sizes.max()),
                t_assign,
                t_compare,
                t_keep,
                t_greedy,
                same,
                len(pairs),
                len(truth),
                recall,
                precision,
            )
        )
        print(f"margin {margin:g}: recall {recall:.4f} precision {precision:.4f}", flush=True)

    kmeans_s = phases[1][1]
    lines = [
        f"N={args.n:,}  D={args.dim}  clusters={cent.shape[0]}  threshold={args.threshold}  "
        f"topics={args.topics}  dup_fraction={args.dup_fraction}  storage=float16 "
        f"({emb.nbytes / 2**30:.2f} GiB)  torch threads={torch.get_num_threads()}",
        f"generate {phases[0][1]:.1f} s (not part of dedup); k-means on {min(args.sample_size, args.n):,} "
        f"rows x {args.kmeans_iterations} iterations: {kmeans_s:.1f} s; brute-force reference for "
        f"{len(queries):,} query rows: {phases[2][1]:.1f} s",
        "",
        "| margin | memberships | largest cluster | assign s | compare s | keepers s | dedup s (k-means+assign+compare+keepers) | keep_greedily s (replaces compare+keepers) | same keepers | pairs found | true pairs (sample) | recall | precision |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, mem, big, ta, tc, tk, tg, same, npairs, ntrue, rec, prec in rows:
        lines.append(
            f"| {m:g} | {mem:,} | {big:,} | {ta:.1f} | {tc:.1f} | {tk:.1f} | {kmeans_s + ta + tc + tk:.1f} | "
            f"{tg:.1f} | {same} | {npairs:,} | {ntrue:,} | {rec:.4f} | {prec:.4f} |"
        )
    lines.append("")
    lines.append(
        f"peak RSS (whole process, including generation and brute force): {peak_rss_gib():.2f} GiB"
    )
    table = "\n".join(lines)
    print()
    print(table)
    if args.append:
        cmd = ".venv/bin/python bench/dedup.py " + " ".join(
            shlex.quote(a) for a in (argv or sys.argv[1:])
        )
        with open(args.append, "a", encoding="utf-8") as f:
            f.write(
                f"\n## Semantic dedup at scale (bench/dedup.py)\n\n"
                f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {MACHINE}.\n\n"
                f"```\n{cmd}\n```\n\n{table}\n"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
