"""The backend side of the hot path: one keep-alive connection to a backend.

Theory of operation
-------------------
An :class:`UpstreamConnection` carries one exchange at a time (no upstream pipelining). The
client side attaches it with :meth:`send`, the response is parsed with httptools and handed back
to the owner (an HTTP/1.1 :class:`~tdproxy.dataplane.client.ClientConnection` or an HTTP/2
stream, see :class:`UpstreamClient`) through four calls:
``upstream_head``, ``upstream_body``, ``upstream_done`` and ``upstream_failed``. Completion is
reported only after ``feed_data`` returns, so the client may reuse or pool this connection
without re-entering the parser.

httptools cannot be told that a response answers a HEAD request; for those the exchange is
finished at the end of the header section, and the connection is **not** returned to the pool: a
backend that wrongly sends a body after a HEAD answer would otherwise leave bytes that the next
request on the connection would read as (part of) its own response. HEAD is rare enough that a
fresh connection for the next request costs nothing measurable. After a ``101 Switching
Protocols`` the connection becomes a byte tunnel and never returns to the pool either.

This object keeps no deadline: the exchange it carries owns the deadline of each phase (waiting
for the head, each pause of the body), and the client connection checks it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Protocol, cast

import httptools

from tdproxy.dataplane.errors import BadResponse
from tdproxy.dataplane.pool import UpstreamPool

if TYPE_CHECKING:
    from tdproxy.dataplane.context import ProxyContext

log = logging.getLogger("tdproxy.upstream")
# A backend's response head larger than this is a broken response (502), not something to buffer.
MAX_RESPONSE_HEAD = 64 * 1024


class UpstreamClient(Protocol):
    """What an upstream connection reports to: an HTTP/1.1 client connection, or an HTTP/2
    stream."""

    ctx: ProxyContext
    progress: float

    def begin_batch(self) -> bool: ...
    def flush_batch(self) -> None: ...
    def upstream_head(
        self, up: UpstreamConnection, status: int, headers: list[tuple[bytes, bytes]]
    ) -> None: ...
    def upstream_body(self, body: bytes) -> None: ...
    def upstream_done(self, up: UpstreamConnection, keep_alive: bool) -> None: ...
    def upstream_lost(self, up: UpstreamConnection) -> None: ...
    def upstream_failed(self, up: UpstreamConnection, kind: str) -> None: ...
    def upstream_upgraded(self, up: UpstreamConnection, rest: bytes) -> bool: ...
    def upstream_write_paused(self, up: UpstreamConnection, paused: bool) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "_complete",
        "_head_bytes",
        "_headers",
        "_in_head",
        "_keep_alive",
        "alive",
        "client",
        "eof",
        "got_bytes",
        "head_only",
        "idle_since",
        "parser",
        "pool",
        "read_paused",
        "reused",
        "transport",
        "tunnel",
    )

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.client: UpstreamClient | None = None
        self.tunnel: asyncio.Transport | None = None
        self.alive = True
        self.reused = False
        self.got_bytes = False
        self.head_only = False
        self.read_paused = False
        self.eof = False  # the backend ended the connection cleanly (FIN, not a reset)
        self.idle_since = 0.0
        self._headers: list[tuple[bytes, bytes]] = []
        self._in_head = False
        self._head_bytes = 0
        self._complete = False
        self._keep_alive = False

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        client = self.client
        if self.tunnel is not None:
            self.tunnel.write(data)
            if client is not None:
                client.progress = client.ctx.clock.now
            return
        if client is None:
            # A backend must not talk on an idle connection; whatever it is, drop the connection.
            self.close()
            return
        self.got_bytes = True
        client.progress = client.ctx.clock.now
        if self._in_head:
            # Bytes of a response head so far (all earlier reads of this exchange ended inside
            # a head): an endless head fails here rather than growing in memory. The slack is
            # for framing (": ", CRLF), which the exact limit in on_headers_complete leaves out.
            if self._head_bytes > MAX_RESPONSE_HEAD + 65536:
                client.upstream_failed(self, "protocol")
                return
            self._head_bytes += len(data)
        # Collect what goes to the client while this read is parsed: a response that arrives
        # in one read (head, body, end) leaves in one send.
        owner = client.begin_batch()
        try:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade as upgrade:
                # (Unless the head already failed the exchange, which detached this connection.)
                if self.client is client and not client.upstream_upgraded(
                    self, data[upgrade.args[0] :]
                ):
                    client.upstream_failed(self, "protocol")
                return
            except (httptools.HttpParserCallbackError, httptools.HttpParserError) as exc:
                if not self._complete:
                    if not isinstance(exc.__context__, BadResponse) and isinstance(
                        exc, httptools.HttpParserCallbackError
                    ):
                        log.exception("internal error handling a response from %s", self.pool.key)
                    if self.client is client:
                        client.upstream_failed(self, "protocol")
                    return
                # The response was complete, but the backend sent more after it: deliver what
                # was answered and never reuse this connection (the rest would reach another
                # client).
                self._keep_alive = False
            if self._complete:
                # Reported only now that feed_data has returned: the client may pool this
                # connection without re-entering the parser.
                self._complete = False
                if self.client is client:
                    client.upstream_done(self, self._keep_alive and not self.head_only)
        finally:
            if owner:
                client.flush_batch()

    def eof_received(self) -> bool | None:
        self.eof = True
        if self.client is None and self.tunnel is None:
            # The backend closed an idle pooled connection: out of the pool now, so that no
            # request is sent into a connection already known to be over.
            self.alive = False
            self.pool.discard(self)
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        if self.tunnel is not None:
            self.tunnel.close()
            self.tunnel = None
            return
        client = self.client
        if client is not None:
            client.upstream_lost(self)
        else:
            self.pool.discard(self)

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.upstream_write_paused(self, True)

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.upstream_write_paused(self, False)

    # -- httptools callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:
            raise BadResponse("bytes after the end of a response")
        self._headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))  # the hottest callback: only collected here

    def on_headers_complete(self) -> None:
        client = self.client
        if client is None:
            return
        headers = self._headers
        # The bytes read since the request was sent bound the head's size; count exactly only
        # when that bound is over the limit.
        if (
            self._head_bytes > MAX_RESPONSE_HEAD
            and sum(len(name) + len(value) for name, value in headers) > MAX_RESPONSE_HEAD
        ):
            raise BadResponse("response head too large")
        parser = self.parser
        status = parser.get_status_code()
        self._keep_alive = parser.should_keep_alive()
        if status >= 200 or status == 101:
            self._in_head = False
        client.upstream_head(self, status, headers)
        if self.head_only and status >= 200:
            # HEAD (or a response that carries no body whatever its headers claim): done now.
            self._complete = True

    def on_body(self, body: bytes) -> None:
        if not self.head_only and self.client is not None:
            self.client.upstream_body(body)

    def on_message_complete(self) -> None:
        parser = self.parser
        if parser.get_status_code() >= 200 and not self.head_only:
            self._keep_alive = parser.should_keep_alive()
            self._complete = True

    # -- used by the client side ----------------------------------------------------------

    def usable(self) -> bool:
        transport = self.transport
        return self.alive and transport is not None and not transport.is_closing()

    def send(self, client: UpstreamClient, head: bytes, head_only: bool) -> None:
        """Attach to ``client`` and write the request head."""
        self.client = client
        self.head_only = head_only
        self.got_bytes = False
        self._in_head = True
        self._head_bytes = 0
        transport = self.transport
        assert transport is not None
        transport.write(head)

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None:
            transport.write(data)

    def release(self, now: float) -> None:
        """The exchange finished cleanly: back to the pool."""
        self.client = None
        self.reused = True
        if self.read_paused:
            self.set_reading(True)
        self.pool.put(self, now)

    def detach(self) -> None:
        """Forget the client and close: the connection is in an unknown state."""
        self.client = None
        self.close()

    def set_reading(self, enabled: bool) -> None:
        transport = self.transport
        if transport is None or self.read_paused != enabled:
            return
        self.read_paused = not enabled
        if enabled:
            transport.resume_reading()
        else:
            transport.pause_reading()

    def close(self) -> None:
        self.alive = False
        self.client = None
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()

    def abort(self) -> None:
        self.alive = False
        self.client = None
        transport = self.transport
        if transport is not None:
            transport.abort()

    def __repr__(self) -> str:
        state = "busy" if self.client else ("tunnel" if self.tunnel else "idle")
        return f"<UpstreamConnection {self.pool.key} {state} alive={self.alive}>"
