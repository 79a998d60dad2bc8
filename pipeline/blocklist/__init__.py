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

Modules: :mod:`.urls` (how URLs and hosts are compared), :mod:`.index` (the sorted digest
sets and the PDQ multi-index), :mod:`.pdq` (PDQ hashing), :mod:`.files` (list kinds, list
files and their validation), :mod:`.lists` (a job's lists loaded once per process, and the
per-row checks), :mod:`.own` (an output's own blocklist).
"""

from pipeline.blocklist.files import (
    HASH_KINDS,
    KINDS,
    BlocklistError,
    ListSource,
    read_list,
    sources,
)
from pipeline.blocklist.index import DigestSet, PdqIndex, chunk_masks
from pipeline.blocklist.lists import (
    DECODE_KINDS,
    DOWNLOAD_KINDS,
    Blocklist,
    BlocklistSpec,
    BlockMatch,
    get_blocklist,
    load,
    validate,
)
from pipeline.blocklist.own import OWN_DIR, OWN_FILES, append_to_output
from pipeline.blocklist.pdq import pdq_dihedral_of, pdq_distance, pdq_of
from pipeline.blocklist.urls import normalize_url

__all__ = [
    "DECODE_KINDS",
    "DOWNLOAD_KINDS",
    "HASH_KINDS",
    "KINDS",
    "OWN_DIR",
    "OWN_FILES",
    "BlockMatch",
    "Blocklist",
    "BlocklistError",
    "BlocklistSpec",
    "DigestSet",
    "ListSource",
    "PdqIndex",
    "append_to_output",
    "chunk_masks",
    "get_blocklist",
    "load",
    "normalize_url",
    "pdq_dihedral_of",
    "pdq_distance",
    "pdq_of",
    "read_list",
    "sources",
    "validate",
]
