"""The PROXY protocol header parser (v1 and v2), without sockets: every valid form, every
malformed one, and the promise the accept path relies on (an incomplete header never reaches
past its own bytes)."""

from __future__ import annotations

import struct

import pytest

from tdproxy.dataplane.proxy_protocol import (
    MAX_HEADER,
    V1_MAX,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    parse_header,
)

HTTP = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def v2(command: int, family_protocol: int, block: bytes) -> bytes:
    return (
        V2_SIGNATURE
        + bytes([0x20 | command, family_protocol])
        + struct.pack("!H", len(block))
        + block
    )


def inet(source: bytes, destination: bytes, sport: int, dport: int) -> bytes:
    return source + destination + struct.pack("!HH", sport, dport)


IPV4_BLOCK = inet(bytes([203, 0, 113, 7]), bytes([10, 0, 0, 1]), 51000, 443)
IPV6_SOURCE = bytes.fromhex("20010db8000000000000000000000007")
IPV6_BLOCK = inet(IPV6_SOURCE, bytes(15) + b"\x01", 51000, 443)


# -- version 1 ---------------------------------------------------------------------------------


def test_v1_tcp4() -> None:
    line = b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 443\r\n"
    assert parse_header(line + HTTP) == ProxyHeader(
        len(line), 1, ("203.0.113.7", 51000), ("10.0.0.1", 443)
    )


def test_v1_tcp6() -> None:
    line = b"PROXY TCP6 2001:DB8::7 ::1 0 65535\r\n"
    header = parse_header(line + HTTP)
    assert header == ProxyHeader(len(line), 1, ("2001:db8::7", 0), ("::1", 65535))


def test_v1_longest_valid_line_is_107_bytes() -> None:
    full = ":".join(["ffff"] * 8)
    line = f"PROXY UNKNOWN {full} {full} 65535 65535\r\n".encode()
    assert len(line) == V1_MAX
    assert parse_header(line + HTTP) == ProxyHeader(V1_MAX, 1, None)
    line6 = f"PROXY TCP6 {full} {full} 65535 65535\r\n".encode()
    header = parse_header(line6)
    assert header is not None and header.source == (full, 65535)


