"""Neighbour batches: contrastive batches made of groups of rows the model itself finds alike.

With web-like captions of random scenes, a batch of 64 almost never holds two pairs that only a
fine attribute (an object's shape, say) tells apart: colour, background and layout already
separate them, so the symmetric loss never asks for that attribute and the towers never learn
it (bench/RESULTS.md, "Curation pays off downstream"). Hard-negative batches fix that without
labels: every ``pool`` steps the model embeds the images of the next ``pool`` batches of the
ordinary stream and regroups those same rows into batches of ``group``-row neighbourhoods
(an anchor and its nearest unassigned neighbours by cosine), so each batch holds several
near-alike pairs whose captions the model must tell apart.

The rows are the stream's own: each pool is a permutation of the rows the ordinary batches of
those steps would have held, so every row is still seen once per epoch and the curation's
weighting of the data is unchanged; only which rows share a batch changes.

A data provider that supports this offers, besides ``batch(step)``:

- ``pool(first_step, steps) -> (pixels, tokens, rows)``: the rows of the ordinary batches
  ``first_step .. first_step + steps - 1`` in stream order: pixels uint8 [n, S, S, 3] (the
  model's preprocessing, before normalisation), tokens int64 [n, L], rows: n row ids (equal
  ids are the same pair, which can occur once a pool spans an epoch boundary);
- ``normalize(pixels) -> float32 [n, 3, S, S]``: the model's input.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn


class PoolSource(Protocol):
    def pool(self, first_step: int, steps: int) -> tuple[np.ndarray, torch.Tensor, Sequence[int]]: ...

    def normalize(self, pixels: np.ndarray) -> torch.Tensor: ...


def group_into_batches(
    features: np.ndarray, rows: Sequence[int], batch_size: int, group: int
) -> list[list[int]]:
    """Partition a pool into batches of neighbour groups.

    features: float [n, D], unit L2 norm (cosine = dot product); n a multiple of batch_size.
    rows: n row ids; a batch takes a row id at most once while any other candidate is left.
    Returns n // batch_size lists of batch_size pool indices, every index exactly once.

    Greedy and deterministic: the first unassigned index (in pool order, which is the stream's
    shuffled order) is an anchor; it takes its ``group - 1`` most similar unassigned indices
    (ties: earlier index first); groups fill a batch until it is full (the last group of a batch
    may be smaller).
    """
    n = len(features)
    if n % batch_size or len(rows) != n:
        raise ValueError(f"pool of {n} features, {len(rows)} row ids: need a multiple of batch_size {batch_size}")
    if not 1 <= group <= batch_size:
        raise ValueError(f"group {group} must be between 1 and batch_size {batch_size}")
    feats = np.asarray(features, dtype=np.float64)
    row_ids = np.asarray(rows)
    free = np.ones(n, dtype=bool)
    batches: list[list[int]] = []
    for _ in range(n // batch_size):
        batch: list[int] = []
        while len(batch) < batch_size:
            taken = np.isin(row_ids, row_ids[batch]) if batch else np.zeros(n, dtype=bool)
            candidates = np.flatnonzero(free & ~taken)
            if candidates.size == 0:
                # Only copies of rows already in this batch are left (a pool that spans an
                # epoch boundary); the ordinary stream pairs such copies too.
                candidates = np.flatnonzero(free)
            anchor = int(candidates[0])
            members = [anchor]
            want = min(group, batch_size - len(batch))
            if want > 1:
                rest = candidates[1:]
                order = rest[np.argsort(-(feats[rest] @ feats[anchor]), kind="stable")]
                seen, copies = {row_ids[anchor]}, []
                for j in order:
                    if row_ids[j] in seen:
                        copies.append(int(j))
                        continue
                    members.append(int(j))
                    seen.add(row_ids[j])
                    if len(members) == want:
                        break
                members += copies[: want - len(members)]
            free[members] = False
            batch += members
        batches.append(batch)
    return batches


def cosine_summary(feats: np.ndarray, groups: Sequence[Sequence[int]]) -> tuple[float, float]:
    """(mean over ``groups`` of the mean cosine between two different rows of a group, mean
    cosine over every ordered pair of the pool, the diagonal included) of unit rows ``feats``
    (float [n, D]); ``groups``: index lists (each of 2 or more rows). From sums of rows: the
    sum of a Gram matrix is the squared norm of the rows' sum, so no n x n matrix is made."""
    f = np.asarray(feats, dtype=np.float64)
    pool = float(np.square(f.mean(axis=0)).sum())
    within = []
    for b in groups:
        g = f[np.asarray(b)]
        k = len(g)
        total = float(np.square(g.sum(axis=0)).sum()) - float(np.square(g).sum())
        within.append(total / (k * (k - 1)))
    return float(np.mean(within)), pool


