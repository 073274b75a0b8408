"""Choosing a backend for a request, connecting, sending, and retrying elsewhere.

:class:`BackendDispatch` is shared by everything that carries requests from a client: an
HTTP/1.1 connection (:class:`~tdproxy.dataplane.client.ClientConnection`, one active exchange at
a time) and an HTTP/2 stream (:class:`~tdproxy.dataplane.h2_stream.H2Stream`, one exchange for
its life). Both are what an :class:`UpstreamConnection` reports to (``upstream_*``); this mixin
only needs the few things named in its annotations, and the owner's ``_respond_error``.
"""

from __future__ import annotations

import asyncio
import logging
import time

from tdproxy.dataplane.context import ProxyContext
from tdproxy.dataplane.exchange import EXCHANGE_NEXT, Exchange
from tdproxy.dataplane.lifecycle import (
    CONNECTING,
    INF,
    PAUSE_BUFFER,
    RELAYING,
    WAITING,
    exchange_state_name,
)
from tdproxy.dataplane.upstream import UpstreamClient, UpstreamConnection
from tdproxy.routing.table import Target

log = logging.getLogger("tdproxy.dataplane")

REPLAY_LIMIT = 64 * 1024


def account(ctx: ProxyContext, exchange: Exchange, peer: bytes) -> None:
    """An exchange ended: count it for its backend (or as unrouted) and log it."""
    status = exchange.status
    target = exchange.target_backend
    if target is not None:
        target_state = target.state
        exchange.end_attempt()
        target_state.record_response(
            status, ctx.clock.second, time.monotonic() - exchange.monotonic_start
        )
        if not exchange.generated:
            target_state.consecutive_failures = 0
    else:
        ctx.count_unrouted(status)
    if ctx.access_log is not None:
        # Behind a trusted proxy the client it names (exchange.client), else the peer.
        ctx.access_log.log(exchange, exchange.client or peer, status, ctx.clock)


