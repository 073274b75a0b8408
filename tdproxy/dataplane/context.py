"""What every connection of the data plane shares: settings, the router, the clock, the log."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from tdproxy.config.model import Config
from tdproxy.dataplane.exchange import PeerFields
from tdproxy.dataplane.forwarded import TrustedProxies
from tdproxy.dataplane.lifecycle import BACKSTOP_SLACK, LINGER_SECONDS

if TYPE_CHECKING:
    from tdproxy.dataplane.endpoints import Endpoints
    from tdproxy.observability.access_log import AccessLog
    from tdproxy.routing.router import Router
    from tdproxy.routing.table import Target


class Connection(Protocol):
    """An accepted client connection, as the entrypoint's sweeper and shutdown see it: an
    HTTP/1.1 ClientConnection or an HTTP/2 H2ClientConnection."""

    def check_deadline(self, now: float) -> None: ...
    def shutdown(self) -> None: ...
    def abort(self) -> None: ...


class Settings:
    """Timeouts and limits as plain floats/ints, swapped whole on reload."""

    __slots__ = (
        "backstop",
        "client_body",
        "client_header",
        "client_send",
        "connect",
        "idle",
        "max_body_bytes",
        "max_head_bytes",
        "max_header_bytes",
        "max_headers",
        "max_url_bytes",
        "response_header",
        "tunnel_idle",
        "upstream_idle",
    )

    def __init__(self, config: Config) -> None:
        timeouts, limits = config.timeouts, config.limits
        self.connect = timeouts.connect
        self.response_header = timeouts.response_header
        self.client_header = timeouts.client_header
        self.client_body = timeouts.client_body
        self.idle = timeouts.idle
        self.client_send = timeouts.client_send
        self.tunnel_idle = timeouts.tunnel_idle
        self.upstream_idle = timeouts.upstream_idle
        # No state may go longer than this without progress (see lifecycle): longer than any
        # deadline a state can set, so it fires only when some state failed to bound itself.
        self.backstop = (
            max(
                timeouts.idle,
                timeouts.client_header,
                timeouts.client_body,
                timeouts.client_send,
                timeouts.response_header,
                timeouts.connect,
            )
            + LINGER_SECONDS
            + BACKSTOP_SLACK
        )
        self.max_header_bytes = limits.max_header_bytes
        self.max_headers = limits.max_headers
        self.max_url_bytes = limits.max_url_bytes
        self.max_body_bytes = limits.max_body_bytes
        # Bytes of a request head held before its end is seen: request line plus header section.
        self.max_head_bytes = limits.max_url_bytes + limits.max_header_bytes + 64


class Clock:
    """A coarse clock, advanced by the sweeper a few times a second: a free read per request."""

    __slots__ = ("now", "second", "wall")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.now = loop.time()
        self.wall = time.time()
        self.second = int(self.wall)

    def tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self.now = loop.time()
        self.wall = time.time()
        self.second = int(self.wall)


class ProxyContext:
    __slots__ = (
        "access_log",
        "clock",
        "connections",
        "endpoints",
        "http2",
        "loop",
        "max_connections",
        "on_passive_failure",
        "router",
        "scheme",
        "settings",
        "shutting_down",
        "tasks",
        "trusted_proxies",
        "unrouted",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        router: Router,
        config: Config,
        access_log: AccessLog | None,
        on_passive_failure: Callable[[Target, str], None],
        endpoints: Endpoints,
    ) -> None:
        self.loop = loop
        self.router = router
        self.endpoints = endpoints
        self.settings = Settings(config)
        self.max_connections = config.limits.max_connections
        self.scheme = b"https" if config.entrypoint.tls else b"http"
        self.trusted_proxies = trusted_proxies(config)
        # A TLS connection that chose h2 by ALPN becomes an H2ClientConnection (set at start).
        self.http2 = config.entrypoint.tls is not None and config.entrypoint.http2
        self.access_log = access_log
        self.on_passive_failure = on_passive_failure
        self.clock = Clock(loop)
        self.connections: set[Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.shutting_down = False
        # Requests answered without a backend (refused, none available, client gone first), by
        # status: they have no backend label, so they are counted here.
        self.unrouted: dict[int, int] = {}

    def peer_fields(self, address: bytes, scheme: bytes) -> PeerFields:
        """A new connection's forwarding fields: trusted or not is decided here, once."""
        trusted = self.trusted_proxies
        if trusted is None:
            return PeerFields(address, scheme)
        return trusted.peer_fields(address, scheme)

    def count_unrouted(self, status: int) -> None:
        unrouted = self.unrouted
        unrouted[status] = unrouted.get(status, 0) + 1

    def spawn(self, coroutine: object) -> None:
        """Run a connection's background step (an upstream connect) and keep a reference."""
        task: asyncio.Task[None] = self.loop.create_task(coroutine)  # type: ignore[arg-type]
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


def trusted_proxies(config: Config) -> TrustedProxies | None:
    """``entrypoint.trusted_proxies`` precomputed; None when there are none (the plain path)."""
    entries = config.entrypoint.trusted_proxies
    return TrustedProxies(entries) if entries else None
