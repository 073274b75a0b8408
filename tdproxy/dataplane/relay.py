"""Relaying the backend's answer to the client: the middle layer of a client connection.

:class:`ResponseRelay` receives what an :class:`UpstreamConnection` parsed (``upstream_head``,
``upstream_body``, ``upstream_done``, ``upstream_lost``, ``upstream_failed``,
``upstream_upgraded``), writes it to the client with the framing the exchange chose, and turns
backend failures into retries or error answers. The request side (choosing, connecting,
retrying, finishing) lives in :class:`~tdproxy.dataplane.client.ClientConnection`, which fills
in the hooks declared at the bottom.

Each event is expected in one exchange state (``lifecycle``): a head while WAITING, body bytes
while RELAYING. An event from an upstream the active exchange does not hold, or in a state that
does not expect it, is a bug (logged, connection closed).

Flow control and deadlines: a full client write buffer pauses reading from the upstream; while it
is paused the exchange's body deadline is off (the slow party is the client, which
``client_send`` bounds). A full upstream write buffer pauses reading from the client; while it is
paused the backend must take the body within ``response_header``, and the client's body deadline
is off.
"""

from __future__ import annotations

from tdproxy.dataplane.client_io import INF, PAUSE_BUFFER, PAUSE_UPSTREAM, ClientIO
from tdproxy.dataplane.context import ProxyContext
from tdproxy.dataplane.exchange import RESP_CHUNKED, RESP_CLOSE, RESP_NONE, Exchange
from tdproxy.dataplane.http import CRLF, HOP_BY_HOP, LAST_CHUNK, status_line
from tdproxy.dataplane.lifecycle import (
    ABORTED,
    DONE,
    RELAYING,
    TUNNEL,
    WAITING,
    exchange_state_name,
)
from tdproxy.dataplane.upstream import UpstreamConnection


