"""Active health checks: a pure rise/fall state machine and the asyncio loops that feed it.

Theory of operation: :class:`HealthHysteresis` is I/O-free; it counts consecutive results and
says when health flips (``fall`` failures in a row -> down, ``rise`` successes -> up).
:class:`HealthChecker` is the thin shell around it: one task per backend, first run at a random
offset within the interval so many backends (and replicas) are not checked in lockstep, each probe
bounded by ``timeout``. A flip sets the :class:`BackendState`, is logged on ``tdproxy.health``,
rebuilds the selector (``router.refresh()``) and is reported to ``on_transition`` (the change log).

A reload keeps the start-up promise for what it brings: backends it adds, or whose url changed,
(every backend when it turns checks on) are checked once before the new table serves
(:func:`needs_first_check`, :meth:`HealthChecker.first_checks`, :meth:`HealthChecker.admit`),
bounded like the start-up round; one that fails is down until ``rise`` successes.

Invariants: the :class:`BackendState` is the truth about health. A hysteresis that disagrees with
it (a passive down by the data plane, or checks disabled) is reset to the state's side with zeroed
counts before the next result counts, so exactly ``rise`` active successes in a row bring a
passively-downed backend back. Loops look their target up by name in the router's current table
every round, so a reload that changes a backend's url needs no restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import random
import time
from collections.abc import Awaitable, Callable

import aiohttp
from yarl import URL

from tdproxy.config.model import Backend, Config, HealthCheck
from tdproxy.controlplane.changes import checks_cause
from tdproxy.routing.router import Router
from tdproxy.routing.state import BackendState
from tdproxy.routing.table import RoutingTable, Target

log = logging.getLogger("tdproxy.health")

BODY_LIMIT = 64 * 1024  # bytes of a health response read; the rest is dropped with the connection
INITIAL_MARGIN = 0.5  # seconds the start-up round may take beyond ``timeout``
USER_AGENT = "tdproxy-health-check"

Result = tuple[bool, str]  # (healthy, detail such as "HTTP 500" or "connect refused")
# (backend name, healthy now, cause such as "3 failed checks (HTTP 503)")
Transition = Callable[[str, bool, str], None]


class HealthHysteresis:
    """Consecutive-result thresholds for one backend (pure; no clock, no I/O)."""

    __slots__ = ("failures", "fall", "healthy", "rise", "successes")

    def __init__(self, fall: int, rise: int, healthy: bool = True) -> None:
        self.fall = fall
        self.rise = rise
        self.healthy = healthy
        self.successes = 0  # length of the current run of successes
        self.failures = 0  # length of the current run of failures

    def configure(self, fall: int, rise: int) -> None:
        """New thresholds. The running counts are kept, so a reload never hides a failing run."""
        self.fall = fall
        self.rise = rise

    def observe(self, success: bool) -> bool | None:
        """Count one result; return the new health when it flips, else ``None``."""
        if success:
            self.failures = 0
            self.successes += 1
            if not self.healthy and self.successes >= self.rise:
                self.healthy = True
                return True
        else:
            self.successes = 0
            self.failures += 1
            if self.healthy and self.failures >= self.fall:
                self.healthy = False
                return False
        return None

    def reset(self, healthy: bool) -> None:
        """Force a health (start-up round, passive down) and count from zero again."""
        self.healthy = healthy
        self.successes = 0
        self.failures = 0

    def __repr__(self) -> str:
        health = "up" if self.healthy else "down"
        return (
            f"<HealthHysteresis {health} successes={self.successes}/{self.rise} "
            f"failures={self.failures}/{self.fall}>"
        )


class HealthChecker:
    """Runs the active checks for every backend in ``router``'s current table.

    ``sleep``, ``jitter`` (a number in [0, 1) scaling the first wait) and ``clock`` are injectable
    so tests can run the loops fast or deterministically. ``on_transition`` hears each flip the
    check loops cause (not the start-up round's or a reload's first checks: those are part of
    the start or the reload).
    """

    def __init__(
        self,
        router: Router,
        config: HealthCheck,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
        on_transition: Transition | None = None,
    ) -> None:
        self._router = router
        self._on_transition = on_transition
        self._config = config
        self._sleep = sleep
        self._jitter = jitter
        self._clock = clock
        self._trackers: dict[str, HealthHysteresis] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._running = False

    @property
    def config(self) -> HealthCheck:
        return self._config

    @property
    def checking(self) -> frozenset[str]:
        """Names of the backends whose check loop is running."""
        return frozenset(name for name, task in self._tasks.items() if not task.done())

    def hysteresis(self, name: str) -> HealthHysteresis | None:
        return self._trackers.get(name)

    # -- lifecycle -----------------------------------------------------------------------

    async def initial_round(self) -> None:
        """Check every backend once, concurrently, and set its health from that one result.

        Unlike the loops, a single failure marks a backend down here: a proxy started in front
        of a dead environment must not send it traffic for ``fall * interval`` first, and one
        started in front of a live environment serves at once. The round is bounded by
        ``timeout`` plus a small margin; a probe still running then counts as a timeout.
        """
        if not self._config.enabled:
            return
        targets = list(self._router.table.targets)
        results = await self._probe_all(targets, self._config)
        for target, (ok, detail) in zip(targets, results, strict=True):
            self._count(target.state, ok)
            self._tracker(target).reset(ok)
            self._set_health(target.state, ok, f"initial check: {detail}")
        self._router.refresh()

    async def first_checks(self, targets: list[Target], config: HealthCheck) -> list[Result]:
        """Check ``targets`` of a table not yet serving once, concurrently, with the settings
        it comes with; bounded like :meth:`initial_round`. Nothing is changed: see :meth:`admit`.
        """
        return await self._probe_all(targets, config) if targets else []

    def admit(self, targets: list[Target], results: list[Result]) -> list[str]:
        """Set the health of a new table's ``targets`` from their :meth:`first_checks` (call it
        just before that table is installed). Like the start-up round, one failure is enough
        to keep a backend out, and then ``rise`` successes bring it in. Returns a line for
        each backend kept out."""
        kept_out = []
        for target, (ok, detail) in zip(targets, results, strict=True):
            self._count(target.state, ok)
            tracker = self._trackers.get(target.name)
            if tracker is not None:  # a changed url: what was counted for the old one is void
                tracker.reset(ok)
            self._set_health(target.state, ok, f"first check: {detail}")
            if not ok:
                kept_out.append(f"backend {target.name} down after its first check ({detail})")
        return kept_out

    def start(self) -> None:
        """Spawn one check loop per backend of the current table (none while disabled)."""
        self._running = True
        self._reconcile()

    async def stop(self) -> None:
        """Cancel and await every loop, then close the HTTP client."""
        self._running = False
        self._retire_all()
        await asyncio.gather(*list(self._retiring), return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def update(self, config: HealthCheck) -> None:
        """Apply new settings and match the loops to the router's current backends by name.

        Call it after every ``router.apply()``. Disabling checks stops every loop and marks every
        backend up, because nothing would ever bring a backend marked down back.
        """
        old, self._config = self._config, config
        if config.interval != old.interval:
            self._retire_all()  # a loop asleep on the old interval would keep it one more round
        if not config.enabled:
            self._mark_all_up()
        self._reconcile()  # disabled: no backend is wanted, so every loop and count goes

    def passive_down(self, name: str) -> None:
        """The data plane marked ``name`` down: only ``rise`` fresh active successes bring it back.

        The caller sets the state itself (``state.set_health(False, ...)``); this only restarts
        the count, so successes seen before the passive failure do not count toward ``rise``.
        """
        tracker = self._trackers.get(name)
        if tracker is not None:
            tracker.reset(False)

    def _reconcile(self) -> None:
        targets = self._router.table.targets if self._config.enabled else []
        wanted = {target.name for target in targets}
        for name in [name for name in self._tasks if name not in wanted]:
            self._retire(name)
        for name in [name for name in self._trackers if name not in wanted]:
            del self._trackers[name]
        for target in targets:
            self._tracker(target).configure(self._config.fall, self._config.rise)
            task = self._tasks.get(target.name)
            if self._running and (task is None or task.done()):
                loop = self._loop(target.name)
                self._tasks[target.name] = asyncio.create_task(loop, name=f"health {target.name}")

    def _retire_all(self) -> None:
        for name in list(self._tasks):
            self._retire(name)

    def _retire(self, name: str) -> None:
        task = self._tasks.pop(name)
        task.cancel()
        # Keep a reference until it has finished, so stop() can await it and nothing is GC'd.
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _loop(self, name: str) -> None:
        await self._sleep(self._jitter() * self._config.interval)
        while (target := self._router.table.by_name.get(name)) is not None:
            started = self._clock()
            ok, detail = await self.probe(target)
            current = self._router.table.by_name.get(name)
            # A reload that changed the url meanwhile made this result about the old one.
            if current is not None and _endpoint(current.backend) == _endpoint(target.backend):
                self._record(target, ok, detail)
            # Interval is start to start, so a slow backend is not checked less often.
            await self._sleep(max(0.0, self._config.interval - (self._clock() - started)))

    # -- results -------------------------------------------------------------------------

    def _tracker(self, target: Target) -> HealthHysteresis:
        tracker = self._trackers.get(target.name)
        if tracker is None:
            config = self._config
            tracker = HealthHysteresis(config.fall, config.rise, healthy=target.state.healthy)
            self._trackers[target.name] = tracker
        return tracker

    def _record(self, target: Target, ok: bool, detail: str) -> None:
        state = target.state
        self._count(state, ok)
        tracker = self._tracker(target)
        if tracker.healthy != state.healthy:
            # Health was changed elsewhere (passive failures, checks disabled): count afresh.
            tracker.reset(state.healthy)
        flipped = tracker.observe(ok)
        if flipped is None:
            return
        run = tracker.successes if flipped else tracker.failures
        if flipped:
            reason = f"{run} consecutive successes: {detail}"
        else:
            reason = f"{run} consecutive failures: {detail}"
        if self._set_health(state, flipped, reason):
            self._router.refresh()
            if self._on_transition is not None:
                self._on_transition(state.name, flipped, checks_cause(run, flipped, detail))

    @staticmethod
    def _count(state: BackendState, ok: bool) -> None:
        state.checks["success" if ok else "failure"] += 1

    @staticmethod
    def _set_health(state: BackendState, healthy: bool, reason: str) -> bool:
        if not state.set_health(healthy, reason):
            return False
        change, level = ("down -> up", logging.INFO) if healthy else ("up -> down", logging.WARNING)
        log.log(level, "backend %s: %s (%s)", state.name, change, reason)
        return True

    def _mark_all_up(self) -> None:
        targets = self._router.table.targets
        changed = [self._set_health(t.state, True, "health checks disabled") for t in targets]
        if any(changed):
            self._router.refresh()

    # -- probes --------------------------------------------------------------------------

    async def probe(self, target: Target, config: HealthCheck | None = None) -> Result:
        """Check ``target`` once with ``config`` (default: the current settings); never raises
        (but for cancellation)."""
        config = config or self._config
        timeout = config.timeout
        try:
            async with asyncio.timeout(timeout):
                if config.type == "tcp":
                    return await self._probe_tcp(target)
                return await self._probe_http(target, config)
        except TimeoutError:
            return False, f"timeout after {timeout:g}s"
        except Exception as exc:  # whatever stops a check is a failed check, never a dead loop
            return False, describe_error(exc)

    async def _probe_all(self, targets: list[Target], config: HealthCheck) -> list[Result]:
        tasks = [asyncio.create_task(self.probe(target, config)) for target in targets]
        try:
            if tasks:
                await asyncio.wait(tasks, timeout=config.timeout + INITIAL_MARGIN)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        late = (False, f"timeout after {config.timeout:g}s")
        return [late if task.cancelled() else task.result() for task in tasks]

    async def _probe_http(self, target: Target, config: HealthCheck) -> Result:
        backend = target.backend
        # ``preserve`` has no client Host to preserve here, so send the url's authority.
        host = target.host_header.decode("ascii") if target.host_header else backend.authority
        # encoded=True sends the configured path exactly as written.
        url = URL(backend.url.rstrip("/") + config.path, encoded=True)
        async with self._client().get(
            url,
            headers={"Host": host},
            allow_redirects=False,  # a redirect is an answer to judge, not a place to go
            ssl=target.endpoint.ssl_context or True,
            server_hostname=target.endpoint.server_hostname,
        ) as response:
            await _discard_body(response)
            status = response.status
        return config.accepts(status), f"HTTP {status}"

    @staticmethod
    async def _probe_tcp(target: Target) -> Result:
        _, writer = await asyncio.open_connection(target.backend.host, target.backend.port)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True, "connected"

    def _client(self) -> aiohttp.ClientSession:
        # Created on first use, inside the running loop. force_close: checks hold no connections
        # between rounds, and each round proves that a new connection can be made.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True),
                cookie_jar=aiohttp.DummyCookieJar(),
                headers={"User-Agent": USER_AGENT},
            )
        return self._session


def needs_first_check(old: Config, new: Config, table: RoutingTable) -> list[Target]:
    """The targets of ``new``'s ``table`` that no check has vouched for: backends added, and
    backends whose url or TLS verification changed; every one when ``new`` turns checks on.
    None while ``new`` has checks off (then a new backend serves at once)."""
    if not new.health_check.enabled:
        return []
    if not old.health_check.enabled:
        return list(table.targets)
    before = {backend.name: backend for backend in old.backends}
    return [t for t in table.targets if _endpoint(before.get(t.name)) != _endpoint(t.backend)]


def _endpoint(backend: Backend | None) -> tuple[str, bool] | None:
    """What a check's result is about: the url, and whether its certificate was verified."""
    return None if backend is None else (backend.url, backend.tls_verify)


async def _discard_body(response: aiohttp.ClientResponse) -> None:
    """Read and drop up to ``BODY_LIMIT`` bytes, so an endless body cannot hold the check."""
    remaining = BODY_LIMIT
    while remaining > 0:
        chunk = await response.content.read(remaining)
        if not chunk:
            return
        remaining -= len(chunk)


def describe_error(exc: BaseException) -> str:
    """A short reason for a failed check: ``connect refused``, ``TLS error: ...``, ..."""
    if isinstance(exc, aiohttp.ClientSSLError):
        return f"TLS error: {exc}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        exc = exc.os_error
    if isinstance(exc, ConnectionRefusedError) or getattr(exc, "errno", None) == errno.ECONNREFUSED:
        return "connect refused"
    if isinstance(exc, OSError) and not isinstance(exc, aiohttp.ClientError):
        return f"connect failed: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