class NeighbourBatches:
    """``(step, model) -> (images, tokens)`` for the steps from ``start`` on: pools of ``pool``
    steps, regrouped by :func:`group_into_batches` on the model's image embeddings taken at the
    pool's first step (eval mode, no gradient)."""

    def __init__(
        self,
        source: PoolSource,
        *,
        batch_size: int,
        group: int,
        pool: int,
        start: int,
        steps: int,
        log: Callable[[str], None] | None = None,
    ) -> None:
        for name in ("pool", "normalize"):
            if not callable(getattr(source, name, None)):
                raise ValueError(
                    "neighbour batches need a data provider that can hand over a pool of rows "
                    f"(a {name}() method; a job output's reader has one), not {type(source).__name__}"
                )
        self.source, self.batch_size, self.group = source, batch_size, group
        self.pool, self.start, self.steps, self.log = pool, start, steps, log
        self._first: int | None = None
        self._groups: list[list[int]] = []
        self._pixels: np.ndarray | None = None
        self._tokens: torch.Tensor | None = None

    def pool_start(self, step: int) -> int:
        return self.start + (step - self.start) // self.pool * self.pool

    def state(self) -> dict[str, Any] | None:
        """What a checkpoint must hold to resume inside a pool: its first step and its
        grouping (the model that made it is gone by then)."""
        if self._first is None:
            return None
        return {"first": self._first, "groups": torch.tensor(self._groups, dtype=torch.int64)}

    def load_state(self, state: dict[str, Any] | None) -> None:
        if state is None:
            return
        self._first = int(state["first"])
        self._groups = state["groups"].tolist()
        self._pixels = None

    def _fetch(self, first: int) -> tuple[np.ndarray, torch.Tensor, Sequence[int]]:
        n_steps = min(self.pool, self.steps - first)
        pixels, tokens, rows = self.source.pool(first, n_steps)
        if len(pixels) != n_steps * self.batch_size:
            raise ValueError(f"pool({first}, {n_steps}) gave {len(pixels)} rows, expected {n_steps * self.batch_size}")
        return pixels, tokens, rows

    def _regroup(self, first: int, model: nn.Module) -> None:
        pixels, tokens, rows = self._fetch(first)
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        with torch.no_grad():
            feats = torch.cat([
                model.encode_image(self.source.normalize(pixels[i : i + 256]).to(device), normalize=True).float().cpu()
                for i in range(0, len(pixels), 256)
            ]).numpy()  # fmt: skip
        model.train(was_training)
        self._groups = group_into_batches(feats, rows, self.batch_size, self.group)
        self._first, self._pixels, self._tokens = first, pixels, tokens
        if self.log is not None:
            within, pool_mean = cosine_summary(feats, self._groups)
            self.log(
                f"neighbour pool at step {first + 1}: {len(pixels)} rows in {len(self._groups)} "
                f"batches, mean cosine within a batch {within:.3f} (pool {pool_mean:.3f})"
            )

    def __call__(self, step: int, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.pool_start(step)
        if self._first != first:
            self._regroup(first, model)
        elif self._pixels is None:  # resumed inside a pool: its rows again, its saved grouping
            self._pixels, self._tokens, _ = self._fetch(first)
        assert self._pixels is not None and self._tokens is not None
        idx = self._groups[step - first]
        return self.source.normalize(self._pixels[idx]), self._tokens[idx]
