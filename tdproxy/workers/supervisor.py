"""``workers: N > 1``: one supervisor process with the control plane, N worker processes with
the data plane.

Theory of operation
-------------------
The supervisor is the single-process :class:`~tdproxy.app.App` with its data plane replaced by
a :class:`~tdproxy.workers.pool.WorkerPool`. Everything else is the app's own code, run once:
the config watcher and reload, health checks (active and passive), slow start, the change log,
the admin server. So there is one source of truth for the routing generation and for health.

- **Generations.** A reload is prepared as always (parse, validate, build, first checks), then
  every worker builds the same generation in a thread (``Prepare``); only when all have, the
  supervisor swaps its own table and tells every worker to swap (``Commit``): one message each,
  so they change over within the same instant. A worker that cannot build it fails the reload as
  a whole; one that does not answer in time builds it when the Commit arrives.
- **Health and slow start.** Every refresh of the supervisor's table (a health flip, a ramp
  step, a reload) sends every backend's health and ramp start to every worker (``States``); the
  worker sets them and rebuilds its selector. Ramp starts are ``CLOCK_MONOTONIC`` readings,
  which every process on the host shares, so each worker computes the same ramp weights.
- **Passive failures.** A worker counts them as one process does and reports each at once with
  its run; the supervisor sums the runs of all workers and marks the backend down at
  ``passive.max_failures`` (then tells every worker).
- **Counters.** Workers report snapshots four times a second (and once more when they exit);
  the supervisor sums them (:mod:`tdproxy.workers.counters`) into its own ``BackendState``
  objects, which the metrics collector and the status document read as they always do.
- **Semantics.** Each worker runs its own smooth weighted rotation, exact for the requests that
  worker serves; the kernel spreads connections over the workers, so over any window of
  consecutive requests the split is within +-N requests of the exact one (N = workers).
"""

from __future__ import annotations

import logging

from tdproxy.app import App, _Prepared
from tdproxy.config.model import Config
from tdproxy.observability import log_output
from tdproxy.routing.router import Router
from tdproxy.workers.messages import BackendHealth, HealthStates, ReloadTls
from tdproxy.workers.pool import WorkerPool
from tdproxy.workers.report import WorkersReport

log = logging.getLogger("tdproxy.workers")


def health_states(router: Router) -> HealthStates:
    return {
        name: BackendHealth(
            state.healthy, state.health_reason, state.health_changed_at, state.ramp_started
        )
        for name, state in router.states.items()
    }


class Supervisor(App):
    def __init__(
        self,
        config: Config,
        workers: int,
        config_path: str | None = None,
        config_text: str | None = None,
    ) -> None:
        super().__init__(config, config_path, config_text)
        self.pool = WorkerPool(workers, self._current, self._load_counters, self._passive)
        self.router.on_refresh = self._send_states

    def _current(self) -> tuple[Config, int, HealthStates]:
        return self.config, self.router.generation, health_states(self.router)

    # -- the data plane is the pool -----------------------------------------------------------

    async def _start_data_plane(self) -> None:
        log.info("starting %d worker processes", self.pool.count)
        log_output.share_outputs()  # the workers write to the same stdout and stderr
        await self.pool.start()

    async def _stop_data_plane(self, grace: float) -> None:
        await self.pool.stop(grace)

    @property
    def draining(self) -> bool:
        return self.pool.stopping

    def connections_active(self) -> int:
        return self.pool.totals.connections()

    def unrouted_requests(self) -> dict[int, int]:
        return self.pool.totals.unrouted()

    def workers_report(self) -> WorkersReport:
        return self.pool.report()

    # -- what the workers hear ------------------------------------------------------------

    def _send_states(self) -> None:
        self.pool.send_states(health_states(self.router))

    async def _prepare_data_plane(self, prepared: _Prepared) -> list[str]:
        return await self.pool.prepare(prepared.table.generation, prepared.config)

    def _apply_data_plane(self, new: Config) -> None:
        self.pool.totals.forget_except(self.router.states)
        self.pool.commit(self.router.generation, new, health_states(self.router))

    def _reload_tls_files(self) -> bool:
        self.pool.broadcast(ReloadTls())
        return True

    # -- what the workers say -------------------------------------------------------------

    def _load_counters(self) -> None:
        self.pool.totals.load(self.router.states)

    def _passive(self, name: str, kind: str) -> None:
        state = self.router.states.get(name)
        if state is None:
            return  # removed by a reload meanwhile
        state.consecutive_failures = self.pool.totals.backend(name).consecutive_failures
        self._check_passive(state, kind)
