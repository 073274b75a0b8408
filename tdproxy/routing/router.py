"""The Router holds the current routing table and builds the next one.

A new config generation becomes a complete new :class:`RoutingTable`, swapped in with one
assignment. Observed state (:class:`BackendState`) is carried over by backend name. How a backend
is reached (its connection pool and TLS context) belongs to the data plane: the router asks an
:class:`EndpointProvider` (``tdproxy.dataplane.endpoints.Endpoints``) for each backend's endpoint
and commits the provider's choice together with the table, so routing imports no networking code.

A reload that adds a backend, or raises one from weight 0, starts its slow-start ramp when the
new table goes live; a backend the reload leaves as it was keeps whatever ramp it had. Whenever
the current table has a ramp going on, the router tells ``on_ramp`` (the control plane's
``SlowStartDriver``), which then refreshes the table step by step until every ramp is over.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from tdproxy.config.model import Backend, Config
from tdproxy.routing.state import BackendState
from tdproxy.routing.table import RoutingTable

if TYPE_CHECKING:
    from tdproxy.dataplane.endpoints import Endpoint


class EndpointChoice(Protocol):
    """The endpoints prepared for one config: nothing changes until ``commit``."""

    def for_backend(self, backend: Backend) -> Endpoint: ...

    def commit(self) -> None: ...


class EndpointProvider(Protocol):
    def prepare(self, config: Config) -> EndpointChoice: ...


class Router:
    def __init__(
        self,
        config: Config,
        endpoints: EndpointProvider,
        secure_cookie: bool = False,
        initial_health: Callable[[Backend], bool] = lambda backend: True,
        monotonic: Callable[[], float] = time.monotonic,
        generation: int = 1,
    ) -> None:
        self.states: dict[str, BackendState] = {}
        self.endpoints = endpoints
        self.generation = generation - 1  # the first table built below is ``generation``
        self._secure_cookie = secure_cookie
        self._initial_health = initial_health
        self._monotonic = monotonic  # the clock of slow-start ramps
        self.on_ramp: Callable[[], None] | None = None  # called when a ramp is going on
        # Called after every install and refresh (a worker supervisor tells its workers).
        self.on_refresh: Callable[[], None] | None = None
        self._initial = True  # building the first table: nothing comes into service
        self.table = self._build(config)
        self._initial = False

    def _build(self, config: Config) -> RoutingTable:
        table, pending = self.prepare(config)
        pending()
        return table

    def prepare(
        self, config: Config, generation: int | None = None
    ) -> tuple[RoutingTable, Callable[[], None]]:
        """Build the table for ``config`` without changing anything yet. Its generation is the
        next one, or ``generation`` (a worker builds the generation its supervisor numbered).

        Returns the table and a commit function that makes its states and endpoints the
        router's own; nothing is changed until that function runs, so a failed build loses
        nothing."""
        states = {
            backend.name: self.states.get(backend.name)
            or BackendState(backend.name, healthy=self._initial_health(backend))
            for backend in config.backends
        }
        ramps = self._coming_into_service(config)
        choice = self.endpoints.prepare(config)
        table = RoutingTable(
            config,
            states,
            choice.for_backend,
            self.generation + 1 if generation is None else generation,
            secure_cookie=self._secure_cookie,
        )

        def commit() -> None:
            self.generation = table.generation
            self.states = states
            choice.commit()
            now = self._monotonic()
            for name in ramps:
                if states[name].healthy:
                    states[name].start_ramp(now)

        return table, commit

    def _coming_into_service(self, config: Config) -> list[str]:
        """The backends ``config`` adds or raises from weight 0 (none at start-up): each starts
        a slow-start ramp when its table goes live."""
        if self._initial:
            return []
        before = {target.name: target.weight for target in self.table.targets}
        return [
            backend.name
            for backend in config.backends
            if backend.weight > 0 and before.get(backend.name, 0) == 0
        ]

    def install(self, table: RoutingTable, commit: Callable[[], None]) -> None:
        """Make a prepared table current: one assignment for the hot path. The rotation goes on
        where the old table left it when the eligible backends and weights are the same."""
        commit()
        # Health and ramps as they are now, the ramps the commit started included.
        table.refresh(self._monotonic())
        table.continue_rotation(self.table)
        self.table = table
        self._tell_ramp()
        if self.on_refresh is not None:
            self.on_refresh()

    def apply(self, config: Config) -> RoutingTable:
        """Build the table for ``config`` and make it current."""
        table, commit = self.prepare(config)
        self.install(table, commit)
        return table

    def refresh(self) -> None:
        """Health changed somewhere, or a ramp moved on: rebuild the current table's selector."""
        self.table.refresh(self._monotonic())
        self._tell_ramp()
        if self.on_refresh is not None:
            self.on_refresh()

    def _tell_ramp(self) -> None:
        if self.table.ramp_ends is not None and self.on_ramp is not None:
            self.on_ramp()
