"""Pure parts of the HTTP client: X-Robots-Tag scoping, Retry-After, the user agent."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone

import pytest

from pipeline.fetch import HostLimiter, parse_retry_after, robots_directives, user_agent


@pytest.mark.parametrize(
    "values,expected",
    [
        (["noai"], {"noai"}),
        (["NoImageAI, nofollow"], {"noimageai", "nofollow"}),
        (["clipcurate: noai"], {"noai"}),
        (["otherbot: noai"], set()),
        # Google's example: a token prefix scopes the directives that follow it in the value.
        (["googlebot: nofollow, clipcurate: noindex, noimageindex"], {"noindex", "noimageindex"}),
        (["clipcurate: noindex, otherbot: noai"], {"noindex"}),
        # Scope does not carry over to the next header line.
        (["otherbot: noindex", "noimageai"], {"noimageai"}),
        (["none"], {"noindex", "nofollow"}),
        # Directives with their own colon are not agent tokens.
        (["max-image-preview: none, noai"], {"max-image-preview", "noai"}),
        (
            ["unavailable_after: Friday, 25 Jun 2010 15:00:00 PST, noai"],
            {"unavailable_after", "noai"},
        ),
        ([""], set()),
    ],
)
def test_robots_directives(values: list[str], expected: set[str]) -> None:
    assert robots_directives(values, "clipcurate") == expected


def test_robots_directives_for_several_tokens() -> None:
    tokens = {"clipcurate", "img2dataset"}
    assert robots_directives(["img2dataset: noimageai"], tokens) == {"noimageai"}
    assert robots_directives(["googlebot: noai, img2dataset: noindex"], tokens) == {"noindex"}
    assert robots_directives(["otherbot: noai"], tokens) == set()


def test_retry_after_forms() -> None:
    now = datetime(2026, 11, 25, 12, 0, 0, tzinfo=timezone.utc)
    assert parse_retry_after("120", now) == 120.0
    assert parse_retry_after(" 0 ", now) == 0.0
    assert parse_retry_after("Wed, 25 Nov 2026 12:00:30 GMT", now) == 30.0
    assert parse_retry_after("Wed, 25 Nov 2026 11:00:00 GMT", now) == 0.0  # in the past
    assert parse_retry_after("-5", now) is None
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None


def test_user_agent_names_project_and_token() -> None:
    ua = user_agent("clipcurate")
    assert ua.startswith("clipcurate/0.") or ua.startswith("clipcurate/0+")
    assert ua.endswith("(+https://github.com/clipcurate/clipcurate; token clipcurate)")
    ua = user_agent("clipcurate", ("clipcurate", "img2dataset"))
    assert ua.endswith("(+https://github.com/clipcurate/clipcurate; token clipcurate; honours img2dataset)")


def test_host_limiter_caps_concurrency_per_host() -> None:
    limiter = HostLimiter(2)
    active: dict[str, int] = {"a": 0, "b": 0}
    peak: dict[str, int] = {"a": 0, "b": 0}
    lock = threading.Lock()

    def work(host: str) -> None:
        with limiter.slot(host, 5.0) as ok:
            assert ok
            with lock:
                active[host] += 1
                peak[host] = max(peak[host], active[host])
            time.sleep(0.05)
            with lock:
                active[host] -= 1

    threads = [threading.Thread(target=work, args=(h,)) for h in "ab" * 5]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak == {"a": 2, "b": 2}
    assert limiter._slots == {}  # idle hosts are forgotten
    with limiter.slot("c", 1.0), limiter.slot("c", 1.0), limiter.slot("c", 0.05) as third:
        assert third is False
