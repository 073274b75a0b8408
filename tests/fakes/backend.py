"""A fake backend: a small HTTP/1.1 server that can be told to misbehave, for integration tests.

Run it as its own process::

    python -m tests.fakes.backend --name blue --port 0

It prints ``LISTENING <port>`` once bound, then serves until SIGTERM/SIGINT (or, with
``--exit-on-stdin-eof``, until its stdin closes, so a crashed test run leaves no orphans).

Theory of operation: hand-written on asyncio streams, not on tdproxy's code and not on a framework,
because the fault modes need byte-level control (partial heads, resets, missing bodies). Each
connection runs one loop: read a request head, pick a handler by path, let it answer, repeat while
the connection is keep-alive. Request bodies (Content-Length or chunked) are read in pieces of at
most ``PIECE`` bytes and hashed as they stream, never held whole. Every response carries
``X-Backend: <name>`` and echoes ``X-Request-Id``; ``HEAD`` works on every path. Request parsing
is in :mod:`tests.fakes.http1`, the deterministic bodies in :mod:`tests.fakes.bodies`, the
WebSocket echo in :mod:`tests.fakes.websocket`.

Paths (query parameters in brackets):
    /  and unknown paths   200 ``hello from <name>``
    /echo                  JSON description of the request as received
    /status/<code>         that status
    /slow [ms]             wait before the response head
    /stream [bytes, chunked, chunk, seed, pause_ms]  deterministic pseudo-random body +
                           X-Body-Sha256; ``pause_ms`` waits that long before each piece after
                           the head (a slowly streaming response)
    /upload                JSON ``body_len`` and ``body_sha256`` of the request body
    /continue              like /upload, sending ``100 Continue`` first when asked to
    /head-test             1000-byte body (HEAD: same head, no body)
    /nolength [bytes, seed] body delimited by closing the connection
    /reset-headers         part of a head, then RST
    /reset-body [bytes]    head promising more than ``bytes`` body bytes, those bytes, then RST
    /close-after-headers   head with Content-Length: 100, then FIN
    /hang                  never answers
    /garbage               non-HTTP bytes, then FIN
    /ws                    WebSocket echo
    /health                200 ``ok`` unless changed through /_control/health
    /_control/health [status, hang]  (POST) change /health
    /_control/faults [fail_every, status, delay_ms]  (POST) every ``fail_every``-th answer on
                           ``/`` and unknown paths gets ``status`` (default 500; 0 = never), and
                           each of those answers waits ``delay_ms`` first
    /_control/stats        JSON counters;  /_control/reset (POST) zeroes them
Any path takes ``close=1`` to answer with ``Connection: close`` and close afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import signal
import socket
import struct
import sys
import termios
import threading
import traceback
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from tests.fakes.bodies import PIECE, split_pieces, stream_blocks, stream_sha256
from tests.fakes.http1 import (
    BadRequest,
    ClientGone,
    HeadTooLarge,
    Request,
    build_request,
    encode_head,
)
from tests.fakes.websocket import WebSocketEcho, accept_key

HEAD_LIMIT = 1024 * 1024  # a request head larger than this gets 431
HEAD_TEST_BODY = b"0123456789" * 100
GARBAGE = b"SSH-2.0-NotHTTP\r\n\x00\x01\x02\xfe\xff this is not an HTTP response\r\n\r\n"
PARTIAL_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/pl"
REQUEST_IDS_KEPT = 10_000

_NO_BODY_STATUSES = frozenset({204, 304})


# ---------------------------------------------------------------------------------------------
# Observed state shared by all connections


@dataclass
class Health:
    status: int = 200
    hang: bool = False


@dataclass
class Faults:
    """Injected into the plain answers (``/`` and unknown paths): a share of errors, a delay."""

    fail_every: int = 0  # every n-th plain answer fails; 0 = none
    status: int = 500
    delay_ms: int = 0
    answered: int = 0

    def next_status(self) -> int:
        self.answered += 1
        if self.fail_every and self.answered % self.fail_every == 0:
            return self.status
        return 200


@dataclass
class Stats:
    """Counters for ``/_control/stats``. ``/_control`` requests are never counted.

    Nor are control connections (those whose first request is a ``/_control`` one) in
    ``connections_total`` and ``connections_open``, so a test's own stats queries leave the
    counts as the proxy made them. A connection counts from its accept, before any request.
    """

    requests_total: int = 0
    requests_by_path: Counter[str] = field(default_factory=Counter)
    request_ids: deque[str] = field(default_factory=lambda: deque(maxlen=REQUEST_IDS_KEPT))
    connections_total: int = 0

    def reset(self) -> None:
        self.requests_total = 0
        self.requests_by_path.clear()
        self.request_ids.clear()
        self.connections_total = 0

    def record(self, request: Request) -> None:
        self.requests_total += 1
        self.requests_by_path[request.path] += 1
        request_id = request.header("x-request-id")
        if request_id is not None:
            self.request_ids.append(request_id)


@dataclass
class Settings:
    name: str
    accept_then_close: bool = False
    garbage: bool = False
    keepalive_timeout: float | None = None


@dataclass
class ServerState:
    settings: Settings
    health: Health = field(default_factory=Health)
    faults: Faults = field(default_factory=Faults)
    stats: Stats = field(default_factory=Stats)
    connections: set[Connection] = field(default_factory=set)

    def connections_open(self) -> int:
        return sum(1 for conn in self.connections if conn.counted)


# ---------------------------------------------------------------------------------------------
# Connections and handlers

Handler = Callable[["Connection", Request], Awaitable[bool]]


def _unsent_bytes(sock: Any) -> int:
    """Bytes the kernel still holds in the socket's send queue (Linux; 0 where unknown)."""
    request = getattr(termios, "TIOCOUTQ", None)
    if request is None:
        return 0
    try:
        result = fcntl.ioctl(sock.fileno(), request, struct.pack("i", 0))
    except OSError:
        return 0
    return int(struct.unpack("i", result)[0])


