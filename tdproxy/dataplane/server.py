"""The entrypoint: the listening socket, the deadline sweeper and the graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl

from tdproxy.config.model import Config
from tdproxy.dataplane.client import ClientConnection
from tdproxy.dataplane.context import ProxyContext
from tdproxy.dataplane.proxy_accept import ProxyProtocolListener

log = logging.getLogger("tdproxy.entrypoint")

SWEEP_INTERVAL = 0.25


def tls_server_context(certificate: str, key: str, http2: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificate, key)
    # RFC 9113 §9.2: TLS 1.2 at least for h2 (the default context's minimum already).
    context.set_alpn_protocols(["h2", "http/1.1"] if http2 else ["http/1.1"])
    return context


class Entrypoint:
    def __init__(self, ctx: ProxyContext, config: Config, *, reuse_port: bool = False) -> None:
        self.ctx = ctx
        # Worker processes each listen on the same port; the kernel spreads new connections.
        self.reuse_port = reuse_port
        self.address = config.entrypoint.address
        self.port = config.entrypoint.port
        tls = config.entrypoint.tls
        self.ssl_context = (
            tls_server_context(tls.certificate, tls.key, config.entrypoint.http2) if tls else None
        )
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        # entrypoint.proxy_protocol: connections are accepted by the listener, which takes the
        # PROXY header off each one before asyncio owns it (see proxy_accept).
        self._proxied: ProxyProtocolListener | None = None
        if config.entrypoint.proxy_protocol:
            self._proxied = ProxyProtocolListener(
                ctx, self.address, self.port, self.ssl_context, reuse_port=reuse_port
            )

    async def start(self) -> None:
        loop = self.ctx.loop
        if self._proxied is not None:
            self._proxied.port = self.port  # a worker is told its port after construction
            await self._proxied.start()
            self.port = self._proxied.port
            self._start_sweeper()
            return
        self._server = await loop.create_server(
            lambda: ClientConnection(self.ctx),
            self.address,
            self.port,
            ssl=self.ssl_context,
            backlog=2048,
            reuse_address=True,
            reuse_port=self.reuse_port or None,
        )
        sockets = self._server.sockets
        if sockets and self.port == 0:
            self.port = sockets[0].getsockname()[1]
        self._start_sweeper()

    def _start_sweeper(self) -> None:
        self._sweeper = self.ctx.loop.create_task(self._sweep(), name="tdproxy-sweeper")
        scheme = "https" if self.ssl_context else "http"
        proxied = " (PROXY protocol)" if self._proxied is not None else ""
        log.info("entrypoint listening on %s://%s:%d%s", scheme, self.address, self.port, proxied)

    def reload_tls(self, config: Config) -> None:
        """Load new certificate files; new connections use them, open ones are untouched."""
        tls = config.entrypoint.tls
        if tls is None or self.ssl_context is None:
            return
        self.ssl_context.load_cert_chain(tls.certificate, tls.key)

    async def _sweep(self) -> None:
        ctx = self.ctx
        loop = ctx.loop
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            ctx.clock.tick(loop)
            now = ctx.clock.now
            for connection in list(ctx.connections):
                connection.check_deadline(now)
            ctx.endpoints.expire_idle(now)
            if ctx.access_log is not None:
                ctx.access_log.flush()

    async def shutdown(self, grace: float) -> None:
        """Stop accepting, let answers in progress finish within ``grace``, then close all."""
        ctx = self.ctx
        ctx.shutting_down = True
        if self._server is not None:
            self._server.close()
        if self._proxied is not None:
            self._proxied.close()
        for connection in list(ctx.connections):
            connection.shutdown()
        deadline = ctx.loop.time() + grace
        while ctx.connections and ctx.loop.time() < deadline:
            await asyncio.sleep(0.05)
        if ctx.connections:
            log.warning("shutdown grace over: closing %d connection(s)", len(ctx.connections))
            for connection in list(ctx.connections):
                connection.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        # Connects still under way (a backend that does not answer its SYN): cancelled, and
        # awaited, so that none outlives the loop.
        tasks = list(ctx.tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        ctx.endpoints.close()
        if ctx.access_log is not None:
            ctx.access_log.flush()
        if self._server is not None:
            await self._server.wait_closed()
