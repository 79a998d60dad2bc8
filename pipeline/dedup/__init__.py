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
with the kept rows of its clusters. The result equals the same greedy rule run over a list of
all pairs (testkit/dedup_reference.py; tested, and checked by bench/dedup.py).
:func:`semantic_pairs` still lists pairs where they are the answer (an earlier run's rows;
the benchmark's recall).

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

Modules: :mod:`.clusters` (spherical k-means and cluster membership), :mod:`.pairs` (listing
similar pairs within clusters), :mod:`.keepers` (hash groups, priority, the greedy keeper),
:mod:`.table` (Arrow in and out: :func:`dedup_table`).
"""

from pipeline.dedup.clusters import (
    AUTO_SINGLE_CLUSTER_MAX,
    assign_clusters,
    auto_n_clusters,
    cluster_members,
    fit_centroids,
    semantic_clusters,
)
from pipeline.dedup.keepers import (
    earlier_neighbours,
    exact_groups,
    hash_representatives,
    keep_greedily,
    priority_order,
)
from pipeline.dedup.pairs import Pairs, pairs_within_clusters, semantic_pairs
from pipeline.dedup.table import dedup_table

__all__ = [
    "AUTO_SINGLE_CLUSTER_MAX",
    "Pairs",
    "assign_clusters",
    "auto_n_clusters",
    "cluster_members",
    "dedup_table",
    "earlier_neighbours",
    "exact_groups",
    "fit_centroids",
    "hash_representatives",
    "keep_greedily",
    "pairs_within_clusters",
    "priority_order",
    "semantic_clusters",
    "semantic_pairs",
]
