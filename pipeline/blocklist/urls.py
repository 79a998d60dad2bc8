"""How URL and domain list entries are compared: URLs normalised (scheme and host lower-cased,
default port and fragment dropped), hosts with every parent domain, and both kept as 16-byte
digests of the normalised text.
"""

from __future__ import annotations

import hashlib
import re
from urllib.parse import urlsplit, urlunsplit

PLAIN_URL = re.compile(r"(https?)://([A-Za-z0-9.-]+)(?::([0-9]{1,5}))?([/?][^#]*)?(?:#.*)?", re.I | re.S)


def normalize_url(url: str) -> str:
    """The form URLs are compared in: stripped, scheme and host lower-cased, the default port
    and the fragment dropped; path and query unchanged."""
    url = url.strip()
    m = PLAIN_URL.fullmatch(url)
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


def text_digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()[:16]
