"""The PROXY protocol header (versions 1 and 2, as HAProxy's specification defines them), sans-IO.

Theory of operation
-------------------
With ``entrypoint.proxy_protocol: true`` every connection starts with one header, sent by the
load balancer in front of tdproxy, that names the client it accepted the connection from.
:func:`parse_header` is given the bytes received so far and says one of three things: the
header is complete (a :class:`ProxyHeader`: how many bytes it took and the client's address, or
None when the balancer says to use the connection's own peer), more bytes are needed (``None``),
or the bytes cannot be a valid header (:class:`ProxyProtocolError`). It never looks past the
header's end, so the caller can take exactly the header off the socket and leave what follows
(HTTP, or a TLS handshake) to the connection.

Invariants: a result of "more bytes needed" means every byte given so far belongs to the header
(so the caller may take them off the socket); no header is longer than ``MAX_HEADER`` bytes
(v2) or ``V1_MAX`` bytes (v1); anything the specification does not allow is an error, never a
guess (section 2 of the specification: "any sequence which does not exactly match the protocol
must be discarded").

Version 1 is one US-ASCII line: ``PROXY TCP4 <src> <dst> <sport> <dport>\\r\\n`` (or ``TCP6``),
at most 107 bytes, single spaces, no leading zeros, or ``PROXY UNKNOWN ...\\r\\n``, for which the
rest of the line is ignored and the connection's own peer is used. Version 2 is binary: a
12-byte signature, a version/command byte (``0x20`` LOCAL, ``0x21`` PROXY), a family/protocol
byte, a 16-bit length, the address block and optional TLVs (skipped). LOCAL (a balancer's health
check) and the UNSPEC family or protocol, and AF_UNIX, use the connection's own peer; a DGRAM
protocol cannot arrive on a stream connection and is refused.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import NamedTuple

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest valid line, CRLF included ("PROXY UNKNOWN" with IPv6 fields)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16  # signature, version/command, family/protocol, length
# The largest header accepted: what the specification lets a receiver expect to fit in one
# segment (576 - 40), and what the caller reads at most.
MAX_HEADER = 536

_LOCAL, _PROXY = 0x0, 0x1
_UNSPEC, _INET, _INET6, _UNIX = 0x0, 0x1, 0x2, 0x3
_STREAM, _DGRAM = 0x1, 0x2
_ADDRESS_BYTES = {_INET: 12, _INET6: 36}


class ProxyProtocolError(ValueError):
    """The bytes cannot begin a valid PROXY protocol header."""


class ProxyHeader(NamedTuple):
    length: int  # bytes the header takes on the wire
    version: int  # 1 or 2
    source: tuple[str, int] | None  # the client's address and port; None: use the real peer
    destination: tuple[str, int] | None = None


def parse_header(data: bytes) -> ProxyHeader | None:
    """The header at the start of ``data``; None while more bytes are needed."""
    if not data:
        return None
    first = data[:1]
    if first == b"P":
        return _parse_v1(data)
    if first == b"\r":
        return _parse_v2(data)
    raise ProxyProtocolError("no PROXY protocol signature")


# -- version 1 ---------------------------------------------------------------------------------


def _parse_v1(data: bytes) -> ProxyHeader | None:
    prefix = data[: len(V1_PREFIX)]
    if not V1_PREFIX.startswith(prefix):
        raise ProxyProtocolError("no PROXY protocol signature")
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        line = data[:V1_MAX]
        if b"\n" in line or b"\r" in line[:-1]:
            raise ProxyProtocolError("v1: a line must end with CRLF")
        if len(data) >= V1_MAX:
            raise ProxyProtocolError(f"v1: no CRLF within {V1_MAX} bytes")
        return None
    line = data[:end]
    if b"\n" in line or b"\r" in line:
        raise ProxyProtocolError("v1: a line must end with CRLF")
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyProtocolError("v1: not US-ASCII") from None
    length = end + 2
    fields = text.split(" ")
    if len(fields) >= 2 and fields[1] == "UNKNOWN":
        return ProxyHeader(length, 1, None)  # the rest of the line is ignored
    if len(fields) != 6:
        raise ProxyProtocolError("v1: expected PROXY, protocol, two addresses and two ports")
    _, family, source, destination, source_port, destination_port = fields
    if family == "TCP4":
        kind: type[ipaddress.IPv4Address | ipaddress.IPv6Address] = ipaddress.IPv4Address
    elif family == "TCP6":
        kind = ipaddress.IPv6Address
    else:
        raise ProxyProtocolError(f"v1: unknown protocol {family[:16]!r}")
    return ProxyHeader(
        length,
        1,
        (_v1_address(source, kind, family), _v1_port(source_port)),
        (_v1_address(destination, kind, family), _v1_port(destination_port)),
    )


def _v1_address(
    text: str, kind: type[ipaddress.IPv4Address | ipaddress.IPv6Address], family: str
) -> str:
    if "%" in text:
        raise ProxyProtocolError("v1: an address with a zone is not allowed")
    try:
        return str(kind(text))
    except ValueError:
        raise ProxyProtocolError(f"v1: {text[:48]!r} is not a {family} address") from None


def _v1_port(text: str) -> int:
    if not text.isdigit() or not text.isascii() or (len(text) > 1 and text[0] == "0"):
        raise ProxyProtocolError(f"v1: {text[:8]!r} is not a port")
    port = int(text)
    if port > 65535:
        raise ProxyProtocolError(f"v1: port {port} is out of range")
    return port


# -- version 2 ---------------------------------------------------------------------------------


def _parse_v2(data: bytes) -> ProxyHeader | None:
    signature = data[: len(V2_SIGNATURE)]
    if not V2_SIGNATURE.startswith(signature):
        raise ProxyProtocolError("no PROXY protocol signature")
    if len(data) > len(V2_SIGNATURE):
        version_command = data[12]
        if version_command >> 4 != 2:
            raise ProxyProtocolError(f"v2: version {version_command >> 4} is not 2")
        if version_command & 0xF not in (_LOCAL, _PROXY):
            raise ProxyProtocolError(f"v2: unknown command {version_command & 0xF:#x}")
    if len(data) > 13:
        family, protocol = data[13] >> 4, data[13] & 0xF
        if family > _UNIX:
            raise ProxyProtocolError(f"v2: unknown address family {family:#x}")
        if protocol > _DGRAM:
            raise ProxyProtocolError(f"v2: unknown transport protocol {protocol:#x}")
    if len(data) < V2_FIXED:
        return None
    (address_length,) = struct.unpack_from("!H", data, 14)
    length = V2_FIXED + address_length
    if length > MAX_HEADER:
        raise ProxyProtocolError(f"v2: a {length}-byte header is longer than {MAX_HEADER}")
    if len(data) < length:
        return None
    if data[12] & 0xF == _LOCAL:
        return ProxyHeader(length, 2, None)  # the balancer's own connection (a health check)
    family, protocol = data[13] >> 4, data[13] & 0xF
    if protocol == _DGRAM:
        raise ProxyProtocolError("v2: a datagram protocol on a stream connection")
    if family not in _ADDRESS_BYTES or protocol == _UNSPEC:
        return ProxyHeader(length, 2, None)  # UNSPEC or AF_UNIX: use the real peer
    if address_length < _ADDRESS_BYTES[family]:
        raise ProxyProtocolError(
            f"v2: {address_length} address bytes are too few for "
            f"{'IPv4' if family == _INET else 'IPv6'}"
        )
    size = 4 if family == _INET else 16
    block = data[V2_FIXED:]
    source = ipaddress.ip_address(block[:size])
    destination = ipaddress.ip_address(block[size : 2 * size])
    source_port, destination_port = struct.unpack_from("!HH", block, 2 * size)
    # Whatever follows the addresses (TLVs) is part of the header and skipped.
    return ProxyHeader(length, 2, (str(source), source_port), (str(destination), destination_port))
