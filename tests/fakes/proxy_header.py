"""PROXY protocol headers as a load balancer sends them (v1 text, v2 binary), for tests."""

from __future__ import annotations

import ipaddress
import struct

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v1(source: str, destination: str, source_port: int = 51000, port: int = 80) -> bytes:
    family = "TCP6" if ":" in source else "TCP4"
    return f"PROXY {family} {source} {destination} {source_port} {port}\r\n".encode()


def v2(
    source: str,
    destination: str,
    source_port: int = 51000,
    port: int = 80,
    *,
    tlvs: bytes = b"",
) -> bytes:
    """A v2 PROXY (command 1) header for TCP over IPv4 or IPv6, with optional TLV bytes."""
    src, dst = ipaddress.ip_address(source), ipaddress.ip_address(destination)
    family = 0x11 if src.version == 4 else 0x21
    block = src.packed + dst.packed + struct.pack("!HH", source_port, port) + tlvs
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(block)) + block


def v2_local(block: bytes = b"") -> bytes:
    """A v2 LOCAL header (a balancer's own health check); ``block`` must still be skipped."""
    return V2_SIGNATURE + b"\x20\x00" + struct.pack("!H", len(block)) + block
