"""Blocklists: rows whose URL, domain, bytes or picture are listed never get a byte stored.

Six kinds of list, each a text file (one entry a line; blank lines and ``#`` comments skipped;
the first whitespace- or comma-separated token of a line is the entry, so ``sha256sum`` output
and ``hash,quality`` CSVs load as they are) or a Parquet file (the column named after the kind,
or its only column; hashes as hex strings or raw bytes), local or ``s3://``:

=========  =====================================================  ==========================
kind       entry                                                  checked
=========  =====================================================  ==========================
url        a URL (scheme and host lower-cased, default port and   before each request and at
           fragment dropped before comparing)                     every redirect hop
domain     a host name; also blocks every sub-domain              same
md5        32 hex digits of the downloaded bytes                  after download, before
sha1       40 hex digits of the downloaded bytes                  decode
sha256     64 hex digits of the downloaded bytes
pdq        64 hex digits of a PDQ hash (Meta's perceptual hash,   after decode, before
           as ThreatExchange and NCMEC share them)                anything is stored
=========  =====================================================  ==========================

A PDQ entry matches an image whose PDQ hash is within ``pdq_threshold`` bits (Hamming distance,
default 31, Meta's recommended match distance); ``pdq_dihedral`` also checks the image's seven
rotations and mirror images.

Memory (bytes per entry, sorted arrays, no per-entry Python object): url and domain 16 (a
128-bit digest of the normalised text; a false match needs a 2^-128 collision), md5 16, sha1
20, sha256 32 (plus 2 bytes naming the list), pdq 98 + 8 MB (the 32-byte hash plus a
multi-index of sixteen 16-bit chunks: by the
pigeonhole principle a hash within 31 bits of an entry agrees with it to within one bit on at
least one chunk, so a lookup probes 16 x 17 buckets instead of scanning). 10 million sha256
entries take 340 MB, 1 million PDQ entries 107 MB (bench/blocklist.py measures both).

Loading: :func:`validate` in the driver, before Ray starts, reads every list completely and
raises :class:`BlocklistError` naming ``file:line`` for the first bad entry (a malformed or
wrong-length hash, an unreadable file). Workers call :func:`get_blocklist`, which loads the
kinds a stage checks once per process and keeps them: download workers the URL, domain and
hash lists, decode workers (one per core) only the PDQ index.

An output's own blocklist (``<output>/_blocklist/``, written by takedowns,
:func:`append_to_output`) holds ``urls.txt``, ``sha256.txt`` and ``pdq.txt``; every run that
writes to that output, deduplicates against it or names it in ``blocklist.outputs`` applies it.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from pipeline.config import BlocklistConfig, ConfigError, StorageConfig

# List kinds (what an entry names), not column names: url and domain lists are checked against
# a row's URL, hash lists against its downloaded bytes, pdq lists against its decoded picture.
KINDS = ("url", "domain", "md5", "sha1", "sha256", "pdq")
HASH_KINDS = ("md5", "sha1", "sha256")
HEX_DIGITS = {"md5": 32, "sha1": 40, "sha256": 64, "pdq": 64}
OWN_DIR = "_blocklist"
# File names of an output's own blocklist, per kind.
OWN_FILES = {"url": "urls.txt", "domain": "domains.txt", "md5": "md5.txt", "sha1": "sha1.txt",
             "sha256": "sha256.txt", "pdq": "pdq.txt"}
PDQ_BITS = 256
_CHUNKS = 16  # PDQ multi-index: sixteen 16-bit chunks
_READ_BLOCK = 8 << 20
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_HOST = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*$")


class BlocklistError(ConfigError):
    """A list that cannot be used; the message starts with ``file:line:`` (or ``file:``)."""


class BlockMatch(NamedTuple):
    """Which list matched (``name``) and on what (``kind``: url, domain, md5, ... pdq)."""

    name: str
    kind: str

    def reason(self) -> str:
        """The row's error text."""
        return f"blocklist {self.name} ({self.kind} match)"


