"""Relaying the backend's answer to the client: the middle layer of a client connection.

:class:`ResponseRelay` receives what an :class:`UpstreamConnection` parsed (``upstream_head``,
``upstream_body``, ``upstream_done``, ``upstream_lost``, ``upstream_failed``,
``upstream_upgraded``), writes it to the client with the framing the exchange chose, and turns
backend failures into retries or error answers. The request side (choosing, connecting,
retrying, finishing) lives in :class:`~tdproxy.dataplane.client.ClientConnection`, which fills
in the four hooks declared at the bottom.

Flow control: a full client write buffer pauses reading from the upstream; while it is paused the
backend's body deadline is off, since the slow party is the client.
"""

from __future__ import annotations

from tdproxy.dataplane.client_io import DL_NONE, INF, PAUSE_BUFFER, ClientIO
from tdproxy.dataplane.context import ProxyContext
from tdproxy.dataplane.exchange import RESP_CHUNKED, RESP_CLOSE, RESP_NONE, Exchange
from tdproxy.dataplane.http import CRLF, HOP_BY_HOP, LAST_CHUNK, status_line
from tdproxy.dataplane.upstream import UpstreamConnection
from tdproxy.routing.table import Target


class ResponseRelay(ClientIO):
    __slots__ = ("_active", "_tunnel", "_upgrade_wait")

    def __init__(self, ctx: ProxyContext) -> None:
        super().__init__(ctx)
        self._active: Exchange | None = None
        self._tunnel: UpstreamConnection | None = None
        self._upgrade_wait: Exchange | None = None

    def pause_writing(self) -> None:
        self._write_paused = True
        up = self._upstream_for_io()
        if up is not None:
            up.set_reading(False)
            # The client is slow, not the backend: no body deadline while we hold it back.
            active = self._active
            if active is not None and active.upstream is up and active.head_sent:
                up.deadline = INF

    def resume_writing(self) -> None:
        self._write_paused = False
        up = self._upstream_for_io()
        if up is not None:
            up.set_reading(True)
            self._body_deadline(up)

    def _upstream_for_io(self) -> UpstreamConnection | None:
        if self._tunnel is not None:
            return self._tunnel
        active = self._active
        return active.upstream if active is not None else None

    def _body_deadline(self, up: UpstreamConnection) -> None:
        """While a response body streams, the backend must keep sending (``response_header``
        bounds each pause), except while the client's own backpressure holds it back."""
        exchange = self._active
        if (
            exchange is not None
            and exchange.upstream is up
            and exchange.head_sent
            and not exchange.response_done
            and not self._write_paused
        ):
            up.deadline = self.ctx.clock.now + self.ctx.settings.response_header

    def upstream_head(
        self, up: UpstreamConnection, status: int, headers: list[tuple[bytes, bytes]]
    ) -> None:
        exchange = self._active
        transport = self.transport
        if exchange is None or transport is None or exchange.upstream is not up:
            return
        if status < 200:
            self._interim(exchange, up, status, headers)
            return
        exchange.status = status
        head = exchange.response_head(status, headers, self._closing or self.ctx.shutting_down)
        exchange.head_sent = True
        # Where the head sits in this read's write batch: until the batch is sent, a broken
        # response can still be answered with a clean 502 (see upstream_failed).
        batch = self._batch
        if batch is not None:
            exchange.batch = batch
            exchange.batch_mark = len(batch)
            batch.append(head)
        else:
            exchange.batch = None
            self._write(head)
        if exchange.response_mode != RESP_NONE and not self._write_paused:
            # The body must keep coming (see _body_deadline; inlined on this per-request path).
            up.deadline = self.ctx.clock.now + self.ctx.settings.response_header

    def _interim(
        self,
        exchange: Exchange,
        up: UpstreamConnection,
        status: int,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        assert self.transport is not None
        if status == 101:
            if not exchange.websocket:
                self.upstream_failed(up, "protocol")
                return
            exchange.status = 101
            exchange.head_sent = True
            lines = [status_line(101)]
            lines.extend(name + b": " + value + CRLF for name, value in headers)
            if exchange.set_cookie:
                lines.append(exchange.set_cookie)  # a WebSocket user is placed like any other
            lines.append(CRLF)
            self._write(b"".join(lines))
        elif exchange.version == "1.1":
            lines = [status_line(status)]
            lines.extend(
                name + b": " + value + CRLF
                for name, value in headers
                if name.lower() not in HOP_BY_HOP
            )
            lines.append(CRLF)
            self._write(b"".join(lines))

    def upstream_body(self, body: bytes) -> None:
        exchange = self._active
        transport = self.transport
        if exchange is None or transport is None:
            return
        exchange.response_bytes += len(body)
        up = exchange.upstream
        if up is not None and not self._write_paused:
            up.deadline = self.ctx.clock.now + self.ctx.settings.response_header
        mode = exchange.response_mode
        if mode == RESP_CHUNKED:
            self._write(b"%x\r\n" % len(body))
            self._write(body)
            self._write(CRLF)
        elif mode != RESP_NONE:
            batch = self._batch
            if batch is not None:
                batch.append(body)
            else:
                self._write(body)

    def upstream_done(self, up: UpstreamConnection, keep_alive: bool) -> None:
        exchange = self._active
        if exchange is None or exchange.upstream is not up:
            up.detach()
            return
        if exchange.response_mode == RESP_CHUNKED and self.transport is not None:
            self._write(LAST_CHUNK)
        exchange.response_done = True
        exchange.upstream = None
        if keep_alive and exchange.request_done and exchange.response_mode != RESP_CLOSE:
            up.release(self.ctx.clock.now)
        else:
            up.detach()
        self._finish(exchange, exchange.status, keep=exchange.keep_client)

    def upstream_lost(self, up: UpstreamConnection) -> None:
        exchange = self._active
        if exchange is None or exchange.upstream is not up:
            return
        if exchange.head_sent and exchange.until_close:
            # Read-until-close framing: the end of the connection is the end of the body.
            self.upstream_done(up, keep_alive=False)
            return
        kind = "reset"
        if up.reused and not up.got_bytes and exchange.replayable():
            # A pooled connection the backend had already closed: try again, same backend.
            exchange.upstream = None
            target = exchange.target_backend
            assert target is not None
            exchange.tried.remove(target)
            exchange.end_attempt()
            exchange.body = list(exchange.replay or ())
            exchange.replay = []
            self._dispatch(exchange, target)
            return
        self.upstream_failed(up, kind)

    def upstream_failed(self, up: UpstreamConnection, kind: str) -> None:
        """The upstream broke (``kind``: reset, timeout, protocol) during an exchange."""
        exchange = self._active
        if exchange is None or exchange.upstream is not up:
            up.abort()
            return
        exchange.upstream = None
        up.abort()
        target = exchange.target_backend
        assert target is not None
        target.state.record_error(kind)
        if kind == "timeout" and not exchange.head_sent:
            self.ctx.on_passive_failure(target, kind)
        batch = self._batch
        if exchange.head_sent and batch is not None and exchange.batch is batch:
            # The head has not left yet (it is in this read's batch): take it back.
            del batch[exchange.batch_mark :]
            exchange.head_sent = False
            exchange.batch = None
            exchange.response_bytes = 0
        if not exchange.head_sent:
            exchange.end_attempt()
            if not exchange.replayed and self._retry(exchange, target, replay=True):
                return
            self._respond_error(exchange, 504 if kind == "timeout" else 502)
            return
        # Part of the response already reached the client: it must not look complete.
        self.abort()
        self._finish(exchange, exchange.status, keep=False)

    def upstream_upgraded(self, up: UpstreamConnection, rest: bytes) -> bool:
        exchange = self._active
        transport = self.transport
        if exchange is None or transport is None or exchange.status != 101:
            return False
        exchange.upstream = None
        self._tunnel = up
        up.tunnel = transport
        if rest:
            self._write(rest)
        self._upgrade_wait = None
        self._set_pause(PAUSE_BUFFER, False)
        pending = exchange.tunnel_data
        if pending:
            up.write(pending)
        self._finish(exchange, 101, keep=True)
        self._set_deadline(DL_NONE, 0.0)
        return True

    # -- hooks the request side provides ----------------------------------------------------

    def _dispatch(self, exchange: Exchange, target: Target) -> None:
        raise NotImplementedError

    def _retry(self, exchange: Exchange, failed: Target, replay: bool) -> bool:
        raise NotImplementedError

    def _respond_error(self, exchange: Exchange, code: int) -> None:
        raise NotImplementedError

    def _finish(self, exchange: Exchange, status: int, keep: bool) -> None:
        raise NotImplementedError
