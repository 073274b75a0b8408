"""The fake backend's HTTP/1.x request reader: strict parsing of heads, streaming of bodies.

Written by hand, apart from tdproxy's code, and strict where a lenient server would hide a proxy's
mistakes: obsolete line folding, whitespace before a header colon, conflicting Content-Lengths and
non-chunked request transfer codings are all 400s.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import parse_qsl, urlsplit

from tests.fakes.bodies import PIECE

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_VERSION = re.compile(r"^HTTP/1\.[01]$")
_HEX = re.compile(rb"^[0-9A-Fa-f]+$")


class BadRequest(Exception):
    """The peer sent something that is not a valid HTTP/1.x request; answer 400 and close."""

    status = 400


class HeadTooLarge(BadRequest):
    status = 431


class ClientGone(Exception):
    """The peer closed or reset the connection mid-request."""


def parse_head(raw: bytes) -> tuple[str, str, str, list[tuple[str, str]]]:
    """``(method, target, version, headers)`` from a request head ending in CRLF CRLF."""
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise BadRequest(f"malformed request line {lines[0]!r}")
    method, target, version = parts
    if not _TOKEN.match(method) or not target or not _VERSION.match(version):
        raise BadRequest(f"malformed request line {lines[0]!r}")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line:
            continue
        if line[0] in " \t":
            raise BadRequest("obsolete line folding")  # RFC 9112 §5.2
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.match(name):  # no whitespace before the colon: RFC 9112 §5.1
            raise BadRequest(f"malformed header line {line!r}")
        headers.append((name, value.strip(" \t")))
    return method, target, version, headers


def split_target(target: str) -> tuple[str, dict[str, str]]:
    """The path (for routing) and query of an origin-form or absolute-form request target."""
    if target.startswith("/"):
        path, _, query = target.partition("?")
    elif "://" in target:
        parts = urlsplit(target)
        path, query = parts.path or "/", parts.query
    else:
        path, query = target, ""  # "*" or authority-form
    return path, dict(parse_qsl(query, keep_blank_values=True))


class Body:
    """A request body, read on demand in pieces; ``consume()`` hashes it without holding it."""

    __slots__ = ("_chunked", "_digest", "_reader", "_remaining", "done", "trailers")

    def __init__(self, reader: asyncio.StreamReader, *, length: int, chunked: bool) -> None:
        self._reader = reader
        self._remaining = length
        self._chunked = chunked
        self._digest: tuple[int, str] | None = None
        self.done = not chunked and length == 0
        self.trailers: list[tuple[str, str]] = []

    async def pieces(self) -> AsyncIterator[bytes]:
        if self.done:
            return
        source = self._chunked_pieces() if self._chunked else self._fixed_pieces()
        async for piece in source:
            yield piece
        self.done = True

    async def consume(self) -> tuple[int, str]:
        """``(length, sha256 hex)`` of the body; reads it the first time, remembers after."""
        if self._digest is None:
            digest = hashlib.sha256()
            size = 0
            async for piece in self.pieces():
                digest.update(piece)
                size += len(piece)
            self._digest = (size, digest.hexdigest())
        return self._digest

    async def _fixed_pieces(self) -> AsyncIterator[bytes]:
        while self._remaining > 0:
            piece = await self._reader.read(min(self._remaining, PIECE))
            if not piece:
                raise ClientGone("body cut short")
            self._remaining -= len(piece)
            yield piece

    async def _chunked_pieces(self) -> AsyncIterator[bytes]:
        while True:
            line = await self._reader.readuntil(b"\r\n")
            size_text = line[:-2].split(b";", 1)[0].strip(b" \t")
            if not _HEX.match(size_text):
                raise BadRequest(f"bad chunk size line {line!r}")
            remaining = int(size_text, 16)
            if remaining == 0:
                break
            while remaining > 0:
                piece = await self._reader.read(min(remaining, PIECE))
                if not piece:
                    raise ClientGone("chunk cut short")
                remaining -= len(piece)
                yield piece
            if await self._reader.readexactly(2) != b"\r\n":
                raise BadRequest("chunk data not followed by CRLF")
        while (line := await self._reader.readuntil(b"\r\n")) != b"\r\n":
            name, sep, value = line[:-2].decode("latin-1").partition(":")
            if not sep or not _TOKEN.match(name):
                raise BadRequest(f"malformed trailer line {line!r}")
            self.trailers.append((name, value.strip(" \t")))


@dataclass(slots=True)
class Request:
    method: str
    target: str  # exactly as received
    version: str
    headers: list[tuple[str, str]]
    path: str
    query: dict[str, str]
    keep_alive: bool
    body: Body

    def header(self, name: str) -> str | None:
        lowered = name.lower()
        return next((v for k, v in self.headers if k.lower() == lowered), None)

    def tokens(self, name: str) -> list[str]:
        """The comma-separated, lower-cased tokens of every ``name`` header, in order."""
        lowered = name.lower()
        return [
            token.strip().lower()
            for key, value in self.headers
            if key.lower() == lowered
            for token in value.split(",")
            if token.strip()
        ]

    def int_param(self, name: str, default: int) -> int:
        text = self.query.get(name)
        if text is None:
            return default
        try:
            return int(text)
        except ValueError:
            raise BadRequest(f"query parameter {name}={text!r} is not an integer") from None

    @property
    def is_head(self) -> bool:
        return self.method == "HEAD"


def build_request(raw: bytes, reader: asyncio.StreamReader) -> Request:
    method, target, version, headers = parse_head(raw)
    path, query = split_target(target)
    probe = Request(
        method, target, version, headers, path, query, True, Body(reader, length=0, chunked=False)
    )
    connection = probe.tokens("connection")
    keep_alive = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
    codings = probe.tokens("transfer-encoding")
    lengths = probe.tokens("content-length")
    if codings:
        if codings[-1] != "chunked":
            raise BadRequest("a request body's last transfer coding must be chunked")
        if lengths:
            keep_alive = False  # RFC 9112 §6.1: both present, close after the response
        body = Body(reader, length=0, chunked=True)
    elif lengths:
        if len(set(lengths)) != 1 or not lengths[0].isdigit():
            raise BadRequest(f"invalid Content-Length {lengths!r}")
        body = Body(reader, length=int(lengths[0]), chunked=False)
    else:
        body = probe.body
    probe.keep_alive = keep_alive
    probe.body = body
    return probe


def status_line(status: int) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Status"
    return f"HTTP/1.1 {status} {phrase}\r\n".encode("latin-1")


def encode_head(status: int, headers: Iterable[tuple[str, str]]) -> bytes:
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers)
    return status_line(status) + lines.encode("latin-1") + b"\r\n"
