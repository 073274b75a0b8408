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
        table, pending = self.prepare(config)
        pending()
        return table

    def prepare(self, config: Config) -> tuple[RoutingTable, Callable[[], None]]:
        """Build the table for ``config`` without changing anything yet.

        Returns the table and a commit function that makes its states and pools the router's
        own; nothing is changed until that function runs, so a failed build loses nothing."""
        states = {
            backend.name: self.states.get(backend.name)
            or BackendState(backend.name, healthy=self._initial_health(backend))
            for backend in config.backends
        }
        pools: dict[tuple[object, ...], UpstreamPool] = {}

        max_idle = config.timeouts.upstream_idle

        def pool_for(backend: Backend) -> UpstreamPool:
            key = endpoint_key(backend)
            pool = self.pools.get(key)
            if pool is None:
                pool = UpstreamPool(key, max_idle)
            pools[key] = pool
            return pool

        table = RoutingTable(
            config, states, pool_for, self.generation + 1, secure_cookie=self._secure_cookie
        )

        def commit() -> None:
            for pool in pools.values():
                pool.max_idle = max_idle  # timeouts.upstream_idle applies to kept pools too
            retired = [pool for key, pool in self.pools.items() if key not in pools]
            self.generation = table.generation
            self.states = states
            self.pools = pools
            for pool in retired:
                pool.close()

        return table, commit

    def install(self, table: RoutingTable, commit: Callable[[], None]) -> None:
        """Make a prepared table current: one assignment for the hot path. The rotation goes on
        where the old table left it when the eligible backends and weights are the same."""
        commit()
        table.continue_rotation(self.table)
        self.table = table

    def apply(self, config: Config) -> RoutingTable:
        """Build the table for ``config`` and make it current."""
        table, commit = self.prepare(config)
        self.install(table, commit)
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
