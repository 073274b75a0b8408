"""The redirect port behind a load balancer: redirect, unless a trusted proxy says it was HTTPS.

A balancer that terminates TLS itself often forwards to one plain-HTTP port and says in
``X-Forwarded-Proto`` what the client used. If tdproxy's redirect port answered such requests
with a redirect, a client that already came over HTTPS would be redirected forever. So, when
``entrypoint.trusted_proxies`` or ``entrypoint.proxy_protocol`` is set, the redirect port is
served by the data plane (:class:`RedirectConnection`, a
:class:`~tdproxy.dataplane.client.ClientConnection`): a request from a trusted peer marked
``X-Forwarded-Proto: https`` is proxied like any other, everything else gets the same redirect
as :mod:`tdproxy.dataplane.redirect` gives (301 for GET/HEAD, 308 otherwise). With PROXY
protocol on, the redirect port expects the header too (a balancer sends it to every port).

Without either setting the small aiohttp server of :mod:`tdproxy.dataplane.redirect` serves
the port, as before.
"""

from __future__ import annotations

import asyncio
import logging

from tdproxy.config.model import Config
from tdproxy.dataplane.client import ClientConnection
from tdproxy.dataplane.context import ProxyContext
from tdproxy.dataplane.exchange import Exchange
from tdproxy.dataplane.forwarded import forwarded_https
from tdproxy.dataplane.http import CRLF, split_absolute_form, status_line
from tdproxy.dataplane.lifecycle import DONE
from tdproxy.dataplane.proxy_accept import ProxyProtocolListener
from tdproxy.dataplane.redirect import https_location

log = logging.getLogger("tdproxy.entrypoint")


def served_by_data_plane(config: Config) -> bool:
    entrypoint = config.entrypoint
    return bool(entrypoint.trusted_proxies) or entrypoint.proxy_protocol


def redirect_response(exchange: Exchange, https_port: int, close: bool) -> tuple[int, bytes, int]:
    """(status, the whole response, its body length) sending a request to HTTPS."""
    target = exchange.target
    if target[:1] != b"/":
        split = split_absolute_form(target)
        target = split[1] if split is not None else b"/"
    host = (exchange.host or b"").decode("latin-1")
    location = https_location(host, target.decode("latin-1"), https_port).encode("latin-1")
    # 301 is what browsers expect for GET/HEAD; 308 keeps the method and body for others.
    status = 301 if exchange.method in ("GET", "HEAD") else 308
    body = location + b"\n"
    head = [
        status_line(status),
        b"Location: %s\r\n" % location,
        b"Content-Type: text/plain; charset=utf-8\r\n",
        b"Content-Length: %d\r\n" % len(body),
    ]
    if close:
        head.append(b"Connection: close\r\n")
    head.append(CRLF)
    if exchange.head_only:
        return status, b"".join(head), 0
    return status, b"".join(head) + body, len(body)


class RedirectConnection(ClientConnection):
    """A connection to the redirect port: proxied when a trusted proxy says HTTPS."""

    __slots__ = ("https_port",)

    def __init__(self, ctx: ProxyContext, peer: bytes | None, https_port: int) -> None:
        super().__init__(ctx, peer)
        self.https_port = https_port

    def _start(self, exchange: Exchange) -> None:
        if exchange.refusal or (self._peer_fields.trusted and forwarded_https(exchange)):
            super()._start(exchange)
            return
        self._active = exchange
        keep = exchange.keep_alive and exchange.request_done and not self._closing_after(exchange)
        status, response, body_length = redirect_response(exchange, self.https_port, not keep)
        self._write(response)
        exchange.status = status
        exchange.response_bytes = body_length
        exchange.generated = True
        self._finish(exchange, DONE, keep=keep)


class RedirectListener:
    """The redirect port, accepted by the data plane (plain HTTP, PROXY header if configured)."""

    def __init__(
        self, ctx: ProxyContext, config: Config, https_port: int, *, reuse_port: bool = False
    ) -> None:
        self.ctx = ctx
        self.reuse_port = reuse_port  # worker processes each listen on the same port
        self.address = config.entrypoint.address
        self.port = config.entrypoint.redirect_http_port or 0
        self.https_port = https_port
        self._server: asyncio.AbstractServer | None = None
        self._proxied: ProxyProtocolListener | None = None
        if config.entrypoint.proxy_protocol:
            self._proxied = ProxyProtocolListener(
                ctx,
                self.address,
                self.port,
                None,
                lambda ctx, peer: RedirectConnection(ctx, peer, https_port),
                reuse_port=reuse_port,
            )

    async def start(self) -> None:
        ctx = self.ctx
        if self._proxied is not None:
            await self._proxied.start()
        else:
            self._server = await ctx.loop.create_server(
                lambda: RedirectConnection(ctx, None, self.https_port),
                self.address,
                self.port,
                backlog=2048,
                reuse_address=True,
                reuse_port=self.reuse_port or None,
            )
        log.info(
            "redirecting http://%s:%d to https, except requests a trusted proxy marks https",
            self.address,
            self.port,
        )

    async def stop(self) -> None:
        """Stop accepting; open connections are drained with the entrypoint's."""
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._proxied is not None:
            self._proxied.close()
            self._proxied = None