@pytest.mark.parametrize("line", [b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN anything at all 1 2 3\r\n"])
def test_v1_unknown_uses_the_real_peer(line: bytes) -> None:
    assert parse_header(line + HTTP) == ProxyHeader(len(line), 1, None)


@pytest.mark.parametrize("size", range(1, 40))
def test_v1_incomplete_needs_more(size: int) -> None:
    line = b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 443\r\n"
    assert parse_header(line[:size]) is None


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "signature"),
        (b"PROXZ TCP4", "signature"),
        (b"PROXY\tTCP4", "signature"),
        (b"\x16\x03\x01\x02\x00", "signature"),  # a TLS ClientHello without a header
        (b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 443\n", "CRLF"),  # a bare LF
        (b"PROXY TCP4 203.0.113.7\r10.0.0.1 51000 443\r\n", "CRLF"),  # a bare CR
        (b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 443 ", "CRLF"),  # partial, then over-long
        (b"PROXY TCP5 203.0.113.7 10.0.0.1 51000 443\r\n", "protocol"),
        (b"PROXY  TCP4 203.0.113.7 10.0.0.1 51000 443\r\n", "protocol"),  # two spaces
        (b"PROXY TCP4 203.0.113.7 10.0.0.1 51000\r\n", "expected"),
        (b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 443 x\r\n", "expected"),
        (b"PROXY TCP4 203.0.113.256 10.0.0.1 51000 443\r\n", "address"),
        (b"PROXY TCP4 203.0.113.07 10.0.0.1 51000 443\r\n", "address"),  # a leading zero
        (b"PROXY TCP4 2001:db8::7 10.0.0.1 51000 443\r\n", "address"),  # family mismatch
        (b"PROXY TCP6 203.0.113.7 ::1 51000 443\r\n", "address"),  # family mismatch
        (b"PROXY TCP6 fe80::1%eth0 ::1 51000 443\r\n", "zone"),
        (b"PROXY TCP4 203.0.113.7 10.0.0.1 65536 443\r\n", "range"),
        (b"PROXY TCP4 203.0.113.7 10.0.0.1 051000 443\r\n", "port"),  # a leading zero
        (b"PROXY TCP4 203.0.113.7 10.0.0.1 -1 443\r\n", "port"),
        (b"PROXY TCP4 203.0.113.7 10.0.0.1 +1 443\r\n", "port"),
        (b"PROXY TCP4 203.0.113.7 10.0.0.1 \xd9\xa1 443\r\n", "ASCII"),
    ],
)
def test_v1_malformed(data: bytes, reason: str) -> None:
    if reason == "CRLF" and data.endswith(b" "):
        data = data + b"x" * V1_MAX
    with pytest.raises(ProxyProtocolError, match=reason):
        parse_header(data)


def test_v1_longer_than_107_bytes_is_refused() -> None:
    line = b"PROXY UNKNOWN " + b"a" * (V1_MAX - 15) + b"\r\n"
    assert len(line) == V1_MAX + 1
    with pytest.raises(ProxyProtocolError, match="107"):
        parse_header(line)
    # Refused as soon as 107 bytes hold no CRLF, not only when the line ends.
    with pytest.raises(ProxyProtocolError, match="107"):
        parse_header(line[:V1_MAX])
    assert parse_header(line[: V1_MAX - 1]) is None


# -- version 2 ---------------------------------------------------------------------------------


def test_v2_tcp_over_ipv4() -> None:
    header = v2(1, 0x11, IPV4_BLOCK)
    assert parse_header(header + HTTP) == ProxyHeader(
        len(header), 2, ("203.0.113.7", 51000), ("10.0.0.1", 443)
    )


def test_v2_tcp_over_ipv6() -> None:
    header = v2(1, 0x21, IPV6_BLOCK)
    parsed = parse_header(header + HTTP)
    assert parsed == ProxyHeader(len(header), 2, ("2001:db8::7", 51000), ("::1", 443))


def test_v2_tlvs_after_the_addresses_are_skipped() -> None:
    tlvs = b"\x01\x00\x02h2" + b"\x04\x00\x00" + b"\x20\x00\x05\x01\x00\x00\x00\x00"
    header = v2(1, 0x11, IPV4_BLOCK + tlvs)
    parsed = parse_header(header + HTTP)
    assert parsed is not None
    assert parsed.length == len(header) and parsed.source == ("203.0.113.7", 51000)


@pytest.mark.parametrize("family_protocol", [0x00, 0x11, 0x21, 0x31])
def test_v2_local_uses_the_real_peer_and_skips_its_block(family_protocol: int) -> None:
    block = {0x11: IPV4_BLOCK, 0x21: IPV6_BLOCK, 0x31: bytes(216)}.get(family_protocol, b"")
    header = v2(0, family_protocol, block)
    assert parse_header(header + HTTP) == ProxyHeader(len(header), 2, None)


@pytest.mark.parametrize(
    ("family_protocol", "block"),
    [(0x00, b""), (0x00, IPV4_BLOCK), (0x10, IPV4_BLOCK), (0x01, b""), (0x31, bytes(216))],
)
def test_v2_unspec_and_unix_use_the_real_peer(family_protocol: int, block: bytes) -> None:
    header = v2(1, family_protocol, block)
    assert parse_header(header + HTTP) == ProxyHeader(len(header), 2, None)


@pytest.mark.parametrize("size", range(1, 28))
def test_v2_incomplete_needs_more(size: int) -> None:
    header = v2(1, 0x11, IPV4_BLOCK)
    assert parse_header(header[:size]) is None


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (V2_SIGNATURE[:5] + b"\x01", "signature"),
        (V2_SIGNATURE[:-1] + b"X" + b"\x21\x11\x00\x0c" + IPV4_BLOCK, "signature"),
        (V2_SIGNATURE + b"\x11\x11\x00\x0c" + IPV4_BLOCK, "version 1 is not 2"),
        (V2_SIGNATURE + b"\x31\x11\x00\x0c" + IPV4_BLOCK, "version 3 is not 2"),
        (V2_SIGNATURE + b"\x22\x11\x00\x0c" + IPV4_BLOCK, "command"),
        (V2_SIGNATURE + b"\x2f\x11\x00\x0c" + IPV4_BLOCK, "command"),
        (V2_SIGNATURE + b"\x21\x41\x00\x0c" + IPV4_BLOCK, "family"),
        (V2_SIGNATURE + b"\x21\x13\x00\x0c" + IPV4_BLOCK, "transport protocol"),
        (v2(1, 0x12, IPV4_BLOCK), "datagram"),  # UDP on a TCP connection
        (v2(1, 0x22, IPV6_BLOCK), "datagram"),
        (v2(1, 0x11, IPV4_BLOCK[:11]), "too few"),  # an address block too short for IPv4
        (v2(1, 0x21, IPV4_BLOCK), "too few"),  # IPv6 family with an IPv4-sized block
    ],
)
def test_v2_malformed(data: bytes, reason: str) -> None:
    with pytest.raises(ProxyProtocolError, match=reason):
        parse_header(data)


def test_v2_longer_than_536_bytes_is_refused_from_its_fixed_part() -> None:
    fits = v2(1, 0x11, IPV4_BLOCK + bytes(MAX_HEADER - 16 - len(IPV4_BLOCK)))
    assert len(fits) == MAX_HEADER
    parsed = parse_header(fits)
    assert parsed is not None and parsed.length == MAX_HEADER
    too_long = V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", MAX_HEADER - 16 + 1)
    with pytest.raises(ProxyProtocolError, match="536"):
        parse_header(too_long)  # the 16 fixed bytes are enough to say no
    with pytest.raises(ProxyProtocolError, match="536"):
        parse_header(V2_SIGNATURE + b"\x21\x11\xff\xff")


def test_nothing_yet_needs_more() -> None:
    assert parse_header(b"") is None


@pytest.mark.parametrize(
    "header",
    [
        b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 443\r\n",
        b"PROXY UNKNOWN\r\n",
        v2(1, 0x11, IPV4_BLOCK),
        v2(1, 0x21, IPV6_BLOCK + b"\x04\x00\x01x"),
        v2(0, 0x00, b""),
    ],
)
def test_an_incomplete_header_never_claims_bytes_beyond_itself(header: bytes) -> None:
    """What the accept path relies on: while parse_header says "more", every byte given is
    part of the header, and once complete its length is exactly the header's, whatever
    follows it (HTTP, a TLS ClientHello)."""
    for follow in (b"", HTTP, b"\x16\x03\x01\x00\xa5\x01"):
        for size in range(len(header) + len(follow) + 1):
            parsed = parse_header((header + follow)[:size])
            if size < len(header):
                assert parsed is None, size
            else:
                assert parsed is not None and parsed.length == len(header), size
