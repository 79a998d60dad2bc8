"""List kinds and list files: which lists a config names (:func:`sources`), and reading one
list (:func:`read_list`: text, one entry a line, or Parquet; local or ``s3://``), raising
:class:`BlocklistError` naming the file and line of the first bad entry.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from pipeline.blocklist.own import OWN_DIR, OWN_FILES
from pipeline.blocklist.urls import PLAIN_URL, normalize_url, text_digest, url_host
from pipeline.config import BlocklistConfig, ConfigError, StorageConfig

# List kinds (what an entry names), not column names: url and domain lists are checked against
# a row's URL, hash lists against its downloaded bytes, pdq lists against its decoded picture.
KINDS = ("url", "domain", "md5", "sha1", "sha256", "pdq")
HASH_KINDS = ("md5", "sha1", "sha256")
HEX_DIGITS = {"md5": 32, "sha1": 40, "sha256": 64, "pdq": 64}
# The BlocklistConfig field that names each kind's lists.
FIELD = {"url": "urls", "domain": "domains", "md5": "md5", "sha1": "sha1", "sha256": "sha256", "pdq": "pdq"}
_READ_BLOCK = 8 << 20
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_HOST = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*$")


class BlocklistError(ConfigError):
    """A list that cannot be used; the message starts with ``file:line:`` (or ``file:``)."""


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
        for entry in getattr(cfg, FIELD[kind]):
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
            if PLAIN_URL.fullmatch(text.strip()) is None and ("://" not in text or not url_host(text)):
                raise BlocklistError(f"{_where(src, lineno)}: {text[:120]!r} is not a URL with a host")
            out.extend(text_digest(normalize_url(text)))
        else:
            host = text.lower().rstrip(".")
            if host.startswith("*."):
                host = host[2:]
            host = host.lstrip(".")
            if not _HOST.match(host):
                raise BlocklistError(f"{_where(src, lineno)}: {text[:120]!r} is not a host name")
            out.extend(text_digest(host))
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
