"""The Router holds the current routing table and builds the next one.

A new config generation becomes a complete new :class:`RoutingTable`, swapped in with one
assignment. Observed state (:class:`BackendState`) is carried over by backend name; connection
pools are carried over while a backend's endpoint (scheme, host, port, TLS verification) stays
the same, and retired otherwise.
"""

from __future__ import annotations

from collections.abc import Callable

from tdproxy.config.model import Backend, Config
from tdproxy.dataplane.pool import UpstreamPool
from tdproxy.routing.state import BackendState
from tdproxy.routing.table import RoutingTable


def endpoint_key(backend: Backend) -> tuple[object, ...]:
    return (backend.name, backend.scheme, backend.host, backend.port, backend.tls_verify)


class Router:
    def __init__(
        self,
        config: Config,
        secure_cookie: bool = False,
        initial_health: Callable[[Backend], bool] = lambda backend: True,
    ) -> None:
        self.states: dict[str, BackendState] = {}
        self.pools: dict[tuple[object, ...], UpstreamPool] = {}
        self.generation = 0
        self._secure_cookie = secure_cookie
        self._initial_health = initial_health
        self.table = self._build(config)

    def _build(self, config: Config) -> RoutingTable:
        self.generation += 1
        states = {
            backend.name: self.states.get(backend.name)
            or BackendState(backend.name, healthy=self._initial_health(backend))
            for backend in config.backends
        }
        pools: dict[tuple[object, ...], UpstreamPool] = {}

        def pool_for(backend: Backend) -> UpstreamPool:
            key = endpoint_key(backend)
            pool = self.pools.get(key) or UpstreamPool(key)
            pools[key] = pool
            return pool

        table = RoutingTable(
            config, states, pool_for, self.generation, secure_cookie=self._secure_cookie
        )
        retired = [pool for key, pool in self.pools.items() if key not in pools]
        self.states = states
        self.pools = pools
        for pool in retired:
            pool.close()
        return table

    def apply(self, config: Config) -> RoutingTable:
        """Build the table for ``config`` and make it current (one assignment)."""
        table = self._build(config)
        self.table = table
        return table

    def refresh(self) -> None:
        """Health changed somewhere: rebuild the current table's selector."""
        self.table.refresh()

    def expire_idle(self, now: float) -> None:
        for pool in self.pools.values():
            pool.expire(now)

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
