"""The address guard's pure parts: range classifier, IP-literal forms, URL checks.

Nothing here may open a connection or resolve a name: the autouse fixture makes every socket
connect and every getaddrinfo call fail the test.
"""

from __future__ import annotations

import ipaddress
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.netguard import (
    AddressPolicy,
    GuardError,
    Resolver,
    classify_address,
    parse_ipv4_literal,
    parse_url,
    resolve_checked,
)


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


REFUSED = {
    # address: expected label
    "10.0.0.0": "private",
    "10.255.255.255": "private",
    "172.16.0.0": "private",
    "172.31.255.255": "private",
    "192.168.0.1": "private",
    "192.168.255.255": "private",
    "169.254.0.1": "link-local",
    "169.254.169.254": "link-local",  # the cloud metadata endpoint
    "100.64.0.0": "shared (carrier-grade NAT)",
    "100.127.255.255": "shared (carrier-grade NAT)",
    "127.0.0.1": "loopback",
    "127.255.255.254": "loopback",
    "0.0.0.0": "this-network",
    "224.0.0.1": "multicast",
    "239.255.255.250": "multicast",
    "240.0.0.1": "reserved",
    "255.255.255.255": "reserved",
    "192.0.2.10": "documentation",
    "198.18.0.1": "benchmarking",
    "fc00::1": "unique-local",
    "fd12:3456:789a::1": "unique-local",
    "fe80::1": "link-local",
    "febf:ffff::1": "link-local",
    "ff02::1": "multicast",
    "ff0e::fb": "multicast",
    "::1": "loopback",
    "::": "unspecified",
    "::ffff:8.8.8.8": "IPv4-mapped",  # refused even though the IPv4 address is public
    "::ffff:10.0.0.1": "IPv4-mapped",
    "::ffff:127.0.0.1": "IPv4-mapped",
    "::127.0.0.1": "IPv4-compatible (deprecated)",
    "2001:db8::1": "documentation",
    "64:ff9b::a00:1": "NAT64 of 10.0.0.1 (private)",
    "2002:a9fe:a9fe::1": "6to4 of 169.254.169.254 (link-local)",
    "100::1": "reserved (discard-only)",
    "4000::1": "reserved (outside 2000::/3)",
}

PUBLIC = [
    "8.8.8.8",
    "1.1.1.1",
    "9.255.255.255",  # just below 10/8
    "11.0.0.0",  # just above 10/8
    "172.15.255.255",
    "172.32.0.0",
    "192.167.255.255",
    "192.169.0.0",
    "169.253.255.255",
    "169.255.0.0",
    "100.63.255.255",
    "100.128.0.0",
    "223.255.255.255",  # just below multicast
    "2606:4700:4700::1111",
    "2a00:1450:4001::1",
    "64:ff9b::808:808",  # NAT64 of 8.8.8.8
    "2002:808:808::1",  # 6to4 of 8.8.8.8
]


@pytest.mark.parametrize("text,label", sorted(REFUSED.items()))
def test_classifier_refuses_special_ranges(text: str, label: str) -> None:
    assert classify_address(ipaddress.ip_address(text)) == label


@pytest.mark.parametrize("text", PUBLIC)
def test_classifier_allows_public_addresses(text: str) -> None:
    assert classify_address(ipaddress.ip_address(text)) is None


# Where this guard deliberately refuses more than Python's ipaddress.is_global: multicast (Python
# calls 224/4 global) and the whole 192.0.0.0/24 and 192.88.99.0/24 blocks.
_WIDER = [ipaddress.ip_network(n) for n in ("224.0.0.0/4", "192.0.0.0/24", "192.88.99.0/24")]


@settings(max_examples=1000, deadline=None)
@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_ipv4_classifier_agrees_with_python_is_global(value: int) -> None:
    ip = ipaddress.IPv4Address(value)
    refused = classify_address(ip) is not None
    if any(ip in net for net in _WIDER):
        assert refused
    else:
        assert refused == (not ip.is_global)


def test_ipv4_range_edges() -> None:
    # Every boundary of the refused IPv4 table: first and last address inside, neighbours out.
    for net in ("10.0.0.0/8", "100.64.0.0/10", "169.254.0.0/16", "172.16.0.0/12", "192.168.0.0/16"):
        n = ipaddress.ip_network(net)
        assert classify_address(n.network_address) is not None
        assert classify_address(n.broadcast_address) is not None
        assert classify_address(n.network_address - 1) is None
        assert classify_address(n.broadcast_address + 1) is None


