"""A job's lists ready for per-row checks: :class:`Blocklist` (check a URL, downloaded bytes,
a PDQ hash), :func:`load` (read and index every list of a config), and the per-process cache
the stages load through (:func:`get_blocklist`; :func:`validate` in the driver).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from pipeline.blocklist.files import FIELD, HASH_KINDS, KINDS, BlocklistError, read_list, sources
from pipeline.blocklist.index import DigestSet, PdqIndex, chunk_masks
from pipeline.blocklist.urls import host_suffixes, normalize_url, text_digest, url_host
from pipeline.config import BlocklistConfig, StorageConfig


class BlockMatch(NamedTuple):
    """Which list matched (``name``) and on what (``kind``: url, domain, md5, ... pdq)."""

    name: str
    kind: str

    def reason(self) -> str:
        """The row's error text."""
        return f"blocklist {self.name} ({self.kind} match)"


_WIDTH = {"url": 16, "domain": 16, "md5": 16, "sha1": 20, "sha256": 32}
_HASHERS = {"md5": hashlib.md5, "sha1": hashlib.sha1, "sha256": hashlib.sha256}


@dataclass
class Blocklist:
    """Every list of a job, ready for per-row checks (see the module docstring)."""

    names: list[str] = field(default_factory=list)
    sets: dict[str, DigestSet] = field(default_factory=dict)  # kind -> entries
    pdq: PdqIndex | None = None
    pdq_threshold: int = 31
    pdq_dihedral: bool = False
    counts: dict[tuple[str, str], int] = field(default_factory=dict)  # (kind, name) -> entries
    _masks: np.ndarray | None = field(default=None, repr=False)

    @property
    def empty(self) -> bool:
        return not any(len(s) for s in self.sets.values()) and not (self.pdq is not None and len(self.pdq))

    @property
    def nbytes(self) -> int:
        """Bytes held by the entries and indexes."""
        return sum(s.nbytes for s in self.sets.values()) + (self.pdq.nbytes if self.pdq is not None else 0)

    @property
    def has_pdq(self) -> bool:
        return self.pdq is not None and len(self.pdq) > 0

    def _find(self, kind: str, digest: bytes) -> BlockMatch | None:
        s = self.sets.get(kind)
        if s is None or not len(s):
            return None
        i = s.find(digest)
        return None if i is None else BlockMatch(self.names[i], kind)

    def check_url(self, url: str) -> BlockMatch | None:
        """The url or domain list that names ``url`` (or one of its parent domains)."""
        if not isinstance(url, str):
            return None
        hit = self._find("url", text_digest(normalize_url(url)))
        if hit is not None:
            return hit
        host = url_host(url)
        if host and "domain" in self.sets:
            for suffix in host_suffixes(host):
                hit = self._find("domain", text_digest(suffix))
                if hit is not None:
                    return hit
        return None

    def check_bytes(self, data: bytes, sha256: bytes | None = None) -> BlockMatch | None:
        """The md5, sha1 or sha256 list that names the downloaded ``data`` (``sha256``: its
        digest when already computed)."""
        for kind in HASH_KINDS:
            s = self.sets.get(kind)
            if s is None or not len(s):
                continue
            digest = sha256 if kind == "sha256" and sha256 is not None else _HASHERS[kind](data).digest()
            hit = self._find(kind, digest)
            if hit is not None:
                return hit
        return None

    def check_sha256(self, digest: bytes) -> BlockMatch | None:
        """The sha256 list that names a file of this digest (32 bytes) that is not at hand: the
        original download an img2dataset output recorded the hash of, then resized."""
        return self._find("sha256", digest)

    def check_pdq(self, pdq: bytes | str | None, dihedral: list[bytes] | None = None) -> BlockMatch | None:
        """The PDQ list with an entry within ``pdq_threshold`` bits of ``pdq`` (32 bytes or
        hex), or of any of ``dihedral`` (the image's other orientations) when given."""
        if pdq is None or not self.has_pdq:
            return None
        assert self.pdq is not None
        if self._masks is None:
            self._masks = chunk_masks(self.pdq_threshold)
        for h in [pdq, *(dihedral or [])]:
            raw = bytes.fromhex(h) if isinstance(h, str) else h
            hit = self.pdq.nearest(raw, self.pdq_threshold, self._masks)
            if hit is not None:
                return BlockMatch(self.names[hit[0]], "pdq")
        return None

    def summary(self) -> str:
        """One line per non-empty list: kind, name, entries."""
        return "; ".join(f"{name} ({kind}): {n} entries" for (kind, name), n in self.counts.items() if n)


