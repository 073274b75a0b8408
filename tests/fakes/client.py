"""A raw HTTP/1.1 client over one blocking socket, for tests that care about exact bytes.

``http.client`` hides what tests of a proxy need to see: interim 1xx responses, a reset in the
middle of a body, whether the connection stayed open, pipelining, absolute-form targets. This
client sends whatever bytes it is given and parses responses strictly, with a deadline on every
read. It also speaks just enough WebSocket to drive the fake backend's echo endpoint.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import urlsplit

from tests.fakes.websocket import (
    OP_CLOSE,
    close_payload,
    encode_frame,
    parse_first_bytes,
)

DEFAULT_TIMEOUT = 10.0
ClosedBy = Literal["eof", "reset"]
_RECV = 64 * 1024


class IncompleteResponse(ConnectionError):
    """The peer closed the connection before a complete response arrived."""

    def __init__(self, message: str, partial: bytes) -> None:
        super().__init__(f"{message} after {len(partial)} bytes: {partial[:200]!r}")
        self.partial = partial


@dataclass
class Response:
    status: int
    reason: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    interim: list[Response] = field(default_factory=list)  # 1xx responses that came first

    def header(self, name: str) -> str | None:
        lowered = name.lower()
        return next((v for k, v in self.headers if k.lower() == lowered), None)

    def header_values(self, name: str) -> list[str]:
        lowered = name.lower()
        return [v for k, v in self.headers if k.lower() == lowered]

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")


def encode_request(
    method: str,
    target: str,
    *,
    host: str | None,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes | None = None,
    version: str = "HTTP/1.1",
) -> bytes:
    """Request bytes; adds ``Host`` (unless ``host`` is None) and a Content-Length for ``body``."""
    lines = [f"{method} {target} {version}"]
    header_list = list(headers)
    names = {name.lower() for name, _ in header_list}
    if host is not None and "host" not in names:
        lines.append(f"Host: {host}")
    lines += [f"{name}: {value}" for name, value in header_list]
    if body is not None and "content-length" not in names and "transfer-encoding" not in names:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def encode_chunked(pieces: Iterable[bytes], trailers: Iterable[tuple[str, str]] = ()) -> bytes:
    """A chunked body: one chunk per non-empty piece, the last chunk, optional trailers."""
    out = bytearray()
    for piece in pieces:
        if piece:
            out += b"%x\r\n%b\r\n" % (len(piece), piece)
    out += b"0\r\n"
    for name, value in trailers:
        out += f"{name}: {value}\r\n".encode("latin-1")
    return bytes(out + b"\r\n")


class RawClient:
    """One TCP connection. Every read waits at most ``timeout`` seconds (``TimeoutError``)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        source: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        # ``source``: the local address to connect from (another loopback address, say).
        self.sock = socket.create_connection(
            (host, port), timeout=timeout, source_address=(source, 0) if source else None
        )
        self._buffer = bytearray()

    @classmethod
    def for_url(cls, url: str, *, timeout: float = DEFAULT_TIMEOUT) -> RawClient:
        parts = urlsplit(url)
        return cls(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    @property
    def authority(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def buffered(self) -> bytes:
        """Bytes received but not yet taken by a read (for failure messages)."""
        return bytes(self._buffer)

    # -- sending ------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_request(
        self,
        method: str,
        target: str,
        *,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes | None = None,
        version: str = "HTTP/1.1",
    ) -> None:
        self.send(
            encode_request(
                method, target, host=self.authority, headers=headers, body=body, version=version
            )
        )

    def request(
        self,
        method: str,
        target: str,
        *,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes | None = None,
        version: str = "HTTP/1.1",
    ) -> Response:
        self.send_request(method, target, headers=headers, body=body, version=version)
        return self.read_response(head_request=method == "HEAD")

    # -- receiving ----------------------------------------------------------------------------

    def _fill(self) -> bool:
        """Read more into the buffer; False at EOF. Raises ConnectionResetError on a reset."""
        data = self.sock.recv(_RECV)
        if not data:
            return False
        self._buffer += data
        return True

    def _take(self, size: int) -> bytes:
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def read_until(self, marker: bytes) -> bytes:
        """Bytes up to and including ``marker``."""
        while (index := self._buffer.find(marker)) < 0:
            if not self._fill():
                raise IncompleteResponse(f"EOF before {marker!r}", bytes(self._buffer))
        return self._take(index + len(marker))

    def read_exactly(self, size: int) -> bytes:
        while len(self._buffer) < size:
            if not self._fill():
                raise IncompleteResponse(f"EOF before {size} bytes", bytes(self._buffer))
        return self._take(size)

    def read_to_eof(self) -> bytes:
        """Everything until the peer closes (raises ConnectionResetError on a reset)."""
        while self._fill():
            pass
        return self._take(len(self._buffer))

    def read_head(self) -> Response:
        """The next response head, body not read."""
        raw = self.read_until(b"\r\n\r\n").decode("latin-1")
        status_line, *lines = raw[:-4].split("\r\n")
        version, _, rest = status_line.partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/") or not code.isdigit():
            raise ValueError(f"malformed status line {status_line!r}")
        headers = []
        for line in lines:
            name, sep, value = line.partition(":")
            if not sep:
                raise ValueError(f"malformed header line {line!r}")
            headers.append((name, value.strip(" \t")))
        return Response(int(code), reason, version, headers)

    def read_body(self, response: Response) -> bytes:
        """The body framed as ``response``'s head says (RFC 9112 §6.3)."""
        codings = [
            c.strip().lower()
            for v in response.header_values("transfer-encoding")
            for c in v.split(",")
        ]
        if codings and codings[-1] == "chunked":
            return self._read_chunked()
        length = response.header("content-length")
        if length is not None:
            return self.read_exactly(int(length))
        return self.read_to_eof()

    def _read_chunked(self) -> bytes:
        body = bytearray()
        while True:
            size = int(self.read_until(b"\r\n")[:-2].split(b";", 1)[0], 16)
            if size == 0:
                break
            body += self.read_exactly(size)
            if self.read_exactly(2) != b"\r\n":
                raise ValueError("chunk data not followed by CRLF")
        while self.read_until(b"\r\n") != b"\r\n":
            pass  # trailers
        return bytes(body)

    def read_response(self, *, head_request: bool = False) -> Response:
        """The next final response (or 101), with 1xx interim responses collected on the way."""
        interim: list[Response] = []
        while True:
            response = self.read_head()
            if 100 <= response.status < 200 and response.status != 101:
                interim.append(response)
                continue
            break
        response.interim = interim
        if not (head_request or response.status in (101, 204, 304)):
            response.body = self.read_body(response)
        return response

    def read_until_closed(self, timeout: float | None = None) -> tuple[bytes, ClosedBy]:
        """Read until the peer closes; returns the bytes that arrived and how it closed:
        ``"eof"`` (FIN) or ``"reset"`` (RST). ``TimeoutError`` if it stays open.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        how: ClosedBy = "eof"
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"connection still open after {timeout}s")
                self.sock.settimeout(remaining)
                try:
                    if not self._fill():
                        break
                except ConnectionResetError:
                    how = "reset"
                    break
        finally:
            self.sock.settimeout(self.timeout)
        return self._take(len(self._buffer)), how

    # -- WebSocket ----------------------------------------------------------------------------

    def websocket_handshake(
        self, target: str = "/ws", headers: Iterable[tuple[str, str]] = ()
    ) -> Response:
        """Send an upgrade request; returns the response (101 when the upgrade succeeded)."""
        key = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455's example; any 16 random bytes would do
        upgrade = [
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", key),
            ("Sec-WebSocket-Version", "13"),
        ]
        return self.request("GET", target, headers=[*upgrade, *headers])

    def ws_send(self, opcode: int, payload: bytes, *, fin: bool = True) -> None:
        self.send(encode_frame(opcode, payload, fin=fin, mask=os.urandom(4)))

    def ws_recv(self) -> tuple[int, bytes]:
        """The next message's ``(opcode, payload)``, continuation frames joined."""
        fin, opcode, payload = self._ws_frame()
        parts = [payload]
        while not fin:
            fin, _, payload = self._ws_frame()
            parts.append(payload)
        return opcode, b"".join(parts)

    def _ws_frame(self) -> tuple[bool, int, bytes]:
        first, second = self.read_exactly(2)
        fin, opcode, masked, size = parse_first_bytes(first, second)
        if masked:
            raise ValueError("a server must not mask its frames (RFC 6455 §5.1)")
        if size == 126:
            size = int.from_bytes(self.read_exactly(2), "big")
        elif size == 127:
            size = int.from_bytes(self.read_exactly(8), "big")
        return fin, opcode, self.read_exactly(size)

    def ws_close(self, code: int = 1000) -> tuple[int, bytes]:
        """Start the closing handshake; returns the peer's close frame."""
        self.ws_send(OP_CLOSE, close_payload(code))
        return self.ws_recv()


def request(
    url: str,
    method: str = "GET",
    *,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Response:
    """One request on a fresh connection, closed afterwards. ``url`` is ``http://host:port/...``."""
    parts = urlsplit(url)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    with RawClient.for_url(url, timeout=timeout) as client:
        return client.request(method, target, headers=headers, body=body)


_SAMPLE = re.compile(r"^(?P<name>[A-Za-z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metric(admin_url: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``, from ``/metrics``."""
    total = 0.0
    for line in request(admin_url + "/metrics").text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or match["name"] != name:
            continue
        found = dict(_LABEL.findall(match["labels"] or ""))
        if all(found.get(key) == value for key, value in labels.items()):
            total += float(match["value"])
    return total
