"""entrypoint.trusted_proxies without sockets: the trust decision, X-Real-IP from
X-Forwarded-For, the fields a trusted peer's request gets, and the config's errors."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tdproxy.config.loader import ConfigError, parse_config
from tdproxy.dataplane.context import ProxyContext
from tdproxy.dataplane.exchange import Exchange, PeerFields
from tdproxy.dataplane.forwarded import (
    MAX_HOPS,
    TrustedPeerFields,
    TrustedProxies,
    forwarded_https,
    parse_address,
)
from tests.fakes.sansio import Rig

TRUSTED = TrustedProxies(["10.0.0.0/8", "192.0.2.10/32", "fd00::/8"])


@pytest.mark.parametrize(
    ("name", "trusted"),
    [
        ("10.1.2.3", True),
        ("192.0.2.10", True),
        ("192.0.2.11", False),
        ("11.0.0.1", False),
        ("fd12::1", True),
        ("fe80::1", False),
        ("::ffff:10.9.8.7", True),  # an IPv4 peer of a dual-stack socket
        ("::ffff:11.0.0.1", False),
        ("[fd00::1]:443", True),
        ("10.0.0.1:8080", True),
        ("unknown", False),
        ("", False),
        ("10.0.0.1/8", False),
    ],
)
def test_trust_is_decided_by_network(name: str, trusted: bool) -> None:
    assert TRUSTED.trusts_name(name) is trusted


def test_an_ipv6_network_does_not_trust_ipv4_and_back() -> None:
    only_v6 = TrustedProxies(["::/0"])
    assert only_v6.trusts_name("2001:db8::1")
    assert not only_v6.trusts_name("203.0.113.1")
    assert not TrustedProxies(["0.0.0.0/0"]).trusts_name("2001:db8::1")


@pytest.mark.parametrize(
    ("forwarded_for", "client"),
    [
        (None, b"10.0.0.5"),  # no list: the trusted peer is the client
        (b"203.0.113.9", b"203.0.113.9"),
        (b"198.51.100.1, 203.0.113.9", b"203.0.113.9"),  # the left one may be forged
        (b"203.0.113.9, 10.0.0.7", b"203.0.113.9"),  # a trusted hop is skipped
        (b"203.0.113.9,10.0.0.7 , 192.0.2.10", b"203.0.113.9"),
        (b"10.0.0.3, 10.0.0.7", b"10.0.0.3"),  # all trusted: the left-most
        (b"203.0.113.9:4711", b"203.0.113.9"),
        (b"[2001:db8::9]:4711, fd00::2", b"2001:db8::9"),
        (b"2001:DB8::9", b"2001:db8::9"),
        (b"203.0.113.9, garbage", b"10.0.0.5"),  # not an address: stop at the last trusted hop
        (b"203.0.113.9, unknown, 10.0.0.7", b"10.0.0.7"),
        (b"", b"10.0.0.5"),
    ],
)
def test_real_client_is_the_right_most_untrusted_address(
    forwarded_for: bytes | None, client: bytes
) -> None:
    assert TRUSTED.real_client(forwarded_for, b"10.0.0.5") == client


def test_the_walk_is_bounded() -> None:
    chain = b", ".join([b"203.0.113.1"] + [b"10.0.0.1"] * (MAX_HOPS + 10))
    assert TRUSTED.real_client(chain, b"10.0.0.5") == b"10.0.0.1"


def test_parse_address_refuses_what_is_not_an_address() -> None:
    assert parse_address("[::1") is None
    assert parse_address("1.2.3.4:5:6") is None
    assert str(parse_address(" 1.2.3.4 ")) == "1.2.3.4"


def test_peer_fields_are_chosen_once_per_connection() -> None:
    assert isinstance(TRUSTED.peer_fields(b"10.0.0.5", b"https"), TrustedPeerFields)
    plain = TRUSTED.peer_fields(b"203.0.113.9", b"https")
    assert type(plain) is PeerFields and not plain.trusted


@pytest.fixture(autouse=True)
def _context() -> Iterator[None]:
    """A real proxy context for parse_head (the compiled build checks what it is handed)."""
    global _CTX
    rig = Rig()
    _CTX = rig.ctx
    yield
    rig.close()


_CTX: ProxyContext | None = None


def head(peer: PeerFields, headers: list[tuple[bytes, bytes]]) -> tuple[Exchange, list[bytes]]:
    exchange = Exchange()
    exchange.target = b"/"
    exchange.headers = [(name.lower(), name, value) for name, value in headers]
    assert _CTX is not None
    assert exchange.parse_head(b"GET", "1.1", True, False, _CTX, peer) == 0
    lines = exchange.middle.split(b"\r\n")
    return exchange, [line for line in lines if line.lower().startswith((b"x-", b"host"))]


SPOOF = [
    (b"Host", b"app.example"),
    (b"X-Forwarded-For", b"198.51.100.1"),
    (b"X-Forwarded-Proto", b"https"),
    (b"X-Forwarded-Host", b"public.example"),
    (b"X-Real-IP", b"6.6.6.6"),
]


def test_an_untrusted_peer_gets_its_fields_overwritten() -> None:
    exchange, lines = head(TRUSTED.peer_fields(b"203.0.113.9", b"http"), SPOOF)
    assert lines == [
        b"X-Forwarded-For: 198.51.100.1, 203.0.113.9",
        b"X-Forwarded-Proto: http",
        b"X-Forwarded-Host: app.example",
        b"X-Real-IP: 203.0.113.9",
    ]
    assert exchange.client is None  # the access log shows the connection's peer


def test_a_trusted_peer_keeps_proto_and_host_and_names_the_client() -> None:
    exchange, lines = head(TRUSTED.peer_fields(b"10.0.0.5", b"http"), SPOOF)
    assert lines == [
        b"X-Forwarded-Proto: https",
        b"X-Forwarded-Host: public.example",
        b"X-Forwarded-For: 198.51.100.1, 10.0.0.5",
        b"X-Real-IP: 198.51.100.1",
    ]
    assert exchange.client == b"198.51.100.1"
    assert forwarded_https(exchange)


def test_a_trusted_peer_without_the_fields_gets_them_set() -> None:
    exchange, lines = head(TRUSTED.peer_fields(b"10.0.0.5", b"https"), [(b"Host", b"a.example")])
    assert lines == [
        b"X-Forwarded-For: 10.0.0.5",
        b"X-Forwarded-Proto: https",
        b"X-Forwarded-Host: a.example",
        b"X-Real-IP: 10.0.0.5",
    ]
    assert not forwarded_https(exchange)  # tdproxy's own value does not count as the proxy's


@pytest.mark.parametrize(
    ("value", "https"),
    [(b"https", True), (b"HTTPS", True), (b"https, http", True), (b"http", False), (b"", False)],
)
def test_forwarded_https_reads_the_first_value(value: bytes, https: bool) -> None:
    exchange, _ = head(
        TRUSTED.peer_fields(b"10.0.0.5", b"http"),
        [(b"Host", b"a"), (b"X-Forwarded-Proto", value)],
    )
    assert forwarded_https(exchange) is https


# -- the config ----------------------------------------------------------------------------


def entrypoint(**keys: Any) -> Any:
    return parse_config({"backends": [{"name": "a", "url": "http://a"}], "entrypoint": keys})


def test_trusted_proxies_default_to_none_and_proxy_protocol_off() -> None:
    config = entrypoint()
    assert config.entrypoint.trusted_proxies == ()
    assert config.entrypoint.proxy_protocol is False


def test_trusted_proxies_are_kept_in_canonical_form() -> None:
    config = entrypoint(trusted_proxies=["10.0.0.0/8", " 192.0.2.1 ", "FD00::/8", "::1"])
    assert config.entrypoint.trusted_proxies == (
        "10.0.0.0/8",
        "192.0.2.1/32",
        "fd00::/8",
        "::1/128",
    )


def test_bad_trusted_proxies_are_reported_with_their_key_paths() -> None:
    with pytest.raises(ConfigError) as caught:
        entrypoint(trusted_proxies=["10.0.0.0/8", "proxy.internal", "10.0.0.1/8", "300.1.1.1"])
    assert caught.value.errors == [
        "entrypoint.trusted_proxies[1]: 'proxy.internal' is not an IP address or CIDR block "
        "(such as 10.0.0.0/8 or fd00::/8)",
        "entrypoint.trusted_proxies[2]: '10.0.0.1/8' has host bits set: did you mean 10.0.0.0/8?",
        "entrypoint.trusted_proxies[3]: '300.1.1.1' is not an IP address or CIDR block "
        "(such as 10.0.0.0/8 or fd00::/8)",
    ]


def test_a_reload_reports_what_applies_when() -> None:
    from tdproxy.controlplane.reload import describe_changes, restart_only_changes

    base = entrypoint()
    trusted = entrypoint(trusted_proxies=["10.0.0.0/8"])
    proxied = entrypoint(proxy_protocol=True)
    assert "entrypoint.trusted_proxies changed (new connections)" in describe_changes(base, trusted)
    assert restart_only_changes(base, trusted) == []
    assert restart_only_changes(base, proxied) == ["entrypoint.proxy_protocol turned on"]
    assert restart_only_changes(proxied, base) == ["entrypoint.proxy_protocol turned off"]