class Connection:
    __slots__ = ("counted", "peer", "reader", "requests", "state", "writer")

    def __init__(
        self, state: ServerState, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.state = state
        self.reader = reader
        self.writer = writer
        host, port = writer.get_extra_info("peername")[:2]
        self.peer = (str(host), int(port))
        self.counted = True  # until the first request shows this to be a control connection
        self.requests = 0

    def __repr__(self) -> str:
        return f"<Connection peer={self.peer} requests={self.requests} counted={self.counted}>"

    @property
    def name(self) -> str:
        return self.state.settings.name

    # -- the connection loop ------------------------------------------------------------------

    async def serve(self) -> None:
        settings = self.state.settings
        if settings.accept_then_close:
            return
        if settings.garbage:
            with contextlib.suppress(asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                await self.reader.readuntil(b"\r\n\r\n")
            await self.send_raw(GARBAGE)
            return
        while True:
            raw = await self._read_head()
            if raw is None:
                return
            try:
                request = build_request(raw, self.reader)
            except BadRequest as exc:
                await self._reject(exc)
                return
            self._note(request)
            try:
                keep_alive = await self._dispatch(request)
                if keep_alive and not request.body.done:
                    await request.body.consume()  # the next request starts after this body
            except BadRequest as exc:
                await self._reject(exc)
                return
            if not keep_alive:
                return

    async def _read_head(self) -> bytes | None:
        """The next request head, or None when the peer closes (or idles out) between requests."""
        timeout = self.state.settings.keepalive_timeout
        while True:
            try:
                raw = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
            except (asyncio.IncompleteReadError, TimeoutError):
                return None
            except asyncio.LimitOverrunError:
                await self._reject(HeadTooLarge("request head too large"))
                return None
            raw = raw.lstrip(b"\r\n")  # RFC 9112 §2.2: ignore empty lines before a request
            if raw:
                return raw

    def _note(self, request: Request) -> None:
        self.requests += 1
        control = request.path.startswith("/_control/")
        stats = self.state.stats
        if self.requests == 1 and control:
            self.counted = False
            stats.connections_total -= 1
        if not control:
            stats.record(request)

    async def _dispatch(self, request: Request) -> bool:
        handler = ROUTES.get(request.path)
        if handler is None:
            if request.path.startswith("/status/"):
                handler = Connection.status
            elif request.path.startswith("/_control/"):
                handler = Connection.control
            else:
                handler = Connection.hello
        if handler is not Connection.expect_continue:
            await request.body.consume()
        return await handler(self, request)

    async def _reject(self, error: BadRequest) -> None:
        body = f"{error}\n".encode()
        headers = [
            ("X-Backend", self.name),
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ]
        await self.send_raw(encode_head(error.status, headers) + body)

    # -- writing ------------------------------------------------------------------------------

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def base_headers(self, request: Request, *extra: tuple[str, str]) -> list[tuple[str, str]]:
        """``X-Backend``, the echoed ``X-Request-Id``, then ``extra``."""
        headers = [("X-Backend", self.name)]
        request_id = request.header("x-request-id")
        if request_id is not None:
            headers.append(("X-Request-Id", request_id))
        headers.extend(extra)
        return headers

    def keep_alive_for(self, request: Request) -> bool:
        return request.keep_alive and request.query.get("close") != "1"

    def connection_header(self, request: Request, keep_alive: bool) -> list[tuple[str, str]]:
        if not keep_alive:
            return [("Connection", "close")]
        if request.version == "HTTP/1.0":
            return [("Connection", "keep-alive")]
        return []

    async def respond(
        self,
        request: Request,
        status: int,
        body: bytes = b"",
        *,
        content_type: str = "text/plain; charset=utf-8",
        headers: Iterable[tuple[str, str]] = (),
    ) -> bool:
        """A complete response with a Content-Length (none for 204/304); True if keep-alive."""
        keep_alive = self.keep_alive_for(request)
        head = self.base_headers(request)
        if status not in _NO_BODY_STATUSES:
            head += [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        else:
            body = b""
        head += headers
        head += self.connection_header(request, keep_alive)
        await self.send_raw(encode_head(status, head) + (b"" if request.is_head else body))
        return keep_alive

    async def respond_json(self, request: Request, payload: object, status: int = 200) -> bool:
        body = json.dumps(payload).encode()
        return await self.respond(request, status, body, content_type="application/json")

    async def reset(self) -> None:
        """Abort the connection with a TCP RST once what was written has left the send queue."""
        await self.writer.drain()
        transport = self.writer.transport
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2.0
        sock = self.writer.get_extra_info("socket")
        while loop.time() < deadline and (
            transport.get_write_buffer_size() or (sock is not None and _unsent_bytes(sock))
        ):
            await asyncio.sleep(0.002)  # polling the kernel queue; there is no event for it
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()

    async def wait_for_peer_close(self) -> None:
        while await self.reader.read(PIECE):
            pass

    # -- handlers: each answers one request and returns whether the connection may go on ------

    async def hello(self, request: Request) -> bool:
        faults = self.state.faults
        if faults.delay_ms:
            await asyncio.sleep(faults.delay_ms / 1000)
        status = faults.next_status()
        return await self.respond(request, status, f"hello from {self.name}\n".encode())

    async def echo(self, request: Request) -> bool:
        body_len, body_sha256 = await request.body.consume()
        return await self.respond_json(
            request,
            {
                "backend": self.name,
                "method": request.method,
                "path": request.target,
                "version": request.version,
                "headers": [list(pair) for pair in request.headers],
                "body_len": body_len,
                "body_sha256": body_sha256,
                "trailers": [list(pair) for pair in request.body.trailers],
                "peer": list(self.peer),
            },
        )

    async def status(self, request: Request) -> bool:
        code_text = request.path.removeprefix("/status/")
        if not code_text.isdigit() or not 200 <= int(code_text) <= 599:
            raise BadRequest(f"/status/ needs a final status code 200-599, not {code_text!r}")
        code = int(code_text)
        return await self.respond(request, code, f"status {code} from {self.name}\n".encode())

    async def slow(self, request: Request) -> bool:
        await asyncio.sleep(request.int_param("ms", 1000) / 1000)
        return await self.hello(request)

    async def stream(self, request: Request) -> bool:
        size = request.int_param("bytes", 1024)
        seed = request.int_param("seed", 0)
        piece = request.int_param("chunk", PIECE)
        pause = request.int_param("pause_ms", 0) / 1000
        if size < 0 or piece <= 0 or pause < 0:
            raise BadRequest("bytes and pause_ms must be >= 0 and chunk > 0")
        wants_chunked = request.query.get("chunked") == "1"
        # An HTTP/1.0 client cannot take chunked framing: it gets a close-delimited body instead.
        chunked = wants_chunked and request.version == "HTTP/1.1"
        keep_alive = self.keep_alive_for(request) and chunked == wants_chunked
        head = self.base_headers(
            request,
            ("Content-Type", "application/octet-stream"),
            ("X-Body-Sha256", stream_sha256(size, seed)),
            ("X-Body-Length", str(size)),
        )
        if chunked:
            head.append(("Transfer-Encoding", "chunked"))
        elif not wants_chunked:
            head.append(("Content-Length", str(size)))
        head += self.connection_header(request, keep_alive)
        await self.send_raw(encode_head(200, head))
        if request.is_head:
            return keep_alive
        for data in split_pieces(stream_blocks(size, seed), piece):
            if pause:
                await asyncio.sleep(pause)
            await self.send_raw(b"%x\r\n%b\r\n" % (len(data), data) if chunked else data)
        if chunked:
            await self.send_raw(b"0\r\n\r\n")
        return keep_alive

    async def upload(self, request: Request) -> bool:
        body_len, body_sha256 = await request.body.consume()
        return await self.respond_json(
            request, {"backend": self.name, "body_len": body_len, "body_sha256": body_sha256}
        )

    async def expect_continue(self, request: Request) -> bool:
        sent = "100-continue" in request.tokens("expect") and request.version == "HTTP/1.1"
        if sent:
            await self.send_raw(b"HTTP/1.1 100 Continue\r\n\r\n")
        body_len, body_sha256 = await request.body.consume()
        return await self.respond_json(
            request,
            {
                "backend": self.name,
                "body_len": body_len,
                "body_sha256": body_sha256,
                "continue_sent": sent,
            },
        )

    async def head_test(self, request: Request) -> bool:
        return await self.respond(
            request, 200, HEAD_TEST_BODY, content_type="application/octet-stream"
        )

    async def nolength(self, request: Request) -> bool:
        head = self.base_headers(request, ("Content-Type", "application/octet-stream"))
        if "bytes" in request.query:
            size, seed = request.int_param("bytes", 0), request.int_param("seed", 0)
            head.append(("X-Body-Sha256", stream_sha256(size, seed)))
            blocks: Iterable[bytes] = stream_blocks(size, seed)
        else:
            blocks = [f"hello from {self.name}, until close\n".encode()]
        await self.send_raw(encode_head(200, [*head, ("Connection", "close")]))
        if not request.is_head:
            for block in blocks:
                await self.send_raw(block)
        return False

    async def reset_headers(self, request: Request) -> bool:
        await self.send_raw(PARTIAL_HEAD)
        await self.reset()
        return False

    async def reset_body(self, request: Request) -> bool:
        size = request.int_param("bytes", 1000)
        head = self.base_headers(
            request,
            ("Content-Type", "application/octet-stream"),
            ("Content-Length", str(size + 1_000_000)),
        )
        await self.send_raw(encode_head(200, head))
        for block in stream_blocks(size, 0):
            await self.send_raw(block)
        await self.reset()
        return False

    async def close_after_headers(self, request: Request) -> bool:
        head = self.base_headers(
            request,
            ("Content-Type", "text/plain"),
            ("Content-Length", "100"),
        )
        await self.send_raw(encode_head(200, head))
        return False

    async def hang(self, request: Request) -> bool:
        await self.wait_for_peer_close()
        return False

    async def garbage(self, request: Request) -> bool:
        await self.send_raw(GARBAGE)
        return False

    async def health(self, request: Request) -> bool:
        health = self.state.health
        if health.hang:
            return await self.hang(request)
        body = b"ok\n" if health.status == 200 else f"status {health.status}\n".encode()
        return await self.respond(request, health.status, body)

    async def websocket(self, request: Request) -> bool:
        key = request.header("sec-websocket-key")
        if "websocket" not in request.tokens("upgrade") or not key:
            return await self.respond(
                request,
                426,
                b"a WebSocket upgrade is required here\n",
                headers=[("Upgrade", "websocket")],
            )
        head = self.base_headers(
            request,
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Accept", accept_key(key)),
        )
        protocols = request.tokens("sec-websocket-protocol")
        if protocols:
            head.append(("Sec-WebSocket-Protocol", protocols[0]))
        await self.send_raw(encode_head(101, head))
        await WebSocketEcho(self.reader, self.writer).run()
        return False

    async def control(self, request: Request) -> bool:
        action = request.path.removeprefix("/_control/")
        state = self.state
        if action == "stats":
            stats = state.stats
            return await self.respond_json(
                request,
                {
                    "backend": self.name,
                    "requests_total": stats.requests_total,
                    "requests_by_path": dict(stats.requests_by_path),
                    "connections_open": state.connections_open(),
                    "connections_total": stats.connections_total,
                    "request_ids": list(stats.request_ids),
                },
            )
        if action not in ("health", "reset", "faults"):
            return await self.respond(request, 404, b"unknown control action\n")
        if request.method != "POST":
            return await self.respond(request, 405, b"use POST\n", headers=[("Allow", "POST")])
        if action == "reset":
            state.stats.reset()
            return await self.respond_json(request, {"reset": True})
        if action == "faults":
            faults = state.faults
            faults.fail_every = request.int_param("fail_every", faults.fail_every)
            faults.status = request.int_param("status", faults.status)
            faults.delay_ms = request.int_param("delay_ms", faults.delay_ms)
            faults.answered = 0
            return await self.respond_json(
                request,
                {
                    "fail_every": faults.fail_every,
                    "status": faults.status,
                    "delay_ms": faults.delay_ms,
                },
            )
        if "status" in request.query:
            state.health.status = request.int_param("status", 200)
        if "hang" in request.query:
            state.health.hang = request.query["hang"] == "1"
        return await self.respond_json(
            request, {"status": state.health.status, "hang": state.health.hang}
        )


ROUTES: dict[str, Handler] = {
    "/echo": Connection.echo,
    "/slow": Connection.slow,
    "/stream": Connection.stream,
    "/upload": Connection.upload,
    "/continue": Connection.expect_continue,
    "/head-test": Connection.head_test,
    "/nolength": Connection.nolength,
    "/reset-headers": Connection.reset_headers,
    "/reset-body": Connection.reset_body,
    "/close-after-headers": Connection.close_after_headers,
    "/hang": Connection.hang,
    "/garbage": Connection.garbage,
    "/health": Connection.health,
    "/ws": Connection.websocket,
}


# ---------------------------------------------------------------------------------------------
# The server process


class BackendServer:
    """Owns the listening socket and every connection task; ``close()`` stops all of them."""

    def __init__(self, settings: Settings) -> None:
        self.state = ServerState(settings)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(
            self._on_connect, host, port, limit=HEAD_LIMIT, backlog=1024
        )
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = Connection(self.state, reader, writer)
        self.state.connections.add(conn)
        self.state.stats.connections_total += 1
        try:
            await conn.serve()
        except (ConnectionError, ClientGone, asyncio.IncompleteReadError):
            pass  # the peer went away; nothing to answer
        except asyncio.LimitOverrunError:
            pass  # a chunk-size or trailer line too long to be honest
        except Exception:
            traceback.print_exc(file=sys.stderr)
        finally:
            self.state.connections.discard(conn)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._tasks.discard(task)


def _watch_stdin(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """Block until stdin reaches EOF (the parent process went away), then ask to stop."""
    with contextlib.suppress(OSError, ValueError):
        while os.read(sys.stdin.fileno(), 4096):
            pass
    with contextlib.suppress(RuntimeError):  # the loop may already be closed
        loop.call_soon_threadsafe(stop.set)


async def serve(args: argparse.Namespace) -> None:
    settings = Settings(
        name=args.name,
        accept_then_close=args.accept_then_close,
        garbage=args.garbage,
        keepalive_timeout=args.keepalive_timeout,
    )
    server = BackendServer(settings)
    port = await server.start(args.host, args.port)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if args.exit_on_stdin_eof:
        threading.Thread(target=_watch_stdin, args=(loop, stop), daemon=True).start()
    print(f"LISTENING {port}", flush=True)
    try:
        await stop.wait()
    finally:
        await server.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.fakes.backend", description=__doc__)
    parser.add_argument("--name", default="backend", help="reported in X-Backend and bodies")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument(
        "--accept-then-close", action="store_true", help="close every connection at once"
    )
    parser.add_argument(
        "--garbage", action="store_true", help="answer every connection with non-HTTP bytes"
    )
    parser.add_argument(
        "--keepalive-timeout",
        type=float,
        default=None,
        help="close connections idle this many seconds between requests",
    )
    parser.add_argument(
        "--exit-on-stdin-eof", action="store_true", help="stop when stdin closes (parent died)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    asyncio.run(serve(parse_args(argv)))


if __name__ == "__main__":
    main()
