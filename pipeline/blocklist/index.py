"""The in-memory lookup structures of the lists: :class:`DigestSet` (fixed-width digests
sorted for binary search, each with the list it came from) and :class:`PdqIndex` (PDQ hashes
with a multi-index of sixteen 16-bit chunks for Hamming-radius lookups). No per-entry Python
object: memory is the bytes per entry the package docstring gives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CHUNKS = 16  # PDQ multi-index: sixteen 16-bit chunks


def _popcount64(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    b = x.view(np.uint8)
    table = np.array([bin(i).count("1") for i in range(256)], np.uint8)
    return table[b].reshape(*x.shape, 8).sum(-1)


@dataclass
class DigestSet:
    """Fixed-width byte strings (one width), sorted for binary search, each with a list id."""

    width: int
    digests: np.ndarray  # dtype S<width>, sorted
    list_ids: np.ndarray  # uint16, the list each digest came from

    @classmethod
    def build(cls, width: int, parts: list[tuple[int, bytearray]]) -> DigestSet:
        """``parts``: (list id, concatenated raw digests of ``width`` bytes each)."""
        total = sum(len(b) // width for _, b in parts)
        buf = bytearray(total * width)
        ids = np.empty(total, np.uint16)
        at = 0
        for list_id, raw in parts:
            n = len(raw) // width
            buf[at * width : (at + n) * width] = raw
            ids[at : at + n] = list_id
            at += n
        digests = np.frombuffer(buf, dtype=f"S{width}")
        if total:
            # numpy's S dtype compares like memcmp on equal-width values, which is what the
            # binary search needs.
            order = np.argsort(digests, kind="stable")
            digests, ids = digests[order], ids[order]
        return cls(width, digests, ids)

    def __len__(self) -> int:
        return int(self.digests.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.digests.nbytes + self.list_ids.nbytes)

    def find(self, digest: bytes) -> int | None:
        """The list id of ``digest`` (exactly ``width`` bytes), or None."""
        n = len(self.digests)
        if not n:
            return None
        key = np.array(digest, dtype=f"S{self.width}")
        i = int(np.searchsorted(self.digests, key))
        if i < n and self.digests[i] == key:
            return int(self.list_ids[i])
        return None


@dataclass
class PdqIndex:
    """PDQ hashes with a multi-index for Hamming-radius lookups.

    ``hashes``: uint64 [N, 4] (the 256 bits, big-endian words); for each of 16 chunks c,
    ``order[c]`` lists entry ids sorted by their 16-bit chunk value and ``starts[c]`` [65537]
    where each value's run begins.
    """

    hashes: np.ndarray
    list_ids: np.ndarray
    order: np.ndarray  # uint32 [16, N]
    starts: np.ndarray  # int64 [16, 65537]

    @classmethod
    def build(cls, parts: list[tuple[int, bytearray]]) -> PdqIndex:
        raw = bytearray().join(b for _, b in parts)
        ids = np.concatenate([np.full(len(b) // 32, i, np.uint16) for i, b in parts]) if parts else np.zeros(0, np.uint16)
        as_bytes = np.frombuffer(raw, np.uint8).reshape(-1, 32)
        n = as_bytes.shape[0]
        chunks = as_bytes.view(">u2").astype(np.uint16)  # [N, 16]
        order = np.empty((CHUNKS, n), np.uint32)
        starts = np.empty((CHUNKS, 65537), np.int64)
        for c in range(CHUNKS):
            col = chunks[:, c]
            o = np.argsort(col, kind="stable").astype(np.uint32)
            order[c] = o
            starts[c] = np.searchsorted(col[o], np.arange(65537), side="left")
        hashes = as_bytes.view(">u8").astype(np.uint64)
        return cls(hashes, ids, order, starts)

    def __post_init__(self) -> None:
        # Flat views and per-chunk offsets, so a lookup is a handful of vectorised gathers.
        n = self.hashes.shape[0]
        self._starts_flat = self.starts.ravel()
        self._order_flat = self.order.ravel()
        self._row_base = (np.arange(CHUNKS, dtype=np.int64) * 65537)[:, None]
        self._order_base = np.arange(CHUNKS, dtype=np.int64) * n

    def __len__(self) -> int:
        return int(self.hashes.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.hashes.nbytes + self.list_ids.nbytes + self.order.nbytes + self.starts.nbytes)

    def nearest(self, pdq: bytes, threshold: int, masks: np.ndarray) -> tuple[int, int] | None:
        """(list id, distance) of the closest entry within ``threshold`` bits of the 32-byte
        hash ``pdq``, None when there is none. ``masks``: the chunk probes (all 16-bit values
        with at most ``threshold // 16`` bits set)."""
        n = len(self)
        if not n:
            return None
        q = np.frombuffer(pdq, np.uint8)
        q16 = q.view(">u2").astype(np.int64)  # [16]
        # Flat positions into starts [16 * 65537]: chunk c's probe values v at c * 65537 + v.
        flat = ((q16[:, None] ^ masks[None, :]) + self._row_base).ravel()
        lo = self._starts_flat[flat]
        lengths = self._starts_flat[flat + 1] - lo
        keep = lengths > 0
        lengths = lengths[keep]
        total = int(lengths.sum())
        if total == 0:
            return None
        base = lo[keep] + self._order_base[flat[keep] // 65537]
        # Positions base[k] .. base[k] + lengths[k] - 1 of the flattened order array; an entry
        # found through several chunks is simply scored more than once.
        ends = np.cumsum(lengths)
        offsets = np.repeat(base - (ends - lengths), lengths)
        cand = self._order_flat[offsets + np.arange(total)]
        qw = q.view(">u8").astype(np.uint64)
        dist = _popcount64(self.hashes[cand] ^ qw).sum(axis=1)
        best = int(np.argmin(dist))
        if int(dist[best]) > threshold:
            return None
        return int(self.list_ids[cand[best]]), int(dist[best])


def chunk_masks(threshold: int) -> np.ndarray:
    """All 16-bit values with at most ``threshold // 16`` bits set (the probes per chunk)."""
    radius = threshold // CHUNKS
    values = np.arange(65536, dtype=np.int64)
    return values[_popcount64(values.astype(np.uint64)) <= radius]