def load(
    cfg: BlocklistConfig, storage: StorageConfig, own_outputs: Iterable[str] = (), kinds: Iterable[str] = KINDS
) -> Blocklist:
    """Read and index every list of ``cfg`` (and the own blocklists of ``own_outputs``) of the
    given ``kinds``. Raises :class:`BlocklistError` naming the file and line of the first bad
    entry."""
    wanted = set(kinds)
    names: list[str] = []
    parts: dict[str, list[tuple[int, bytearray]]] = {k: [] for k in KINDS}
    counts: dict[tuple[str, str], int] = {}
    for src in sources(cfg, own_outputs):
        if src.kind not in wanted:
            continue
        raw = read_list(src, storage)
        if raw is None:
            continue
        if src.name not in names:
            names.append(src.name)
        list_id = names.index(src.name)
        if len(names) > 65535:
            raise BlocklistError(f"{src.uri}: more than 65535 lists")
        parts[src.kind].append((list_id, raw))
        width = 32 if src.kind == "pdq" else _WIDTH[src.kind]
        counts[(src.kind, src.name)] = counts.get((src.kind, src.name), 0) + len(raw) // width
    bl = Blocklist(names=names, pdq_threshold=cfg.pdq_threshold, pdq_dihedral=cfg.pdq_dihedral, counts=counts)
    for kind in ("url", "domain", *HASH_KINDS):
        if parts[kind]:
            bl.sets[kind] = DigestSet.build(_WIDTH[kind], parts[kind])
    if parts["pdq"]:
        bl.pdq = PdqIndex.build(parts["pdq"])
    return bl


@dataclass(frozen=True)
class BlocklistSpec:
    """What a stage needs to load the job's lists in its own process: the config, the storage
    settings and the outputs whose own blocklists apply."""

    config: BlocklistConfig = field(default_factory=BlocklistConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    own_outputs: tuple[str, ...] = ()

    @property
    def configured(self) -> bool:
        """True when any list or output is named (a job without lists skips all checks)."""
        c = self.config
        return bool(self.own_outputs or c.outputs or any(getattr(c, FIELD[k]) for k in KINDS))


_CACHE: dict[tuple[BlocklistSpec, tuple[str, ...]], Blocklist] = {}
_CACHE_LOCK = threading.Lock()
# What each stage checks: the download stage never needs the PDQ index, the decode stage
# (one process per core) only needs it.
DOWNLOAD_KINDS = ("url", "domain", *HASH_KINDS)
DECODE_KINDS = ("pdq",)


def get_blocklist(spec: BlocklistSpec | None, kinds: Iterable[str] = KINDS) -> Blocklist | None:
    """The lists of ``spec`` of the given ``kinds``, loaded once per process (None when
    nothing is configured)."""
    if spec is None or not spec.configured:
        return None
    key = (spec, tuple(sorted(set(kinds))))
    with _CACHE_LOCK:
        bl = _CACHE.get(key)
        if bl is None:
            bl = load(spec.config, spec.storage, spec.own_outputs, key[1])
            _CACHE[key] = bl
        return bl


def validate(spec: BlocklistSpec | None) -> Blocklist | None:
    """Read every list of ``spec`` now (in the driver, before Ray starts);
    :class:`BlocklistError` names the first bad file and line. The lists are not kept: the
    driver checks no row."""
    if spec is None or not spec.configured:
        return None
    return load(spec.config, spec.storage, spec.own_outputs)