# ------------------------------------------------------------------------ normalisation


_PLAIN_URL = re.compile(r"(https?)://([A-Za-z0-9.-]+)(?::([0-9]{1,5}))?([/?][^#]*)?(?:#.*)?", re.I | re.S)


def normalize_url(url: str) -> str:
    """The form URLs are compared in: stripped, scheme and host lower-cased, the default port
    and the fragment dropped; path and query unchanged."""
    url = url.strip()
    m = _PLAIN_URL.fullmatch(url)
    if m is not None and m[2].strip("."):  # the common case, without urlsplit (lists of 10M)
        scheme, host = m[1].lower(), m[2].lower().rstrip(".")
        port = int(m[3]) if m[3] else None
        if port is not None and (scheme, port) not in (("http", 80), ("https", 443)):
            host += f":{port}"
        return f"{scheme}://{host}{m[4] or ''}"
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").rstrip(".")
        port = parts.port
    except ValueError:
        return url
    if not parts.scheme or not host:
        return url
    scheme = parts.scheme.lower()
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and (scheme, port) not in (("http", 80), ("https", 443)):
        netloc += f":{port}"
    if parts.username or parts.password:
        netloc = parts.netloc.rsplit("@", 1)[0] + "@" + netloc
    return urlunsplit((scheme, netloc, parts.path, parts.query, ""))


def url_host(url: str) -> str | None:
    """The lower-cased host of ``url`` (no trailing dot), None when it has none."""
    try:
        host = urlsplit(url.strip()).hostname
    except ValueError:
        return None
    return host.rstrip(".") if host else None


def host_suffixes(host: str) -> list[str]:
    """``a.b.example.com`` -> itself and every parent domain down to ``com``."""
    labels = host.split(".")
    return [".".join(labels[i:]) for i in range(len(labels))]


def _text_digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()[:16]


# ---------------------------------------------------------------------------- structures


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
        order = np.empty((_CHUNKS, n), np.uint32)
        starts = np.empty((_CHUNKS, 65537), np.int64)
        for c in range(_CHUNKS):
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
        self._row_base = (np.arange(_CHUNKS, dtype=np.int64) * 65537)[:, None]
        self._order_base = np.arange(_CHUNKS, dtype=np.int64) * n

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
    radius = threshold // _CHUNKS
    values = np.arange(65536, dtype=np.int64)
    return values[_popcount64(values.astype(np.uint64)) <= radius]


# ---------------------------------------------------------------------------- PDQ hashing


def pdq_of(rgb: Any) -> bytes:
    """The 32-byte PDQ hash of an RGB picture (a PIL image or uint8 [H, W, 3] array).

    The picture is first box-filtered to 64 x 64, the grid PDQ's own Jarosz filter reduces every
    picture to, so hashing costs ~0.2 ms whatever the size (pdqhash on a 1024 px image takes
    ~50 ms). Against the reference hash of the full-size file this differs by a median of 8
    bits on photos (bench/blocklist.py), well inside the 31-bit match distance.
    """
    import pdqhash
    from PIL import Image

    im = rgb if isinstance(rgb, Image.Image) else Image.fromarray(np.asarray(rgb, np.uint8))
    if im.mode != "RGB":
        im = im.convert("RGB")
    small = np.asarray(im.resize((64, 64), Image.Resampling.BOX))
    bits, _quality = pdqhash.compute(small)
    return np.packbits(bits.astype(np.uint8)).tobytes()


def pdq_dihedral_of(rgb: Any) -> list[bytes]:
    """PDQ hashes of the picture and its 7 rotations / mirror images (same filtering)."""
    import pdqhash
    from PIL import Image

    im = rgb if isinstance(rgb, Image.Image) else Image.fromarray(np.asarray(rgb, np.uint8))
    small = np.asarray(im.convert("RGB").resize((64, 64), Image.Resampling.BOX))
    vectors, _quality = pdqhash.compute_dihedral(small)
    return [np.packbits(np.asarray(v).astype(np.uint8)).tobytes() for v in vectors]


