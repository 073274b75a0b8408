"""The client side of the hot path: one accepted connection, parsed with httptools.

Theory of operation
-------------------
Requests on a connection are answered strictly in order. httptools parses as much as each read
holds, so pipelined requests may be parsed while an earlier one is still being answered: a parsed
request whose turn has not come waits in ``_queue`` with its (small, bounded) body buffered. The
request at the head, ``_active``, owns at most one :class:`UpstreamConnection` at a time. The
queue is capped: past ``PIPELINE_LIMIT`` waiting requests, reading pauses and the rest of a large
read is kept unparsed until the queue drains.

The connection's state (``state``) and each request's state (``Exchange.state``) are the named
values of :mod:`tdproxy.dataplane.lifecycle`, which also lists the transitions and the deadline
of every state. A request that tdproxy refuses (4xx) becomes an exchange too: it takes its place
in the queue behind every complete request read before it, so those are answered first, in order,
and then the refusal goes out and the connection closes.

Flow control is explicit: a full upstream write buffer pauses reading from the client, a full
client write buffer pauses reading from the upstream, and a request body that arrives before the
upstream connection is ready pauses reading past a small buffer. Several reasons can hold reading
paused at once (``_pause_bits``); reading resumes when the last one clears.

Timeouts are deadlines on the coarse clock that the server's sweeper checks a few times a second
(:meth:`ClientConnection.check_deadline`), so the per-request cost of a timeout is one float
store, not a timer handle.

Invariants: every connection reaches CLOSED (each state is bounded, and the backstop catches a
state that is not); a response is never presented as complete unless it is (a broken upstream
response after bytes have reached the client aborts the client connection); an upstream
connection goes back to the pool only after a complete exchange in which the whole request was
sent.

The class is layered: :class:`~tdproxy.dataplane.client_io.ClientIO` (state, writing, pausing,
closing) -> :class:`~tdproxy.dataplane.relay.ResponseRelay` (the backend's answer back to the
client) -> :class:`ClientConnection` (reading requests, choosing, connecting, retrying,
finishing). Each layer is a few hundred lines that can be read on its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import cast

import httptools

from tdproxy.dataplane.client_io import (
    CONNECTION_NEXT,
    INF,
    PAUSE_BUFFER,
    PAUSE_QUEUE,
    PAUSE_UPSTREAM,
)
from tdproxy.dataplane.context import ProxyContext
from tdproxy.dataplane.dispatch import REPLAY_LIMIT, account
from tdproxy.dataplane.exchange import (
    BODY_CHUNKED,
    BODY_NONE,
    EXCHANGE_NEXT,
    Exchange,
)
from tdproxy.dataplane.http import CRLF, LAST_CHUNK, error_body_length, error_response
from tdproxy.dataplane.lifecycle import (
    ABORTED,
    BODY,
    BUSY,
    CLOSED,
    CLOSING,
    DONE,
    ENDING,
    HEAD,
    IDLE,
    LINGER,
    QUEUED,
    RELAYING,
    TUNNEL,
    WAITING,
    connection_state_name,
)
from tdproxy.dataplane.relay import ResponseRelay

log = logging.getLogger("tdproxy.dataplane")

BODY_BUFFER_LIMIT = 256 * 1024
PIPELINE_LIMIT = 16
# While a request is in progress, a large read is parsed in slices of this size, so that the
# pipeline queue stops growing at PIPELINE_LIMIT plus what one slice can hold.
PARSE_SLICE = 4096
# Bytes of chunked framing allowed beyond the body: per chunk (size line, CRLFs, a short
# extension) plus a fixed allowance for the first read and trailers.
CHUNK_OVERHEAD_PER_CHUNK = 256
CHUNK_OVERHEAD_BASE = 96 * 1024


class ClientConnection(ResponseRelay):
    """One accepted client connection: reads requests, picks backends, answers in order."""

    __slots__ = (
        "_dispatch_pending",
        "_head_bytes",
        "_named_peer",
        "_parser",
        "_parsing",
        "_peer_fields",
        "_queue",
        "_read_size",
        "_resuming",
        "_starting",
        "_unparsed",
        "_upgrading",
    )

    def __init__(self, ctx: ProxyContext, peer: bytes | None = None) -> None:
        super().__init__(ctx)
        # The client's address when a PROXY protocol header named it (else the socket's peer).
        self._named_peer = peer
        self._parser = httptools.HttpRequestParser(self)
        self._parsing: Exchange | None = None
        self._queue: deque[Exchange] = deque()
        self._head_bytes = 0
        self._starting = False
        self._dispatch_pending = False
        self._read_size = 0
        self._unparsed = b""
        self._upgrading: Exchange | None = None
        self._resuming: Exchange | None = None

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        ctx = self.ctx
        if len(ctx.connections) >= ctx.max_connections or ctx.shutting_down:
            self.transport.abort()
            self.lost()
            return
        if self._named_peer is not None:
            self.peer = self._named_peer
        else:
            peer = transport.get_extra_info("peername")
            if peer:
                self.peer = str(peer[0]).encode()
        self._peer_fields = ctx.peer_fields(self.peer, ctx.scheme)
        if ctx.http2 and _chose_h2(transport):
            self._become_h2()
            return
        ctx.connections.add(self)
        self.deadline = ctx.clock.now + ctx.settings.idle

    def _become_h2(self) -> None:
        """The client chose HTTP/2 by ALPN: an H2ClientConnection takes the transport."""
        from tdproxy.dataplane.h2_server import H2ClientConnection

        transport = self.transport
        assert transport is not None
        h2 = H2ClientConnection(self.ctx, self.peer, self._peer_fields)
        self.transport = None
        self.state = CLOSED
        transport.set_protocol(h2)
        h2.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.progress = self.ctx.clock.now
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
        if self.state > BUSY:
            return  # ENDING and after: whatever else arrives is discarded
        if self._unparsed:
            self._unparsed += data  # kept in order behind what waits for the queue to drain
            return
        if len(data) > PARSE_SLICE and self._active is not None:
            self._unparsed = data
            self._parse_unparsed()
        else:
            self._parse(data)

    def _parse_unparsed(self) -> None:
        """Parse the kept bytes slice by slice while the pipeline queue has room."""
        data, self._unparsed = self._unparsed, b""
        size = len(data)
        position = 0
        while position < size:
            if len(self._queue) >= PIPELINE_LIMIT:
                self._unparsed = data[position:]
                self._set_pause(PAUSE_QUEUE, True)
                return
            end = position + PARSE_SLICE
            self._parse(data[position:end])
            position = end
            if position < size and (self._upgrade_wait is not None or self._tunnel is not None):
                self.data_received(data[position:])  # the rest belongs to the tunnel
                return
            if self.state > BUSY:
                return
        if self.input_ended and self._end_of_input() is None:
            self.close()  # the client's EOF came while these bytes waited: nothing is owed

    def _parse(self, data: bytes) -> None:
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
                self.refuse(exc.__context__.code)
            else:
                log.exception("internal error while handling a request from %s", self.peer)
                self.refuse(500)
        except httptools.HttpParserError:
            # llhttp also errors on bytes after a "close" request (ENDING by then): those are
            # ignored, and the request before them goes ahead.
            if self.state != ENDING:
                self.refuse(400)
        if self._dispatch_pending:
            # After the refusal above, if any: a refusal of this very request wins over its
            # dispatch; a refusal of a later one is queued behind it.
            self._dispatch_deferred()
        parsing = self._parsing
        if parsing is None:
            return
        if self.state == HEAD:
            self._head_bytes += len(data)
            if self._head_bytes > self.ctx.settings.max_head_bytes:
                self.refuse(431)
        elif parsing.body_mode == BODY_CHUNKED:
            # Chunk framing (sizes, extensions, trailers) is bounded too: llhttp skips chunk
            # extensions of any length, so count what arrives beyond the body bytes themselves.
            parsing.chunk_overhead += len(data)
            overhead = parsing.chunk_overhead - parsing.body_received
            if overhead > CHUNK_OVERHEAD_BASE + CHUNK_OVERHEAD_PER_CHUNK * parsing.chunks:
                self.refuse(400)

    def _dispatch_deferred(self) -> None:
        self._dispatch_pending = False
        active = self._active
        if active is not None and active.state == QUEUED:
            self._start(active)

    def eof_received(self) -> bool | None:
        # The client finished sending. Let the answers owed complete (half-close).
        self.input_ended = True
        if self._unparsed:
            return True  # requests it sent before its EOF are still to be read (see _next)
        return self._end_of_input()

    def _end_of_input(self) -> bool | None:
        """Everything the client sent has been read: answer what is owed, then close. Returns
        what ``eof_received`` returns (None: close now)."""
        state = self.state
        parsing = self._parsing
        if state == BODY and parsing is not None:
            if parsing is self._active:
                # Gone in the middle of the body being answered: it can never complete.
                self.abort()
                return None
            # A queued request cut short: dropped; the complete ones ahead are still answered.
            if parsing in self._queue:
                self._queue.remove(parsing)
            state = HEAD
        if state not in (HEAD, BUSY, ENDING) or (self._active is None and not self._queue):
            return None  # nothing owed: close
        self._parsing = None  # a request cut short by the EOF is dropped
        if state != ENDING:
            self.move(ENDING)
            self.deadline = INF
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost()
        self.ctx.connections.discard(self)
        self._unparsed = b""
        tunnel = self._tunnel
        if tunnel is not None:
            self._tunnel = None
            tunnel.close()
        active = self._active
        if active is not None:
            up = active.upstream
            if up is not None:
                active.upstream = None
                up.abort()
            if active.state != RELAYING:
                active.status = 499  # the client left before any answer
            self._finish(active, ABORTED, keep=False)
        self._queue.clear()

    # -- httptools callbacks (request side) -----------------------------------------------

    def on_message_begin(self) -> None:
        if self._resuming is not None:
            # The stand-in head of a body read after an upgrade request (see _resume_parsing):
            # its callbacks are skipped until the head is complete.
            self._parsing = None
            return
        ctx = self.ctx
        self._parsing = Exchange()
        self._head_bytes = 0
        if HEAD in CONNECTION_NEXT[self.state]:  # move(HEAD), inlined on the per-request path
            self.state = HEAD
        else:
            self.move(HEAD)  # reports the bug
        self.deadline = INF if self._pause_bits else ctx.clock.now + ctx.settings.client_header

    def on_url(self, url: bytes) -> None:
        exchange = self._parsing
        if exchange is None:
            return  # a stand-in head
        exchange.target += url
        if len(exchange.target) > self.ctx.settings.max_url_bytes:
            raise _Reject(414)

    def on_header(self, name: bytes, value: bytes) -> None:
        # Only collected here (the hottest callback); the limits are checked once the head is
        # complete, while _parse bounds the raw bytes held before that.
        exchange = self._parsing
        if exchange is not None:
            exchange.headers.append((name.lower(), name, value))

    def on_headers_complete(self) -> None:
        exchange = self._parsing
        if exchange is None:
            resumed = self._resuming
            if resumed is None:
                raise RuntimeError("a request head completed with no request begun")
            # The stand-in head is done: what follows is the upgrade request's own body.
            self._resuming = None
            self._parsing = resumed
            if self.state != BODY:
                self.move(BODY)
            self.deadline = self.ctx.clock.now + self.ctx.settings.client_body
            return
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
            self.move(BODY)
            self.deadline = INF if self._pause_bits else self.ctx.clock.now + settings.client_body
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
        if not self._pause_bits:
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
        if exchange is None or exchange.upgrade_body:
            return  # an upgrade request's body comes through _resume_parsing
        self._parsing = None
        exchange.request_done = True
        if exchange.body_mode == BODY_CHUNKED:
            self._send_body(exchange, LAST_CHUNK)
        # RFC 9112 §9.6: nothing after a "close" request counts.
        new = BUSY if exchange.keep_alive else ENDING
        if new in CONNECTION_NEXT[self.state]:  # move(new), inlined on the per-request path
            self.state = new
        else:
            self.move(new)
        self.deadline = INF
        if exchange is self._active:
            if exchange.state == WAITING and not self.write_paused:
                # The whole request is upstream: now the backend has response_header to answer.
                exchange.deadline = self.ctx.clock.now + self.ctx.settings.response_header
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

    def _start(self, exchange: Exchange) -> None:
        self._active = exchange
        self._route(exchange)

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
        stand-in head with the same framing, whose callbacks are skipped, so it reads the body."""
        self._parser = httptools.HttpRequestParser(self)
        self._set_pause(PAUSE_BUFFER, False)
        if body_of is not None:
            body_of.upgrade_body = False
            self._resuming = body_of
            if body_of.body_mode == BODY_CHUNKED:
                framing = b"Transfer-Encoding: chunked"
            else:
                framing = b"Content-Length: %d" % body_of.content_length
            data = b"POST / HTTP/1.1\r\nHost: -\r\n" + framing + b"\r\n\r\n" + data
        if data:
            self.data_received(data)

    # -- finishing ------------------------------------------------------------------------

    def _closing_after(self, exchange: Exchange) -> bool:
        """Nothing more will be answered on this connection after ``exchange``."""
        return self.ctx.shutting_down or (self.state >= ENDING and not self._queue)

    def _respond_error(self, exchange: Exchange, code: int) -> None:
        keep = exchange.keep_alive and exchange.request_done and not self._closing_after(exchange)
        self._write(error_response(code, close=not keep))
        exchange.response_bytes = error_body_length(code)
        up = exchange.upstream
        if up is not None:
            exchange.upstream = None
            up.abort()
        exchange.status = code
        exchange.generated = True
        self._finish(exchange, DONE, keep=keep)

    def _finish(self, exchange: Exchange, state: int, keep: bool) -> None:
        """The exchange ends (DONE or ABORTED): count it, log it, and go on with the next."""
        if state in EXCHANGE_NEXT[exchange.state]:  # _enter, inlined on the per-request path
            exchange.state = state
        else:
            self._enter(exchange, state)  # reports the bug
            return
        exchange.deadline = INF
        ctx = self.ctx
        account(ctx, exchange, self.peer)
        if exchange is self._active:
            self._active = None
        if self._pause_bits & PAUSE_UPSTREAM:
            self._set_pause(PAUSE_UPSTREAM, False)
        if self.state >= LINGER:
            return
        if self._upgrade_wait is exchange:
            # The backend declined the WebSocket handshake: back to HTTP for what followed it.
            self._upgrade_wait = None
            pending, exchange.tunnel_data = exchange.tunnel_data, b""
            if keep and self.state <= BUSY and not ctx.shutting_down:
                self._resume_parsing(None, pending)
            if self.state >= LINGER:
                return
        if self.state == TUNNEL:
            return
        if not keep or ctx.shutting_down:
            if exchange.generated and not exchange.request_done:
                self.linger()  # refused before the request was read whole: let it read why
            else:
                self.close()
            return
        self._next()

    def _next(self) -> None:
        """The active exchange is done: start the next one, or go idle, or close."""
        queue = self._queue
        if queue:
            if self._pause_bits & PAUSE_QUEUE and len(queue) <= PIPELINE_LIMIT:
                self._set_pause(PAUSE_QUEUE, False)
                if self._unparsed:
                    # Not from here: this may run inside a parser callback of this connection.
                    self.ctx.loop.call_soon(self._resume_unparsed)
            if not self._starting:
                self._start_queued()
            return
        state = self.state
        if state == BUSY:
            self.state = IDLE  # BUSY -> IDLE, allowed by the table
            self.deadline = self.ctx.clock.now + self.ctx.settings.idle
        elif state == ENDING:
            self.close()
        # HEAD or BODY: the next request is arriving, under its own deadline.

    def _resume_unparsed(self) -> None:
        if self._unparsed and self.state <= BUSY and not self._pause_bits & PAUSE_QUEUE:
            self._parse_unparsed()

    def _start_queued(self) -> None:
        # A loop, not recursion: each queued request may finish at once (a 503, say).
        self._starting = True
        try:
            while self._queue and self._active is None and self.state < LINGER:
                self._start(self._queue.popleft())
        finally:
            self._starting = False

    def refuse(self, code: int) -> None:
        """Refuse the request being read (4xx/408) and end the connection after saying so.

        Every complete request read before it is answered first, in order: the refusal takes
        its place in the queue behind them, and no more input is read."""
        if self.state >= LINGER or self.transport is None:
            return
        exchange = self._parsing
        self._parsing = None
        active = self._active
        if exchange is not None and exchange is active and exchange.state != QUEUED:
            # The request being answered now went wrong mid-body, while streaming upstream.
            if self.state < ENDING:
                self.move(ENDING)
            if exchange.state == RELAYING:
                self.abort()  # its answer is already on its way: cut it, never complete it
                self._finish(exchange, ABORTED, keep=False)
            else:
                self._respond_error(exchange, code)
            return
        if exchange is None:
            exchange = Exchange()  # refused before a request began (garbage at the start)
        else:
            # What was read of it goes to the access log: the method once its target began
            # (llhttp has parsed the method then), the version once its fields began.
            parser = self._parser
            exchange.note_refused(
                parser.get_method() if exchange.target else None,
                parser.get_http_version() if exchange.headers else None,
            )
        exchange.refusal = code
        exchange.body = []
        exchange.body_buffered = 0
        if active is None or exchange is active:
            self._active = exchange  # nothing ahead of it: answer now
            self._dispatch_pending = False
            self._respond_error(exchange, code)
            return
        if exchange not in self._queue:
            self._queue.append(exchange)
        if self.state < ENDING:
            self.move(ENDING)
        self.deadline = INF

    # -- deadlines, pausing, shutdown -----------------------------------------------------

    def check_deadline(self, now: float) -> None:
        """Called by the sweeper: act on whatever deadline has passed."""
        active = self._active
        if active is not None and active.deadline <= now:
            self.check_exchange_deadline(active)
        elif self.send_deadline <= now:
            log.info(
                "client %s accepted no bytes for %gs (timeouts.client_send): closing",
                self.peer.decode(),
                self.ctx.settings.client_send,
            )
            self.abort()  # connection_lost then closes the backend connection too
        elif self.deadline <= now:
            self._state_deadline()
        elif self.state == TUNNEL:
            tunnel_idle = self.ctx.settings.tunnel_idle
            if tunnel_idle is not None and now - self.progress >= tunnel_idle:
                self.close()
                if self._tunnel is not None:
                    self._tunnel.close()
        elif now - self.progress > self.ctx.settings.backstop and self.state != CLOSED:
            self.bug(
                f"no progress for {now - self.progress:.0f}s in state "
                f"{connection_state_name(self.state)} (active: {self._active!r})"
            )

    def _state_deadline(self) -> None:
        state = self.state
        if state in (IDLE, LINGER):
            self.close()
        elif state in (HEAD, BODY):
            self.refuse(408)
        elif state == CLOSING:
            self.abort()  # the last bytes never left: the client reads nothing
        else:
            self.bug(f"a deadline in state {connection_state_name(state)}")

    def shutdown(self) -> None:
        """Graceful stop: close now if idle, else after the answer in progress."""
        if self.state == IDLE:
            self.close()

    def __repr__(self) -> str:
        return (
            f"<ClientConnection {self.peer.decode()} {connection_state_name(self.state)} "
            f"active={self._active!r} queued={len(self._queue)}>"
        )


def _chose_h2(transport: asyncio.BaseTransport) -> bool:
    ssl_object = transport.get_extra_info("ssl_object")
    return ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2"


class _Reject(Exception):
    """Raised inside a parser callback to refuse the request with ``code``."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code
