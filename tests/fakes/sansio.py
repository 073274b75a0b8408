"""Drive tdproxy's hot-path protocol objects without sockets: fake transports, a fake clock.

A :class:`Rig` holds a real :class:`ProxyContext` (real router, real config) whose clock the test
moves by hand, a :class:`ClientConnection` attached to a :class:`FakeTransport`, and upstream
connections that the rig creates on demand (the pool is pre-filled, and a connect that the hot
path starts is answered at once with a new fake upstream, or refused, as the test says).
Everything the proxy writes is recorded per transport, so a test reads the bytes the client and
each backend would have received.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from tdproxy.config.loader import parse_config
from tdproxy.dataplane.client import ClientConnection
from tdproxy.dataplane.context import ProxyContext
from tdproxy.dataplane.endpoints import Endpoints
from tdproxy.dataplane.lifecycle import CLOSED, connection_state_name
from tdproxy.dataplane.upstream import UpstreamConnection
from tdproxy.routing.router import Router


class FakeTransport:
    """Just enough of ``asyncio.Transport``: records writes, pauses, EOF, close and abort."""

    def __init__(
        self, protocol: asyncio.BaseProtocol | None = None, peer: str = "192.0.2.7"
    ) -> None:
        self.protocol = protocol
        self.peer = peer
        self.written = bytearray()
        self.reading = True
        self.eof_written = False
        self.closed = False
        self.aborted = False
        self.buffered = 0  # bytes "in the kernel": set by the test to simulate a slow reader

    # -- what the hot path calls --
    def write(self, data: bytes) -> None:
        if self.closed or self.aborted:
            raise AssertionError(f"write after close: {bytes(data)[:80]!r}")
        self.written += data

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return (self.peer, 50000) if name == "peername" else default

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    # -- for the test --
    def take(self) -> bytes:
        data = bytes(self.written)
        self.written.clear()
        return data

    @property
    def ended(self) -> bool:
        return self.closed or self.aborted


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.wall = 1_700_000_000.0
        self.second = int(self.wall)

    def tick(self, loop: object) -> None:  # the sweeper's call; the test moves time itself
        pass

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.wall += seconds
        self.second = int(self.wall)


BASE_CONFIG: dict[str, Any] = {
    "entrypoint": {"address": "127.0.0.1", "port": 18080},
    "backends": [{"name": "a", "url": "http://127.0.0.1:18091", "weight": 1}],
    "health_check": {"enabled": False},
    "access_log": {"enabled": False},
    "timeouts": {
        "connect": "2s",
        "response_header": "5s",
        "client_header": "3s",
        "client_body": "4s",
        "idle": "10s",
        "client_send": "6s",
    },
}


class RigContext(ProxyContext):
    """The real context, except that connects are not run: the tests fill the pools instead."""

    __slots__ = ("connects",)

    def spawn(self, coroutine: object) -> None:
        if not hasattr(self, "connects"):
            self.connects = 0
        self.connects += 1
        coroutine.close()  # type: ignore[attr-defined]


class Rig:
    """One client connection in front of fake upstreams, on a fake clock."""

    def __init__(self, **overrides: Any) -> None:
        config_data = _merge(BASE_CONFIG, overrides)
        self.config = parse_config(config_data)
        self.loop = asyncio.new_event_loop()
        self.endpoints = Endpoints()
        self.router = Router(self.config, self.endpoints)
        self.ctx = RigContext(
            self.loop, self.router, self.config, None, lambda t, k: None, self.endpoints
        )
        self.clock = FakeClock()
        self.ctx.clock = self.clock  # type: ignore[assignment]
        self.upstreams: list[tuple[UpstreamConnection, FakeTransport]] = []
        for pool in self.endpoints.pools:
            self.add_pooled(pool)
        self.transport = FakeTransport()
        self.client = ClientConnection(self.ctx)
        self.client.connection_made(self.transport)  # type: ignore[arg-type]

    def add_pooled(self, pool: Any) -> UpstreamConnection:
        up = UpstreamConnection(pool)
        transport = FakeTransport(up)
        up.connection_made(transport)  # type: ignore[arg-type]
        pool.put(up, self.clock.now)
        self.upstreams.append((up, transport))
        return up

    # -- driving --
    def send(self, data: bytes) -> None:
        self.client.data_received(data)

    def busy_upstream(self) -> tuple[UpstreamConnection, FakeTransport]:
        """The upstream connection the active exchange holds."""
        for up, transport in self.upstreams:
            if up.client is self.client and not transport.ended:
                return up, transport
        raise AssertionError(f"no upstream attached; {self.client!r}")

    def respond(self, data: bytes) -> None:
        up, _ = self.busy_upstream()
        up.data_received(data)

    def advance(self, seconds: float) -> None:
        """Move the clock and run the sweeper's check, as the sweeper does every quarter second."""
        step = 0.25
        remaining = seconds
        while remaining > 1e-9:
            delta = min(step, remaining)
            self.clock.advance(delta)
            remaining -= delta
            if self.client.state != CLOSED and not self.transport.ended:
                self.client.check_deadline(self.clock.now)

    def lose(self, exc: Exception | None = None) -> None:
        """The client transport is gone (what asyncio reports after close/abort or a reset)."""
        self.client.connection_lost(exc)

    @property
    def state(self) -> str:
        return connection_state_name(self.client.state)

    def close(self) -> None:
        self.loop.close()


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


Check = Callable[[Rig], None]
