"""What a takedown removes: :class:`Matchers` (exact URLs, sha256 digests of the stored or the
downloaded image, row keys from a similarity search), validated and normalised, and the list
files they are read from.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class TakedownError(ValueError):
    """Bad takedown input, or an output a takedown cannot safely change."""


@dataclass(frozen=True)
class Matchers:
    """What to take down: exact URLs (whitespace-stripped), sha256 hex digests (lower-cased)
    of the stored image or of the downloaded file (``source_sha256``), and row keys (what a
    similarity search found)."""

    urls: frozenset[str] = frozenset()
    sha256: frozenset[str] = frozenset()
    keys: frozenset[str] = frozenset()

    @classmethod
    def build(cls, urls: Iterable[str] = (), hashes: Iterable[str] = (), keys: Iterable[str] = ()) -> Matchers:
        """Normalise and validate; raises :class:`TakedownError` naming the bad value."""
        u = set()
        for raw in urls:
            url = raw.strip()
            if not url:
                raise TakedownError("an empty URL was given")
            u.add(url)
        h = set()
        for raw in hashes:
            digest = raw.strip().lower()
            if not _HEX64.match(digest):
                raise TakedownError(f"{raw!r} is not a sha256 hex digest (64 hex characters)")
            h.add(digest)
        k = {str(x).strip() for x in keys if str(x).strip()}
        if not u and not h and not k:
            raise TakedownError("nothing to take down: give at least one URL, sha256 or row")
        return cls(frozenset(u), frozenset(h), frozenset(k))

    def match(self, urls: list[Any], hashes: list[Any], keys: list[Any] | None = None,
              sources: list[Any] | None = None) -> list[bool]:
        """Per row: whether its url, sha256 (stored or source) or key is named."""
        n = len(urls)
        keys = keys if keys is not None else [None] * n
        sources = sources if sources is not None else [None] * n
        out = []
        for url, digest, key, src in zip(urls, hashes, keys, sources, strict=True):
            hit = isinstance(url, str) and url.strip() in self.urls
            hit = hit or (isinstance(digest, str) and digest.lower() in self.sha256)
            hit = hit or (isinstance(src, str) and src.lower() in self.sha256)
            hit = hit or (key is not None and key in self.keys)
            out.append(hit)
        return out


def read_list_file(text: str) -> list[str]:
    """Lines of a URL/hash list file: blank lines and lines starting with ``#`` are skipped."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