class BackendDispatch(asyncio.Protocol):
    """The base of every request carrier: an HTTP/1.1 client connection (the asyncio protocol
    of its transport) and an HTTP/2 stream (which never sees transport events). One chain of
    single inheritance, so the compiled build (mypyc) can make it a native class."""

    __slots__ = ("_active", "ctx", "write_paused")

    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx
        self._active: Exchange | None = None  # the exchange being answered
        self.write_paused = False  # the client takes no more bytes for now

    # -- what each carrier provides -------------------------------------------------------

    def bug(self, what: str) -> None:
        raise NotImplementedError

    def _set_pause(self, bit: int, on: bool) -> None:
        raise NotImplementedError

    def _respond_error(self, exchange: Exchange, code: int) -> None:
        raise NotImplementedError

    def upstream_done(self, up: UpstreamConnection, keep_alive: bool) -> None:
        raise NotImplementedError

    def _take_back_head(self, exchange: Exchange) -> None:
        """The answer's head may still be unsent (held until the end of the backend read that
        brought it): if so, take it back and return the exchange to WAITING."""
        raise NotImplementedError

    def _cut(self, exchange: Exchange) -> None:
        """Part of the answer reached the client: end it so that it never looks complete."""
        raise NotImplementedError

    def upstream_failed(self, up: UpstreamConnection, kind: str) -> None:
        """The upstream broke (``kind``: reset, timeout, protocol) during an exchange: while
        nothing of the answer has left, retry elsewhere or answer 502/504; else cut it."""
        exchange = self._active
        if exchange is None or exchange.upstream is not up:
            up.abort()
            self.bug(f"upstream {kind} failure for an exchange it does not serve")
            return
        exchange.upstream = None
        exchange.deadline = INF
        up.abort()
        target = exchange.target_backend
        assert target is not None
        target.state.record_error(kind)
        if kind == "timeout" and exchange.state == WAITING:
            self.ctx.on_passive_failure(target, kind)
        if exchange.state == RELAYING:
            self._take_back_head(exchange)
        if exchange.state == WAITING and exchange.status != 101:
            exchange.end_attempt()
            if not exchange.replayed and self._retry(exchange, target, replay=True):
                return
            self._respond_error(exchange, 504 if kind == "timeout" else 502)
            return
        # Part of the response (or a 101 that promised a tunnel) reached the client.
        self._cut(exchange)

    # -- choosing a backend and connecting -----------------------------------------------

    def _route(self, exchange: Exchange) -> None:
        """The exchange's turn has come: answer a refusal, or choose a backend and send."""
        if exchange.refusal:
            self._respond_error(exchange, exchange.refusal)
            return
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

    def _enter(self, exchange: Exchange, state: int) -> bool:
        if state in EXCHANGE_NEXT[exchange.state]:
            exchange.state = state
            return True
        self.bug(
            f"exchange state {exchange_state_name(exchange.state)} -> {exchange_state_name(state)}"
        )
        return False

    def _dispatch(self, exchange: Exchange, target: Target) -> None:
        exchange.target_backend = target
        exchange.tried.append(target)
        target.state.in_flight += 1
        exchange.counted = True
        up = target.endpoint.pool.get()
        if up is not None:
            self._attach(exchange, up)
        elif self._enter(exchange, CONNECTING):
            exchange.deadline = INF  # the connect task is bounded by timeouts.connect
            self.ctx.spawn(self._connect(exchange, target))

    async def _connect(self, exchange: Exchange, target: Target) -> None:
        loop = self.ctx.loop
        endpoint = target.endpoint
        try:
            _, up = await asyncio.wait_for(
                loop.create_connection(
                    lambda: UpstreamConnection(endpoint.pool),
                    endpoint.host,
                    endpoint.port,
                    ssl=endpoint.ssl_context,
                    server_hostname=endpoint.server_hostname,
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
        if exchange is not self._active or exchange.state != CONNECTING:
            up.release(self.ctx.clock.now)  # the client left meanwhile: keep it for another
            return
        if not up.usable():
            # Accepted, then closed before we could write: nothing was sent, try elsewhere.
            self._connect_failed(exchange, target, "connect")
            return
        self._attach(exchange, up)

    def _connect_failed(self, exchange: Exchange, target: Target, kind: str) -> None:
        target.state.record_error(kind)
        self.ctx.on_passive_failure(target, kind)
        if exchange is not self._active or exchange.state != CONNECTING:
            return
        exchange.end_attempt()
        # Nothing of the request reached any backend: any method may go elsewhere.
        if self._retry(exchange, target, replay=False):
            return
        self._respond_error(exchange, 504 if kind == "timeout" else 502)

    def _attach(self, exchange: Exchange, up: UpstreamConnection) -> None:
        if WAITING in EXCHANGE_NEXT[exchange.state]:  # _enter, inlined on the per-request path
            exchange.state = WAITING
        else:
            up.release(self.ctx.clock.now)
            self._enter(exchange, WAITING)  # reports the bug
            return
        exchange.upstream = up
        target = exchange.target_backend
        assert target is not None
        if exchange.request_done and not self.write_paused:
            exchange.deadline = self.ctx.clock.now + self.ctx.settings.response_header
        else:
            # The body still comes (client_body bounds the client), or the client holds the
            # backend back (client_send bounds the client; resume_writing re-arms this).
            exchange.deadline = INF
        head = exchange.request_head(target)
        client: UpstreamClient = self  # type: ignore[assignment]  # every owner is one
        body = exchange.body
        if body:
            up.send(client, b"".join([head, *body]), exchange.head_only)  # one send
            for chunk in body:
                exchange.capture_replay(chunk, REPLAY_LIMIT)
            exchange.body = []
            exchange.body_buffered = 0
            self._set_pause(PAUSE_BUFFER, False)
        else:
            up.send(client, head, exchange.head_only)
        if self.write_paused:
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
            exchange.body = exchange.take_replay()
            exchange.replayed = True
        if table.sticky:
            exchange.set_cookie = target.set_cookie
        self._dispatch(exchange, target)
        return True

    # -- the backend connection ended -------------------------------------------------------

    def upstream_lost(self, up: UpstreamConnection) -> None:
        exchange = self._active
        if exchange is None or exchange.upstream is not up:
            self.bug("an upstream this connection does not hold was lost")
            return
        if exchange.state == RELAYING and exchange.until_close and up.eof:
            # Read-until-close framing: a clean end of the connection is the end of the body.
            # A reset is not: that body is cut short and must not look complete.
            self.upstream_done(up, False)
            return
        if exchange.state == WAITING and up.reused and not up.got_bytes and exchange.replayable():
            # A pooled connection the backend had already closed: try again, same backend.
            exchange.upstream = None
            target = exchange.target_backend
            assert target is not None
            exchange.tried.remove(target)
            exchange.end_attempt()
            exchange.body = exchange.take_replay()
            self._dispatch(exchange, target)
            return
        self.upstream_failed(up, "reset")