def test_allowed_networks_override_only_what_they_cover() -> None:
    policy = AddressPolicy(["127.0.0.1/32"])
    assert policy.refusal(ipaddress.ip_address("127.0.0.1")) is None
    assert policy.refusal(ipaddress.ip_address("127.0.0.2")) == "127.0.0.2 is loopback"
    assert policy.refusal(ipaddress.ip_address("::1")) == "::1 is loopback"
    # The IPv4-mapped spelling of an allowed address is a different address: still refused.
    assert "IPv4-mapped" in (policy.refusal(ipaddress.ip_address("::ffff:127.0.0.1")) or "")
    assert policy.refusal(ipaddress.ip_address("8.8.8.8")) is None
    wide = AddressPolicy(["10.0.0.0/8", "fd00::/8"])
    assert wide.refusal(ipaddress.ip_address("10.1.2.3")) is None
    assert wide.refusal(ipaddress.ip_address("fd00::5")) is None
    assert wide.refusal(ipaddress.ip_address("192.168.1.1")) is not None


IPV4_FORMS = [
    "127.0.0.1",
    "2130706433",
    "0x7f000001",
    "0X7F000001",
    "0177.0.0.1",
    "0177.0000.0.01",
    "127.1",
    "127.0.1",
    "0x7f.1",
    "0x7f.0.0x0.1",
    "017700000001",
    "10.0.0.1",
    "167772161",
    "0xa.0.0.1",
    "8.8.8.8",
    "134744072",
]


@pytest.mark.parametrize("text", IPV4_FORMS)
def test_ipv4_literal_forms_match_inet_aton(text: str) -> None:
    # inet_aton is the C library's reading of the same forms; it is pure (no lookup).
    expected = ipaddress.IPv4Address(socket.inet_aton(text))
    assert parse_ipv4_literal(text) == expected
    assert parse_ipv4_literal(text + ".") == expected  # trailing root dot


@pytest.mark.parametrize(
    "text", ["1.2.3.4.5", "256.0.0.1", "1.2.3.256", "4294967296", "1..2", "a.0x"]
)
def test_malformed_numeric_hosts_are_bad_urls(text: str) -> None:
    with pytest.raises(GuardError) as err:
        parse_ipv4_literal(text)
    assert err.value.status == "bad_url"


@pytest.mark.parametrize("text", ["example.com", "1.2.3.com", "cdn-1.example", "a0x1.b", "0x1g"])
def test_names_are_not_ip_literals(text: str) -> None:
    assert parse_ipv4_literal(text) is None


@pytest.mark.parametrize(
    "url,status",
    [
        ("file:///etc/passwd", "bad_scheme"),
        ("ftp://127.0.0.1/a.jpg", "bad_scheme"),
        ("data:image/png;base64,iVBORw0KGgo=", "bad_scheme"),
        ("javascript:alert(1)", "bad_scheme"),
        ("gopher://127.0.0.1:70/", "bad_scheme"),
        ("//example.com/a.jpg", "bad_scheme"),
        ("example.com/a.jpg", "bad_scheme"),
        ("", "bad_url"),
        ("http://", "bad_url"),
        ("http://user:pw@example.com/a.jpg", "bad_url"),
        ("http://127.0.0.1@example.com/a.jpg", "bad_url"),
        ("http://example.com:99999/a.jpg", "bad_url"),
        ("http://exa mple.com/a.jpg", "bad_url"),
        ("http://example.com\\@127.0.0.1/", "bad_url"),
        ("http://[fe80::1%25eth0]/a.jpg", "bad_url"),
        ("http://[not-v6]/a.jpg", "bad_url"),
        ("http://1.2.3.4.5/a.jpg", "bad_url"),
    ],
)
def test_parse_url_refusals(url: str, status: str) -> None:
    with pytest.raises(GuardError) as err:
        parse_url(url)
    assert err.value.status == status


