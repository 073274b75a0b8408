"""The client side of the hot path: one accepted connection, parsed with httptools.

Theory of operation
-------------------
Requests on a connection are answered strictly in order. httptools parses as much as each read
holds, so pipelined requests may be parsed while an earlier one is still being answered: a parsed
request whose turn has not come waits in ``_queue`` with its (small, bounded) body buffered, and
reading pauses once the queue is long. The request at the head, ``_active``, owns at most one
:class:`UpstreamConnection` at a time.

Flow control is explicit: a full upstream write buffer pauses reading from the client, a full
client write buffer pauses reading from the upstream, and a request body that arrives before the
upstream connection is ready pauses reading past a small buffer. Several reasons can hold reading
paused at once (``_pause_bits``); reading resumes when the last one clears.

Timeouts are deadlines (``deadline``, on the coarse clock) that the server's sweeper checks a few
times a second, so the per-request cost of a timeout is one float store, not a timer handle.

Invariants: a response is never presented as complete unless it is (a broken upstream response
after bytes have reached the client aborts the client connection); an upstream connection goes
back to the pool only after a complete exchange in which the whole request was sent.

The class is layered: :class:`~tdproxy.dataplane.client_io.ClientIO` (writing, pausing,
deadlines, closing) -> :class:`~tdproxy.dataplane.relay.ResponseRelay` (the backend's answer back
to the client) -> :class:`ClientConnection` (reading requests, choosing, connecting, retrying,
finishing). Each layer is a few hundred lines that can be read on its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import cast

import httptools

from tdproxy.dataplane.client_io import (
    DL_BODY,
    DL_HEADER,
    DL_IDLE,
    DL_LINGER,
    DL_NONE,
    INF,
    PAUSE_BUFFER,
    PAUSE_QUEUE,
    PAUSE_UPSTREAM,
)
from tdproxy.dataplane.context import ProxyContext
from tdproxy.dataplane.exchange import (
    BODY_CHUNKED,
    BODY_NONE,
    Exchange,
    PeerFields,
)
from tdproxy.dataplane.http import (
    CRLF,
    LAST_CHUNK,
    error_body_length,
    error_response,
)
from tdproxy.dataplane.relay import ResponseRelay
from tdproxy.dataplane.upstream import UpstreamConnection
from tdproxy.routing.table import Target

log = logging.getLogger("tdproxy.dataplane")

BODY_BUFFER_LIMIT = 256 * 1024
PIPELINE_LIMIT = 16
REPLAY_LIMIT = 64 * 1024
# Bytes of chunked framing allowed beyond the body: per chunk (size line, CRLFs, a short
# extension) plus a fixed allowance for the first read and trailers.
CHUNK_OVERHEAD_PER_CHUNK = 256
CHUNK_OVERHEAD_BASE = 96 * 1024


class ClientConnection(ResponseRelay):
    """One accepted client connection: reads requests, picks backends, answers in order."""

    __slots__ = (
        "_dispatch_pending",
        "_head_bytes",
        "_input_done",
        "_parser",
        "_parsing",
        "_peer_fields",
        "_pending_reject",
        "_queue",
        "_read_size",
        "_resumed_body",
        "_starting",
        "_upgrading",
    )

    def __init__(self, ctx: ProxyContext) -> None:
        super().__init__(ctx)
        self._parser = httptools.HttpRequestParser(self)
        self._parsing: Exchange | None = None
        self._queue: deque[Exchange] = deque()
        self._head_bytes = 0
        self._starting = False
        self._pending_reject = 0
        self._input_done = False
        self._dispatch_pending = False
        self._read_size = 0
        self._upgrading: Exchange | None = None
        self._resumed_body: Exchange | None = None

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        ctx = self.ctx
        if len(ctx.connections) >= ctx.max_connections or ctx.shutting_down:
            self.transport.abort()
            self._closed = True
            return
        ctx.connections.add(self)
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = str(peer[0]).encode()
        self._peer_fields = PeerFields(self.peer, ctx.scheme)
        self._set_deadline(DL_IDLE, ctx.settings.idle)

    def data_received(self, data: bytes) -> None:
        tunnel = self._tunnel
        if tunnel is not None:
            tunnel.write(data)
            return
        waiting = self._upgrade_wait
        if waiting is not None:
            # Bytes after a WebSocket handshake wait for the backend's answer to it.
            waiting.tunnel_data += data
            if len(waiting.tunnel_data) > BODY_BUFFER_LIMIT:
                self._set_pause(PAUSE_BUFFER, True)
            return
        if self._input_done or (
            self._closing
            and (
                self._pending_reject
                or self._lingering
                or (self._parsing is None and self._active is None)
            )
        ):
            return  # refused, finished or told to close: whatever else arrives is discarded
        self._read_size = len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            if self._dispatch_pending:
                self._dispatch_deferred()
            self._upgrade_requested(data[upgrade.args[0] :])
            return
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _Reject):
                self.reject(exc.__context__.code)
            else:
                log.exception("internal error while handling a request from %s", self.peer)
                self.reject(500 if self._active is None else 502)
            return
        except httptools.HttpParserError:
            if not self._input_done:
                self.reject(400)
            elif self._dispatch_pending:
                # llhttp also errors on bytes after a "close" request: those are ignored, and
                # the request before them goes ahead.
                self._dispatch_deferred()
            return
        if self._dispatch_pending:
            self._dispatch_deferred()
        parsing = self._parsing
        if parsing is None:
            return
        if not parsing.head_done:
            self._head_bytes += len(data)
            if self._head_bytes > self.ctx.settings.max_head_bytes:
                self.reject(431)
        elif parsing.body_mode == BODY_CHUNKED:
            # Chunk framing (sizes, extensions, trailers) is bounded too: llhttp skips chunk
            # extensions of any length, so count what arrives beyond the body bytes themselves.
            parsing.chunk_overhead += len(data)
            overhead = parsing.chunk_overhead - parsing.body_received
            if overhead > CHUNK_OVERHEAD_BASE + CHUNK_OVERHEAD_PER_CHUNK * parsing.chunks:
                self.reject(400)

    def _dispatch_deferred(self) -> None:
        self._dispatch_pending = False
        active = self._active
        if active is not None and active.table is None and not active.finished:
            self._activate(active)

    def eof_received(self) -> bool | None:
        # The client finished sending. Let an answer in progress complete (half-close).
        if self._lingering:
            return None
        if self._active is None and self._parsing is None and not self._queue:
            return None
        if self._parsing is not None and self._parsing.head_done and not self._input_done:
            # Gone in the middle of a request body: that request can never complete.
            self.abort()
            return None
        self._closing = True  # nothing more will come: close once the answers are out
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.deadline = INF
        self.ctx.connections.discard(self)
        tunnel = self._tunnel
        if tunnel is not None:
            self._tunnel = None
            tunnel.close()
        active = self._active
        if active is not None:
            up = active.upstream
            if up is not None:
                active.upstream = None
                if active.response_done:
                    up.release(self.ctx.clock.now)
                else:
                    up.abort()
            self._finish(active, 499 if not active.head_sent else active.status, keep=False)
        self._queue.clear()

    # -- httptools callbacks (request side) -----------------------------------------------

    def on_message_begin(self) -> None:
        resumed = self._resumed_body
        if resumed is not None:
            # The stand-in head of a body being read after an upgrade request (see
            # _resume_parsing): the exchange exists, only its body is still to come.
            self._resumed_body = None
            self._parsing = resumed
            return
        ctx = self.ctx
        self._parsing = Exchange()
        self._head_bytes = 0
        if self._active is None:
            self._deadline_kind = DL_HEADER  # _set_deadline, inlined on the per-request path
            self.deadline = ctx.clock.now + ctx.settings.client_header

    def on_url(self, url: bytes) -> None:
        exchange = self._parsing
        assert exchange is not None
        if exchange.head_done:
            return  # a stand-in head
        exchange.target += url
        if len(exchange.target) > self.ctx.settings.max_url_bytes:
            raise _Reject(414)

    def on_header(self, name: bytes, value: bytes) -> None:
        # Only collected here (the hottest callback); the limits are checked once the head is
        # complete, while data_received bounds the raw bytes held before that.
        exchange = self._parsing
        if exchange is not None:
            exchange.headers.append((name.lower(), name, value))

    def on_headers_complete(self) -> None:
        exchange = self._parsing
        assert exchange is not None
        if exchange.head_done:
            return  # a stand-in head
        parser = self._parser
        exchange.head_done = True
        settings = self.ctx.settings
        headers = exchange.headers
        if len(headers) > settings.max_headers or (
            # Counting is needed only when the bytes read for this head could exceed the limit.
            self._head_bytes + self._read_size > settings.max_header_bytes
            and sum(len(name) + len(value) for _, name, value in headers) + 4 * len(headers)
            > settings.max_header_bytes
        ):
            raise _Reject(431)
        upgrade = parser.should_upgrade()
        code = exchange.parse_head(
            parser.get_method(),
            parser.get_http_version(),
            parser.should_keep_alive(),
            upgrade,
            self.ctx,
            self._peer_fields,
        )
        if code:
            raise _Reject(code)
        if upgrade:
            # llhttp stops after any upgrade request, as if it had no body; see _resume_parsing.
            self._upgrading = exchange
            exchange.upgrade_body = exchange.body_mode != BODY_NONE
        if exchange.body_mode != BODY_NONE:
            self._set_deadline(DL_BODY, self.ctx.settings.client_body)
        if self._active is None:
            # Dispatched once this read is parsed, so that a framing error later in the same
            # read refuses the request before any of it reaches a backend.
            self._active = exchange
            self._dispatch_pending = True
        else:
            self._queue.append(exchange)

    def on_body(self, body: bytes) -> None:
        exchange = self._parsing
        assert exchange is not None
        exchange.body_received += len(body)
        limit = self.ctx.settings.max_body_bytes
        if limit is not None and exchange.body_received > limit:
            raise _Reject(413)
        self.deadline = self.ctx.clock.now + self.ctx.settings.client_body
        if exchange.body_mode == BODY_CHUNKED:
            self._send_body(exchange, b"%x\r\n" % len(body) + body + CRLF)
        else:
            self._send_body(exchange, body)

    def on_chunk_header(self) -> None:
        exchange = self._parsing
        if exchange is not None:
            exchange.chunks += 1

    def on_message_complete(self) -> None:
        exchange = self._parsing
        assert exchange is not None
        if exchange.upgrade_body:
            return  # its body comes through _resume_parsing
        self._parsing = None
        exchange.request_done = True
        if not exchange.keep_alive:
            self._input_done = True  # RFC 9112 §9.6: nothing after a "close" request counts
        if exchange.body_mode == BODY_CHUNKED:
            self._send_body(exchange, LAST_CHUNK)
        if exchange is self._active:
            self._deadline_kind = DL_NONE
            self.deadline = INF
            up = exchange.upstream
            if up is not None and not exchange.head_sent:
                up.deadline = self.ctx.clock.now + self.ctx.settings.response_header
        elif len(self._queue) >= PIPELINE_LIMIT:
            self._set_pause(PAUSE_QUEUE, True)

    def _send_body(self, exchange: Exchange, data: bytes) -> None:
        up = exchange.upstream
        if up is not None and exchange is self._active:
            up.write(data)
            exchange.capture_replay(data, REPLAY_LIMIT)
            return
        exchange.body.append(data)
        exchange.body_buffered += len(data)
        if exchange.body_buffered > BODY_BUFFER_LIMIT:
            self._set_pause(PAUSE_BUFFER, True)

    # -- choosing a backend and connecting --------------------------------------------------

    def _activate(self, exchange: Exchange) -> None:
        self._active = exchange
        if self._deadline_kind != DL_NONE and (
            exchange.body_mode == BODY_NONE or exchange.request_done
        ):
            self._set_deadline(DL_NONE, 0.0)
        table = self.ctx.router.table
        exchange.table = table
        target = table.pick(exchange.cookie, exchange.override)
        if target is None:
            self._respond_error(exchange, 503)
            return
        if table.sticky:
            exchange.set_cookie = table.sticky_cookie_for(
                target, exchange.cookie, exchange.override
            )
        self._dispatch(exchange, target)

    def _dispatch(self, exchange: Exchange, target: Target) -> None:
        exchange.target_backend = target
        exchange.tried.append(target)
        target.state.in_flight += 1
        exchange.counted = True
        up = target.pool.get()
        if up is not None:
            self._attach(exchange, up)
        else:
            self.ctx.spawn(self._connect(exchange, target))

    async def _connect(self, exchange: Exchange, target: Target) -> None:
        loop = self.ctx.loop
        try:
            _, up = await asyncio.wait_for(
                loop.create_connection(
                    lambda: UpstreamConnection(target.pool),
                    target.host,
                    target.port,
                    ssl=target.ssl_context,
                    server_hostname=target.server_hostname,
                ),
                self.ctx.settings.connect,
            )
        except TimeoutError:
            self._connect_failed(exchange, target, "timeout")
            return
        except (OSError, ValueError) as exc:
            log.debug("connect to %s failed: %s", target.name, exc)
            self._connect_failed(exchange, target, "connect")
            return
        if exchange is not self._active or self._closed or exchange.finished:
            up.release(self.ctx.clock.now)
            return
        if not up.usable():
            # Accepted, then closed before we could write: nothing was sent, try elsewhere.
            self._connect_failed(exchange, target, "connect")
            return
        self._attach(exchange, up)

    def _connect_failed(self, exchange: Exchange, target: Target, kind: str) -> None:
        target.state.record_error(kind)
        self.ctx.on_passive_failure(target, kind)
        if exchange is not self._active or exchange.finished:
            return
        exchange.end_attempt()
        # Nothing of the request reached any backend: any method may go elsewhere.
        if self._retry(exchange, target, replay=False):
            return
        self._respond_error(exchange, 504 if kind == "timeout" else 502)

    def _attach(self, exchange: Exchange, up: UpstreamConnection) -> None:
        exchange.upstream = up
        target = exchange.target_backend
        assert target is not None
        deadline = INF
        if exchange.request_done:
            deadline = self.ctx.clock.now + self.ctx.settings.response_header
        head = exchange.request_head(target)
        body = exchange.body
        if body:
            up.send(self, b"".join([head, *body]), exchange.head_only, deadline)  # one send
            for chunk in body:
                exchange.capture_replay(chunk, REPLAY_LIMIT)
            exchange.body = []
            exchange.body_buffered = 0
            self._set_pause(PAUSE_BUFFER, False)
        else:
            up.send(self, head, exchange.head_only, deadline)
        if self._write_paused:
            up.set_reading(False)

    def _retry(self, exchange: Exchange, failed: Target, replay: bool) -> bool:
        """Send the request to another backend; False when none may take it."""
        if replay and not exchange.replayable():
            return False
        table = exchange.table
        assert table is not None
        target = table.alternative(exchange.tried)
        if target is None:
            return False
        failed.state.retries += 1
        if replay:
            exchange.body = list(exchange.replay or ())
            exchange.replay = []
            exchange.replayed = True
        if table.sticky:
            exchange.set_cookie = target.set_cookie
        self._dispatch(exchange, target)
        return True

    def _upgrade_requested(self, rest: bytes) -> None:
        exchange = self._upgrading
        self._upgrading = None
        if exchange is None or exchange.finished:
            self._resume_parsing(None, rest)
        elif exchange.websocket:
            # Bytes after the handshake belong to the tunnel once the backend agrees; if it
            # declines, they are parsed as HTTP again (see _finish).
            self._upgrade_wait = exchange
            exchange.tunnel_data = rest
        else:
            # An upgrade we do not tunnel (h2c and friends) is answered as plain HTTP/1.1.
            self._resume_parsing(exchange if exchange.upgrade_body else None, rest)

    def _resume_parsing(self, body_of: Exchange | None, data: bytes) -> None:
        """Go on parsing HTTP/1.1 with a fresh parser: llhttp will not parse past an upgrade
        request. When that request has a body still to read, the new parser first gets a
        stand-in head with the same framing, which the callbacks skip, so it reads the body."""
        self._parser = httptools.HttpRequestParser(self)
        self._set_pause(PAUSE_BUFFER, False)
        if body_of is not None:
            body_of.upgrade_body = False
            self._resumed_body = body_of
            if body_of.body_mode == BODY_CHUNKED:
                framing = b"Transfer-Encoding: chunked"
            else:
                framing = b"Content-Length: %d" % body_of.content_length
            data = b"POST / HTTP/1.1\r\nHost: -\r\n" + framing + b"\r\n\r\n" + data
        if data:
            self.data_received(data)

    # -- finishing ------------------------------------------------------------------------

    def _respond_error(self, exchange: Exchange, code: int) -> None:
        transport = self.transport
        keep = exchange.keep_client and exchange.request_done and not self._closing
        if transport is not None:
            self._write(error_response(code, close=not keep))
        exchange.response_bytes = error_body_length(code)
        up = exchange.upstream
        if up is not None:
            exchange.upstream = None
            up.abort()
        exchange.status = code
        exchange.head_sent = True
        exchange.generated = True
        self._finish(exchange, code, keep=keep)

    def _finish(self, exchange: Exchange, status: int, keep: bool) -> None:
        if exchange.finished:
            return
        exchange.finished = True
        ctx = self.ctx
        target = exchange.target_backend
        if target is not None:
            state = target.state
            exchange.end_attempt()
            state.record_response(
                status, ctx.clock.second, time.monotonic() - exchange.monotonic_start
            )
            if not exchange.generated:
                state.consecutive_failures = 0
        else:
            ctx.count_unrouted(status)
        if ctx.access_log is not None:
            ctx.access_log.log(exchange, self.peer, status, ctx.clock)
        if exchange is self._active:
            self._active = None
        if self._pause_bits & PAUSE_UPSTREAM:
            self._set_pause(PAUSE_UPSTREAM, False)
        if self._closed:
            return
        if self._upgrade_wait is exchange:
            # The backend declined the WebSocket handshake: back to HTTP for what followed it.
            self._upgrade_wait = None
            pending, exchange.tunnel_data = exchange.tunnel_data, b""
            if keep and not self._closing:
                self._resume_parsing(None, pending)
            if self._closed:
                return
        if not keep or not exchange.request_done or self._closing or ctx.shutting_down:
            if self._tunnel is None:
                if keep and self._pending_reject:
                    self._write(error_response(self._pending_reject, close=True))
                    ctx.count_unrouted(self._pending_reject)
                if exchange.generated and not exchange.request_done:
                    self._linger_close()  # refused mid-body: let the client read why
                else:
                    self.close()
            return
        if self._queue:
            self._set_pause(PAUSE_QUEUE, False)
            if not self._starting:
                self._start_queued()
        elif self._parsing is None:
            self._deadline_kind = DL_IDLE  # _set_deadline, inlined on the per-request path
            self.deadline = ctx.clock.now + ctx.settings.idle
        elif self._parsing.head_done:
            self._set_deadline(DL_BODY, ctx.settings.client_body)
        else:
            self._set_deadline(DL_HEADER, ctx.settings.client_header)

    def _start_queued(self) -> None:
        # A loop, not recursion: each queued request may finish at once (a 503, say).
        self._starting = True
        try:
            while self._queue and self._active is None and not self._closed:
                self._activate(self._queue.popleft())
        finally:
            self._starting = False

    def reject(self, code: int) -> None:
        """Refuse the request being read (4xx/408) and close the connection.

        When an earlier request on the connection is still being answered, that answer goes
        out first and the refusal follows it."""
        if self._closed or self.transport is None:
            return
        self._closing = True
        exchange = self._active
        parsing = self._parsing
        if exchange is not None and not exchange.finished:
            if parsing is not None and parsing is not exchange:
                self._pending_reject = code
                self._queue.clear()
                return
            if exchange.head_sent:
                self.abort()
                self._finish(exchange, exchange.status, keep=False)
                return
            self._respond_error(exchange, code)
            return
        self._write(error_response(code, close=True))
        self.ctx.count_unrouted(code)
        parsing = self._parsing
        if parsing is not None and self.ctx.access_log is not None:
            self.ctx.access_log.log(parsing, self.peer, code, self.ctx.clock)
        self._linger_close()

    # -- deadlines, pausing, shutdown -----------------------------------------------------

    def check_deadline(self, now: float) -> None:
        """Called by the sweeper: act on whatever deadline has passed."""
        active = self._active
        up = active.upstream if active is not None else None
        if up is not None and up.deadline <= now:
            self.upstream_failed(up, "timeout")
            return
        if self.deadline > now:
            return
        kind = self._deadline_kind
        if kind in (DL_IDLE, DL_LINGER):
            self.close()
        elif kind in (DL_HEADER, DL_BODY):
            self.reject(408)

    def shutdown(self) -> None:
        """Graceful stop: close now if idle, else after the answer in progress."""
        self._closing = True
        if self._active is None and self._parsing is None and self._tunnel is None:
            self.close()

    def __repr__(self) -> str:
        return f"<ClientConnection {self.peer.decode()} active={self._active!r}>"


class _Reject(Exception):
    """Raised inside a parser callback to refuse the request with ``code``."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code
