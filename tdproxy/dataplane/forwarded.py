"""Who the client is, when tdproxy sits behind other proxies (``entrypoint.trusted_proxies``).

Theory of operation
-------------------
A peer is *trusted* when its address falls in one of the configured networks. The decision is
made once per connection, when it is accepted (or once its PROXY protocol header named the
client), and picks the connection's :class:`~tdproxy.dataplane.exchange.PeerFields`:

* an untrusted peer (and every peer when no ``trusted_proxies`` are configured) gets the plain
  ``PeerFields``: ``X-Forwarded-Proto``, ``X-Forwarded-Host`` and ``X-Real-IP`` are overwritten
  with what tdproxy itself saw, and ``X-Forwarded-For`` is appended to. Nothing here runs per
  request for it;
* a trusted peer gets :class:`TrustedPeerFields`: ``X-Forwarded-Proto`` and ``X-Forwarded-Host``
  are kept as received (set only when absent), ``X-Forwarded-For`` is appended to as always, and
  ``X-Real-IP`` (and the access log's client address) becomes the right-most address of
  ``X-Forwarded-For`` that is not itself trusted.

Why right-most: every hop appends the address it saw, so the right end of the list was written
by the proxies closest to tdproxy. Walking from the right, each trusted hop vouches for the
entry to its left; the first untrusted entry is the closest address nobody trusted wrote, and
anything left of it may be forged by the client. An entry that is not an address ends the walk
(the last vouched-for address is the client then), and so does the ``MAX_HOPS``-th hop.

IPv4-mapped IPv6 addresses (``::ffff:192.0.2.1``: an IPv4 client of a dual-stack socket, or an
address a balancer wrote so) match the IPv4 networks.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import TYPE_CHECKING

from tdproxy.dataplane.exchange import REQUEST_FIELDS, PeerFields

if TYPE_CHECKING:
    from tdproxy.dataplane.exchange import Exchange

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# X-Forwarded-For entries examined, from the right, when X-Real-IP is derived.
MAX_HOPS = 32

# A trusted peer's X-Forwarded-Proto and X-Forwarded-Host pass as received: they are absent from
# this copy of parse_head's field table (the default action forwards a field unchanged).
TRUSTED_REQUEST_FIELDS = {
    name: action
    for name, action in REQUEST_FIELDS.items()
    if name not in (b"x-forwarded-proto", b"x-forwarded-host")
}


def parse_address(text: str) -> IPAddress | None:
    """An address as proxies write it in X-Forwarded-For or a peer name: ``192.0.2.1``,
    ``2001:db8::1``, ``192.0.2.1:4711``, ``[2001:db8::1]:4711``; None when it is none of those."""
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        text = text[1:end]
    elif text.count(":") == 1:
        text = text.partition(":")[0]  # IPv4 with a port
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


class TrustedProxies:
    """The configured networks, precomputed as (network, mask) integers per IP version."""

    __slots__ = ("_v4", "_v6", "entries")

    def __init__(self, entries: Iterable[str]) -> None:
        self.entries = tuple(entries)
        self._v4: list[tuple[int, int]] = []
        self._v6: list[tuple[int, int]] = []
        for entry in self.entries:
            network = ipaddress.ip_network(entry, strict=False)
            table = self._v4 if network.version == 4 else self._v6
            table.append((int(network.network_address), int(network.netmask)))

    def trusts(self, address: IPAddress | None) -> bool:
        if address is None:
            return False
        if address.version == 6:
            mapped = address.ipv4_mapped
            if mapped is not None:
                address = mapped
        value = int(address)
        table = self._v4 if address.version == 4 else self._v6
        return any(value & mask == network for network, mask in table)

    def trusts_name(self, name: str) -> bool:
        return self.trusts(parse_address(name))

    def real_client(self, forwarded_for: bytes | None, peer: bytes) -> bytes:
        """X-Real-IP for a request from the trusted ``peer``: the right-most address of
        ``forwarded_for`` that is not trusted (see the module's docstring)."""
        client = peer
        if not forwarded_for:
            return client
        hops = forwarded_for.decode("latin-1").split(",")
        for entry in reversed(hops[-MAX_HOPS:]):
            address = parse_address(entry)
            if address is None:
                break  # not an address: the hop to its right is as far as we can trust
            client = str(address).encode()
            if not self.trusts(address):
                break
        return client

    def peer_fields(self, address: bytes, scheme: bytes) -> PeerFields:
        """The forwarding fields of a connection from ``address``: trusted or plain."""
        if self.trusts(parse_address(address.decode("latin-1"))):
            return TrustedPeerFields(address, scheme, self)
        return PeerFields(address, scheme)

    def __repr__(self) -> str:
        return f"<TrustedProxies {', '.join(self.entries)}>"


class TrustedPeerFields(PeerFields):
    """The forwarding fields of a connection from a trusted proxy."""

    __slots__ = ("trusted_proxies",)

    def __init__(self, address: bytes, scheme: bytes, trusted_proxies: TrustedProxies) -> None:
        super().__init__(address, scheme)
        self.trusted = True
        self.trusted_proxies = trusted_proxies
        self.fields = TRUSTED_REQUEST_FIELDS

    def trusted_block(
        self, exchange: Exchange, forwarded_for: bytes | None, host: bytes | None
    ) -> bytes:
        """The forwarding fields for one request; sets the exchange's ``client``."""
        has_proto = has_host = False
        for lname, _, _ in exchange.headers:
            if lname == b"x-forwarded-proto":
                has_proto = True
            elif lname == b"x-forwarded-host":
                has_host = True
        if forwarded_for is None:
            lines = [b"X-Forwarded-For: %s\r\n" % self.address]
        else:
            lines = [b"X-Forwarded-For: %s, %s\r\n" % (forwarded_for, self.address)]
        if not has_proto:
            lines.append(b"X-Forwarded-Proto: %s\r\n" % self.scheme)
        if not has_host and host is not None:
            lines.append(b"X-Forwarded-Host: %s\r\n" % host)
        client = self.trusted_proxies.real_client(forwarded_for, self.address)
        exchange.client = client
        lines.append(b"X-Real-IP: %s\r\n" % client)
        return b"".join(lines)


def forwarded_https(exchange: Exchange) -> bool:
    """Did the (trusted) proxy mark this request as received over HTTPS? The first
    X-Forwarded-Proto value counts: that is the protocol of the hop closest to the client."""
    value = exchange.field(b"x-forwarded-proto")
    return value is not None and value.split(b",")[0].strip().lower() == b"https"
