"""Reference implementations that dedup's product code is checked against (tests and
bench/dedup.py), not used by the job.

:func:`choose_keepers` runs the greedy keep rule of :mod:`pipeline.dedup` over an explicit
list of every similar pair: simple enough to trust, but it needs all pairs in memory (m^2 / 2
for m near copies of one picture). :func:`pipeline.dedup.keep_greedily` must give the same
answer without listing them.
"""

from __future__ import annotations

import numpy as np


def choose_keepers(
    n: int, pairs_i: np.ndarray, pairs_j: np.ndarray, order: np.ndarray
) -> np.ndarray:
    """Greedy keep in priority order over an undirected similarity graph.

    ``n`` rows; ``pairs_i``/``pairs_j``: int64 [E] edges; ``order``: int64 [N] row indices best
    first (see :func:`pipeline.dedup.priority_order`). Returns int64 [N]: -1 for a kept row,
    else the index of the best kept row it has an edge to. A row is kept iff no earlier-kept row is adjacent to
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