def pdq_distance(a: str | bytes, b: str | bytes) -> int:
    """Hamming distance of two PDQ hashes (hex strings or 32 bytes)."""
    x = bytes.fromhex(a) if isinstance(a, str) else a
    y = bytes.fromhex(b) if isinstance(b, str) else b
    return int.bit_count(int.from_bytes(x, "big") ^ int.from_bytes(y, "big"))


# ---------------------------------------------------------------------------- list files


@dataclass(frozen=True)
class ListSource:
    """One list: its kind, the name a blocked row's error gives, where it lives, and whether
    a missing file is fine (an output's own blocklist exists only after a takedown)."""

    kind: str
    name: str
    uri: str
    optional: bool = False


def parse_entry(text: str, kind: str) -> tuple[str, str]:
    """``"name=uri"`` or ``"uri"`` -> (name, uri); the name defaults to the file's stem."""
    name, sep, rest = text.partition("=")
    if sep and _NAME.match(name) and rest:
        return name, rest
    stem = text.rstrip("/").rsplit("/", 1)[-1]
    for ext in (".txt", ".csv", ".parquet", ".tsv"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
    return stem or kind, text


def sources(cfg: BlocklistConfig, own_outputs: Iterable[str] = ()) -> list[ListSource]:
    """Every list ``cfg`` names, then the own blocklists of ``cfg.outputs`` and
    ``own_outputs`` (each output once)."""
    out: list[ListSource] = []
    for kind in KINDS:
        for entry in getattr(cfg, _FIELD[kind]):
            name, uri = parse_entry(entry, kind)
            out.append(ListSource(kind, name, uri))
    seen: set[str] = set()
    for output in (*cfg.outputs, *own_outputs):
        root = output.rstrip("/")
        if not root or root in seen:
            continue
        seen.add(root)
        for kind, fname in OWN_FILES.items():
            out.append(ListSource(kind, f"takedowns:{root}", f"{root}/{OWN_DIR}/{fname}", optional=True))
    return out


_FIELD = {"url": "urls", "domain": "domains", "md5": "md5", "sha1": "sha1", "sha256": "sha256", "pdq": "pdq"}


def _open(uri: str, storage: StorageConfig, seekable: bool = False) -> Any:
    from pipeline.storage import filesystem_for

    fs, path = filesystem_for(uri, storage)
    return fs.open_input_file(path) if seekable else fs.open_input_stream(path)


def _exists(uri: str, storage: StorageConfig) -> bool:
    import pyarrow.fs as pafs

    from pipeline.storage import filesystem_for

    fs, path = filesystem_for(uri, storage)
    return fs.get_file_info(path).type == pafs.FileType.File


def _blocks(uri: str, storage: StorageConfig) -> Iterator[tuple[int, bytes]]:
    """(number of the block's first line, block) of whole lines, about 8 MB at a time."""
    with _open(uri, storage) as f:
        rest = b""
        lineno = 1
        while True:
            block = f.read(_READ_BLOCK)
            data = rest + block
            if not block:
                if data:
                    yield lineno, data
                return
            cut = data.rfind(b"\n") + 1
            rest = data[cut:]
            if cut:
                yield lineno, data[:cut]
                lineno += data.count(b"\n", 0, cut)


def _tokens(first: int, block: bytes) -> Iterator[tuple[int, bytes]]:
    """(line number, stripped first token) of each non-blank, non-comment line of a block."""
    for k, line in enumerate(block.split(b"\n")):
        token = line.strip()
        if not token or token.startswith(b"#"):
            continue
        yield first + k, token.split(None, 1)[0].split(b",", 1)[0]


def _lines(uri: str, storage: StorageConfig) -> Iterator[tuple[int, bytes]]:
    """(line number, stripped first token) of each non-blank, non-comment line."""
    for first, block in _blocks(uri, storage):
        yield from _tokens(first, block)


def _fast_hex_block(block: bytes, digits: int) -> bytes | None:
    """The raw digests of a block that is nothing but ``digits``-long hex lines ending in
    ``\\n`` (how hash lists are distributed), without a Python step per line; None when the
    block holds anything else (comments, other columns, a bad line), for the line-by-line path."""
    body = block if block.endswith(b"\n") else block + b"\n"
    if len(body) % (digits + 1) or body.translate(None, b"0123456789abcdefABCDEF\n"):
        return None
    if body[digits :: digits + 1].count(b"\n") != len(body) // (digits + 1):
        return None
    return bytes.fromhex(body.replace(b"\n", b"").decode("ascii"))


def _parquet_values(uri: str, kind: str, storage: StorageConfig) -> Iterator[tuple[int, bytes]]:
    import pyarrow.parquet as pq

    with _open(uri, storage, seekable=True) as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        col = kind if kind in names else (names[0] if len(names) == 1 else None)
        if col is None:
            raise BlocklistError(f"{uri}: a {kind} list in Parquet needs a column named {kind!r} "
                                 f"or a single column; it has {names}")
        row = 0
        for batch in pf.iter_batches(columns=[col], batch_size=65536):
            for v in batch.column(0).to_pylist():
                row += 1
                if v is None:
                    continue
                if isinstance(v, str):
                    v = v.strip().encode("utf-8")
                    if not v:
                        continue
                elif isinstance(v, (bytes, bytearray)) and kind in HEX_DIGITS:
                    v = bytes(v).hex().encode("ascii")
                yield row, v


def _entries(src: ListSource, storage: StorageConfig, raw: bytearray | None = None) -> Iterator[tuple[int, bytes]]:
    """The entries of a list; for a text hash list with ``raw``, blocks of plain hex lines
    go straight into ``raw`` and only the other blocks are yielded line by line."""
    if src.uri.endswith(".parquet"):
        yield from _parquet_values(src.uri, src.kind, storage)
        return
    for first, block in _blocks(src.uri, storage):
        if raw is not None:
            fast = _fast_hex_block(block, HEX_DIGITS[src.kind])
            if fast is not None:
                raw.extend(fast)
                continue
        yield from _tokens(first, block)


def _where(src: ListSource, line: int) -> str:
    unit = "row " if src.uri.endswith(".parquet") else ""
    return f"{src.uri}:{unit}{line}"


def _read_hashes(src: ListSource, storage: StorageConfig) -> bytearray:
    """Raw digests of a hash or PDQ list, concatenated; BlocklistError at the first bad line."""
    digits = HEX_DIGITS[src.kind]
    out = bytearray()
    batch: list[bytes] = []
    first_line = 0

    def flush() -> None:
        if not batch:
            return
        try:
            out.extend(bytes.fromhex(b"".join(batch).decode("ascii")))
        except (ValueError, UnicodeDecodeError):
            for k, token in enumerate(batch):
                try:
                    bytes.fromhex(token.decode("ascii"))
                except (ValueError, UnicodeDecodeError):
                    raise BlocklistError(
                        f"{_where(src, lines_of[k])}: {src.kind} entry {token[:80]!r} is not hexadecimal"
                    ) from None
        batch.clear()
        lines_of.clear()

    lines_of: list[int] = []
    for lineno, token in _entries(src, storage, out):
        if len(token) != digits:
            what = "a PDQ hash" if src.kind == "pdq" else f"an {src.kind}" if src.kind == "md5" else f"a {src.kind}"
            raise BlocklistError(
                f"{_where(src, lineno)}: {what} has {digits} hex digits, got {len(token)} ({token[:80]!r})"
            )
        if not first_line:
            first_line = lineno
        batch.append(token)
        lines_of.append(lineno)
        if len(batch) >= 65536:
            flush()
    flush()
    return out


def _read_texts(src: ListSource, storage: StorageConfig) -> bytearray:
    """16-byte digests of the normalised URLs or domains of a list."""
    out = bytearray()
    for lineno, token in _entries(src, storage):
        try:
            text = token.decode("utf-8")
        except UnicodeDecodeError:
            raise BlocklistError(f"{_where(src, lineno)}: not UTF-8 text") from None
        if src.kind == "url":
            if _PLAIN_URL.fullmatch(text.strip()) is None and ("://" not in text or not url_host(text)):
                raise BlocklistError(f"{_where(src, lineno)}: {text[:120]!r} is not a URL with a host")
            out.extend(_text_digest(normalize_url(text)))
        else:
            host = text.lower().rstrip(".")
            if host.startswith("*."):
                host = host[2:]
            host = host.lstrip(".")
            if not _HOST.match(host):
                raise BlocklistError(f"{_where(src, lineno)}: {text[:120]!r} is not a host name")
            out.extend(_text_digest(host))
    return out


def read_list(src: ListSource, storage: StorageConfig) -> bytearray | None:
    """The raw entries of one list (None for a missing optional list); see the module
    docstring for the formats. Raises :class:`BlocklistError` naming file and line."""
    try:
        if src.optional and not _exists(src.uri, storage):
            return None
        if src.kind in HEX_DIGITS:
            return _read_hashes(src, storage)
        return _read_texts(src, storage)
    except BlocklistError:
        raise
    except FileNotFoundError as e:
        raise BlocklistError(f"{src.uri}: no such {src.kind} list ({e})") from e
    except Exception as e:  # unreadable file, bad Parquet, S3 failure
        raise BlocklistError(f"{src.uri}: cannot read the {src.kind} list: {type(e).__name__}: {e}") from e


# ---------------------------------------------------------------------------- the lists


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
        hit = self._find("url", _text_digest(normalize_url(url)))
        if hit is not None:
            return hit
        host = url_host(url)
        if host and "domain" in self.sets:
            for suffix in host_suffixes(host):
                hit = self._find("domain", _text_digest(suffix))
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
        return bool(self.own_outputs or c.outputs or any(getattr(c, _FIELD[k]) for k in KINDS))


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


# ---------------------------------------------------------------------- an output's own list


def append_to_output(
    output: str,
    entries: dict[str, Iterable[str]],
    storage: StorageConfig | None = None,
    note: str | None = None,
) -> dict[str, int]:
    """Add ``entries`` (kind -> values: URLs, hex digests) to ``<output>/_blocklist/`` (the
    output's own blocklist); values already listed are skipped. Returns new entries per kind.
    Each file is rewritten whole and atomically (object stores have no append)."""
    from pipeline.storage import Storage

    storage = storage or StorageConfig()
    store = Storage(f"{output.rstrip('/')}/{OWN_DIR}", storage)
    have = set(store.list_names())
    added: dict[str, int] = {}
    for kind, values in entries.items():
        fname = OWN_FILES[kind]
        old = store.read_bytes(fname) if fname in have else b""
        known = {line.strip() for line in old.decode("utf-8").splitlines() if line.strip() and not line.startswith("#")}
        new = []
        for v in values:
            v = v.strip() if kind in ("url", "domain") else v.strip().lower()
            if v and v not in known:
                known.add(v)
                new.append(v)
        added[kind] = len(new)
        if not new:
            continue
        text = old.decode("utf-8")
        if text and not text.endswith("\n"):
            text += "\n"
        if note:
            text += f"# {note}\n"
        text += "\n".join(new) + "\n"
        store.write_atomic(fname, text.encode("utf-8"))
    return added


__all__ = [
    "KINDS",
    "OWN_DIR",
    "BlockMatch",
    "Blocklist",
    "BlocklistError",
    "BlocklistSpec",
    "DigestSet",
    "ListSource",
    "PdqIndex",
    "append_to_output",
    "get_blocklist",
    "load",
    "normalize_url",
    "pdq_distance",
    "pdq_of",
    "read_list",
    "sources",
    "validate",
]
