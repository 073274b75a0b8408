"""Idle keep-alive connections to one backend endpoint, reused across client connections.

The pool is LIFO: the most recently used connection is the warmest and the least likely to have
been closed by the backend's own idle timeout. Connections the backend closes while they wait are
dropped at once (the protocol tells the pool in ``connection_lost``), and the sweeper retires any
that waited longer than ``max_idle`` seconds.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tdproxy.dataplane.upstream import UpstreamConnection

MAX_IDLE_PER_POOL = 256
DEFAULT_MAX_IDLE_SECONDS = 30.0


class UpstreamPool:
    __slots__ = ("_idle", "closed", "key", "max_idle")

    def __init__(self, key: tuple[object, ...], max_idle: float = DEFAULT_MAX_IDLE_SECONDS) -> None:
        self.key = key
        self.max_idle = max_idle
        self._idle: list[UpstreamConnection] = []
        self.closed = False

    def get(self) -> UpstreamConnection | None:
        idle = self._idle
        while idle:
            connection = idle.pop()
            transport = connection.transport
            if connection.alive and transport is not None and not transport.is_closing():
                return connection
        return None

    def put(self, connection: UpstreamConnection, now: float) -> None:
        if self.closed or len(self._idle) >= MAX_IDLE_PER_POOL:
            connection.close()
            return
        connection.idle_since = now
        self._idle.append(connection)

    def discard(self, connection: UpstreamConnection) -> None:
        with contextlib.suppress(ValueError):
            self._idle.remove(connection)

    def expire(self, now: float) -> None:
        """Close connections idle longer than ``max_idle`` (oldest are at the front)."""
        idle = self._idle
        limit = now - self.max_idle
        while idle and idle[0].idle_since < limit:
            idle.pop(0).close()

    def close(self) -> None:
        self.closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    def __len__(self) -> int:
        return len(self._idle)

    def __repr__(self) -> str:
        return f"<UpstreamPool {self.key} idle={len(self._idle)}>"
