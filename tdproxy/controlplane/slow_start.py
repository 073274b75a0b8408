"""The slow-start driver: moves ramping backends up their ramp, a step at a time.

The routing table computes a ramping backend's weight whenever it is refreshed
(:mod:`tdproxy.routing.slow_start`), but nothing on the hot path refreshes it: the selector is
never rebuilt per request. While the current table has a ramp going on (``ramp_ends`` set), this
driver's one task refreshes it every ``ramp_step(window)`` seconds (1 s, or a tenth of a shorter
window), and ends once every ramp is over. The router wakes it (``Router.on_ramp``) when a
health change or a reload starts a ramp; the app owns it and stops it on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from tdproxy.routing.router import Router
from tdproxy.routing.slow_start import ramp_step

log = logging.getLogger("tdproxy.slow_start")


class SlowStartDriver:
    """Refreshes ``router``'s table on a coarse schedule while any backend ramps up.

    ``sleep`` and ``clock`` (monotonic seconds) are injectable so tests can drive it."""

    def __init__(
        self,
        router: Router,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._router = router
        self._sleep = sleep
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._running = False

    @property
    def active(self) -> bool:
        """A ramp is being driven now."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Listen for ramps from now on (and drive one already going on)."""
        self._running = True
        self._router.on_ramp = self.wake
        self.wake()

    def wake(self) -> None:
        """A ramp may have started: drive it unless that is already happening."""
        if self._running and not self.active and self._router.table.ramp_ends is not None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="slow start")

    async def stop(self) -> None:
        self._running = False
        self._router.on_ramp = None
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        router = self._router
        while (ends := router.table.ramp_ends) is not None:
            window = router.table.config.routing.slow_start
            step = ramp_step(window) if window is not None else 0.0
            await self._sleep(max(0.0, min(step, ends - self._clock())))
            router.refresh()
        log.debug("slow start: every ramp is over")