class ResponseRelay(ClientIO):
    __slots__ = ("_tunnel", "_upgrade_wait")

    def __init__(self, ctx: ProxyContext) -> None:
        super().__init__(ctx)
        self._tunnel: UpstreamConnection | None = None
        self._upgrade_wait: Exchange | None = None

    # -- flow control -----------------------------------------------------------------------

    def pause_writing(self) -> None:
        super().pause_writing()
        up = self._upstream_for_io()
        if up is not None:
            up.set_reading(False)
            # The client is slow, not the backend: no response deadline while we hold the
            # backend back (client_send bounds the client).
            active = self._active
            if active is not None and active.state in (WAITING, RELAYING):
                active.deadline = INF

    def resume_writing(self) -> None:
        super().resume_writing()
        up = self._upstream_for_io()
        if up is not None:
            up.set_reading(True)
            active = self._active
            if active is not None and (
                active.state == RELAYING or (active.state == WAITING and active.request_done)
            ):
                active.deadline = self.ctx.clock.now + self.ctx.settings.response_header

    def upstream_write_paused(self, up: UpstreamConnection, paused: bool) -> None:
        """The backend's write buffer filled (or drained): hold the client back meanwhile, and
        give the backend ``response_header`` to take what waits."""
        self._set_pause(PAUSE_UPSTREAM, paused)
        active = self._active
        if active is None or active.upstream is not up or active.state != WAITING:
            return
        if paused:
            active.deadline = self.ctx.clock.now + self.ctx.settings.response_header
        elif not active.request_done:
            active.deadline = INF  # the backend reads again; the client's body deadline rules

    def _upstream_for_io(self) -> UpstreamConnection | None:
        if self._tunnel is not None:
            return self._tunnel
        active = self._active
        return active.upstream if active is not None else None

    def flush_batch(self) -> None:
        """Send what an upstream read collected; nothing in it can be taken back after this."""
        batch = self._batch  # end_batch and send_batch, inlined on the per-response path
        self._batch = None
        if batch:
            transport = self.transport
            if transport is not None and not transport.is_closing():
                transport.write(batch[0] if len(batch) == 1 else b"".join(batch))
        active = self._active
        if active is not None:
            active.batch = None

    # -- events from the upstream -----------------------------------------------------------

    def _stray(self, up: UpstreamConnection, event: str) -> None:
        """An upstream event the active exchange does not expect: a bug."""
        exchange = self._active
        found = "none" if exchange is None else exchange_state_name(exchange.state)
        up.abort()
        self.bug(f"upstream {event} with the active exchange in state {found}")

    def upstream_head(
        self, up: UpstreamConnection, status: int, headers: list[tuple[bytes, bytes]]
    ) -> None:
        exchange = self._active
        if exchange is None or exchange.upstream is not up or exchange.state != WAITING:
            self._stray(up, "head")
            return
        if status < 200:
            self._interim(exchange, up, status, headers)
            return
        exchange.status = status
        head = exchange.response_head(status, headers, self._closing_after(exchange))
        exchange.state = RELAYING  # WAITING -> RELAYING, checked above
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
        if exchange.response_mode != RESP_NONE and not self.write_paused:
            # The body must keep coming: response_header bounds each pause of the backend.
            exchange.deadline = self.ctx.clock.now + self.ctx.settings.response_header
        else:
            exchange.deadline = INF

    def _interim(
        self,
        exchange: Exchange,
        up: UpstreamConnection,
        status: int,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        if status == 101:
            if not exchange.websocket:
                self.upstream_failed(up, "protocol")
                return
            exchange.status = 101
            lines = [status_line(101)]
            lines.extend(name + b": " + value + CRLF for name, value in headers)
            if exchange.set_cookie:
                lines.append(exchange.set_cookie)  # a WebSocket user is placed like any other
            lines.append(CRLF)
            self._write(b"".join(lines))
            return
        if exchange.version == "1.1":
            lines = [status_line(status)]
            lines.extend(
                name + b": " + value + CRLF
                for name, value in headers
                if name.lower() not in HOP_BY_HOP
            )
            lines.append(CRLF)
            self._write(b"".join(lines))
        # Still WAITING: the final head must follow within response_header of this one.
        exchange.deadline = self.ctx.clock.now + self.ctx.settings.response_header

    def upstream_body(self, body: bytes) -> None:
        exchange = self._active
        if exchange is None or exchange.state != RELAYING:
            self.bug("upstream body outside RELAYING")
            return
        exchange.response_bytes += len(body)
        if not self.write_paused:
            exchange.deadline = self.ctx.clock.now + self.ctx.settings.response_header
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
        if exchange is None or exchange.upstream is not up or exchange.state != RELAYING:
            self._stray(up, "end of response")
            return
        if exchange.response_mode == RESP_CHUNKED:
            self._write(LAST_CHUNK)
        exchange.upstream = None
        exchange.deadline = INF
        if keep_alive and exchange.request_done and exchange.response_mode != RESP_CLOSE:
            up.release(self.ctx.clock.now)
        else:
            up.detach()
        self._finish(exchange, DONE, keep=exchange.keep_client)

    def _take_back_head(self, exchange: Exchange) -> None:
        batch = self._batch
        if batch is not None and exchange.batch is batch:
            # The head has not left yet (it is in this read's batch): take it back.
            del batch[exchange.batch_mark :]
            exchange.state = WAITING  # RELAYING -> WAITING: as if no head had come
            exchange.batch = None
            exchange.response_bytes = 0

    def _cut(self, exchange: Exchange) -> None:
        self.abort()
        self._finish(exchange, ABORTED, keep=False)

    def upstream_upgraded(self, up: UpstreamConnection, rest: bytes) -> bool:
        exchange = self._active
        transport = self.transport
        if (
            exchange is None
            or transport is None
            or exchange.upstream is not up
            or exchange.status != 101
        ):
            return False
        exchange.upstream = None
        exchange.deadline = INF
        self._tunnel = up
        up.tunnel = transport
        if rest:
            self._write(rest)
        self._upgrade_wait = None
        self._set_pause(PAUSE_BUFFER, False)
        pending = exchange.tunnel_data
        if pending:
            up.write(pending)
        self.move(TUNNEL)
        self.deadline = INF  # tunnel_idle is measured from progress (see check_deadline)
        self._finish(exchange, DONE, keep=True)  # the exchange became the tunnel
        return True

    def check_exchange_deadline(self, exchange: Exchange) -> None:
        """The active exchange's deadline passed: its phase took too long. Only the phases
        with an upstream set one (CONNECTING is bounded by its connect task)."""
        up = exchange.upstream
        if up is not None:
            self.upstream_failed(up, "timeout")
        else:
            self.bug(f"deadline of an exchange in state {exchange_state_name(exchange.state)}")

    # -- hooks the request side provides ----------------------------------------------------

    def _closing_after(self, exchange: Exchange) -> bool:
        """Will the connection close after this exchange's answer (Connection: close)?"""
        raise NotImplementedError

    def _finish(self, exchange: Exchange, state: int, keep: bool) -> None:
        raise NotImplementedError
