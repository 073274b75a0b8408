"""The few RFC 6455 pieces the fake backend and the raw test client need.

Framing primitives shared by both sides, and the backend's echo loop.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib

MAX_FRAME = 16 * 1024 * 1024
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA
CONTROL_OPCODES = frozenset({OP_CLOSE, OP_PING, OP_PONG})
DATA_OPCODES = frozenset({OP_CONTINUATION, OP_TEXT, OP_BINARY})


def accept_key(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` value for a client's ``Sec-WebSocket-Key`` (RFC 6455 §4.2.2)."""
    digest = hashlib.sha1((key.strip() + GUID).encode("ascii")).digest()
    return base64.b64encode(digest).decode("ascii")


def apply_mask(data: bytes, mask: bytes) -> bytes:
    """XOR ``data`` with the 4-byte ``mask`` repeated (masking and unmasking are the same)."""
    if not data:
        return b""
    size = len(data)
    key = (mask * (size // 4 + 1))[:size]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(size, "little")


def encode_frame(
    opcode: int, payload: bytes, *, fin: bool = True, mask: bytes | None = None
) -> bytes:
    """One frame; clients must pass a 4-byte ``mask``, servers must not (RFC 6455 §5.1)."""
    first = (0x80 if fin else 0) | opcode
    size = len(payload)
    mask_bit = 0x80 if mask is not None else 0
    if size < 126:
        head = bytes((first, mask_bit | size))
    elif size < 1 << 16:
        head = bytes((first, mask_bit | 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((first, mask_bit | 127)) + size.to_bytes(8, "big")
    if mask is None:
        return head + payload
    return head + mask + apply_mask(payload, mask)


def parse_first_bytes(first: int, second: int) -> tuple[bool, int, bool, int]:
    """``(fin, opcode, masked, length code)`` from a frame's first two bytes.

    A length code of 126 or 127 means a 2- or 8-byte extended length follows.
    """
    return bool(first & 0x80), first & 0x0F, bool(second & 0x80), second & 0x7F


def close_payload(code: int, reason: str = "") -> bytes:
    return code.to_bytes(2, "big") + reason.encode("utf-8")


class WebSocketEcho:
    """Echo data messages back whole; answer pings; answer a close with a close (RFC 6455)."""

    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def run(self) -> None:
        message_opcode: int | None = None
        fragments: list[bytes] = []
        while True:
            try:
                fin, opcode, payload = await self._read_frame()
            except _ProtocolError as exc:
                await self._send(OP_CLOSE, close_payload(exc.code, str(exc)))
                return
            if opcode == OP_CLOSE:
                await self._send(OP_CLOSE, payload[:2])
                return
            if opcode == OP_PING:
                await self._send(OP_PONG, payload)
                continue
            if opcode == OP_PONG:
                continue
            if opcode in (OP_TEXT, OP_BINARY) and message_opcode is None:
                message_opcode, fragments = opcode, [payload]
            elif opcode == OP_CONTINUATION and message_opcode is not None:
                fragments.append(payload)
            else:
                await self._send(OP_CLOSE, close_payload(1002, "unexpected opcode"))
                return
            if fin:
                await self._send(message_opcode, b"".join(fragments))
                message_opcode, fragments = None, []

    async def _read_frame(self) -> tuple[bool, int, bytes]:
        first, second = await self.reader.readexactly(2)
        fin, opcode, masked, size = parse_first_bytes(first, second)
        if first & 0x70:
            raise _ProtocolError(1002, "no extension was negotiated")
        if not masked:
            raise _ProtocolError(1002, "client frames must be masked")
        if size == 126:
            size = int.from_bytes(await self.reader.readexactly(2), "big")
        elif size == 127:
            size = int.from_bytes(await self.reader.readexactly(8), "big")
        if size > MAX_FRAME:
            raise _ProtocolError(1009, "frame too large")
        mask = await self.reader.readexactly(4)
        return fin, opcode, apply_mask(await self.reader.readexactly(size), mask)

    async def _send(self, opcode: int, payload: bytes) -> None:
        self.writer.write(encode_frame(opcode, payload))
        await self.writer.drain()


class _ProtocolError(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