def test_request_targets_are_ascii_with_utf8_escapes() -> None:
    # What curl and browsers send for such URLs (hand-encoded: é = C3 A9, 猫 = E7 8C AB).
    t = parse_url("http://x.test/caf\u00e9/\u732b.jpg?q=\u00fc&a=b")
    assert t.request_target == "/caf%C3%A9/%E7%8C%AB.jpg?q=%C3%BC&a=b"
    # Characters RFC 3986 does not allow unescaped; escapes already there stay as they are.
    t = parse_url('http://x.test/a"<>{}|^`[]%41.jpg?x=[1]&y=%2F')
    assert t.request_target == "/a%22%3C%3E%7B%7D%7C%5E%60%5B%5D%41.jpg?x=%5B1%5D&y=%2F"
    with pytest.raises(GuardError) as err:
        parse_url("http://x.test/\ud800.jpg")  # a lone surrogate: no UTF-8 for it
    assert err.value.status == "bad_url"


def test_parse_url_targets() -> None:
    t = parse_url("HTTP://Images.Example.COM/a%20b.jpg?x=1&y=2#frag")
    assert (t.scheme, t.host, t.port, t.ip) == ("http", "images.example.com", 80, None)
    assert t.request_target == "/a%20b.jpg?x=1&y=2"
    assert t.host_header == "images.example.com"
    t = parse_url("https://0x7f000001:8443")
    assert (t.host, t.port, t.ip) == ("127.0.0.1", 8443, ipaddress.ip_address("127.0.0.1"))
    assert t.request_target == "/" and t.host_header == "127.0.0.1:8443"
    t = parse_url("http://[::FFFF:7f00:1]:81/x")
    assert (
        t.ip == ipaddress.ip_address("::ffff:127.0.0.1") and t.host_header == "[::ffff:7f00:1]:81"
    )
    t = parse_url("http://bücher.example/x")
    assert t.host == "xn--bcher-kva.example" and t.ip is None


@pytest.mark.parametrize(
    "url",
    [
        "http://127\u30020\u30020\u30022/x",  # ideographic full stops
        "http://\uff11\uff12\uff17.\uff10.\uff10.\uff12/x",  # full-width digits
        "http://0x7f.0.0.2/x",
        "http://127.0.0.2./x",
    ],
)
def test_unicode_and_odd_spellings_normalise_to_the_address(url: str) -> None:
    t = parse_url(url)
    assert t.ip == ipaddress.ip_address("127.0.0.2") and t.host == "127.0.0.2"
    assert AddressPolicy(["127.0.0.1/32"]).refusal(t.ip) == "127.0.0.2 is loopback"


class _FakeResolver(Resolver):
    def __init__(self, table: dict[str, list[str]]) -> None:
        super().__init__()
        self.table = table
        self.calls: list[str] = []

    def _lookup(self, host: str, port: int) -> list:
        self.calls.append(host)
        return [ipaddress.ip_address(a) for a in self.table[host]]


def test_every_resolved_address_is_checked() -> None:
    policy = AddressPolicy(["127.0.0.1/32"])
    resolver = _FakeResolver(
        {
            "public.test": ["93.184.216.34", "2606:2800:220:1::1"],
            "mixed.test": ["93.184.216.34", "10.0.0.7"],
            "metadata.test": ["169.254.169.254"],
            "local.test": ["127.0.0.1"],
        }
    )
    try:
        got = resolve_checked(parse_url("http://public.test/a"), policy, resolver, 1.0)
        assert [str(a) for a in got] == ["93.184.216.34", "2606:2800:220:1::1"]
        got = resolve_checked(parse_url("http://local.test/a"), policy, resolver, 1.0)
        assert [str(a) for a in got] == ["127.0.0.1"]
        for host, reason in (
            ("mixed.test", "10.0.0.7 is private"),
            ("metadata.test", "link-local"),
        ):
            with pytest.raises(GuardError) as err:
                resolve_checked(parse_url(f"http://{host}/a"), policy, resolver, 1.0)
            assert err.value.status == "blocked_address" and reason in err.value.message
        # Literals are judged without any lookup.
        with pytest.raises(GuardError):
            resolve_checked(parse_url("http://2130706434/"), policy, resolver, 1.0)
        assert "2130706434" not in resolver.calls and "127.0.0.2" not in resolver.calls
    finally:
        resolver.close()
