"""The admin server: metrics, health, status and the reload API, on aiohttp (never the hot path).

It reads the running distributor only through :class:`AdminSource`, so it can be served over a
real app or over a small fake in tests. Endpoints (fixed by DESIGN.md):

- ``GET /metrics``: Prometheus exposition (OpenMetrics when the scraper asks for it).
- ``GET /healthz``: 200 while the process runs.
- ``GET /readyz``: 200 when the current table has an eligible healthy backend, else 503.
- ``GET /api/v1/status``: the JSON document :class:`StatusDoc` describes.
- ``GET /status``: the same as a page that refreshes itself (:mod:`.status_page`), with the
  observed split of the last 15 minutes as a chart and the latest change-log entries.
- ``GET /api/v1/changes``: ``{"changes": [...]}``, the change log newest first (:mod:`.changes`).
- ``POST /api/v1/reload``: reload the config file now; 200 when applied, 422 when refused.

Mutating requests (anything but GET/HEAD) are guarded: a request whose ``Origin`` is present and
is not this server's own is refused with 403, so a web page elsewhere cannot make a browser
trigger them; and when ``admin.token`` (or ``admin.token_env``) is configured they need
``Authorization: Bearer <token>`` (401 otherwise). If ``token_env`` names a variable that is
unset or empty, they are refused outright rather than left open.

Rates that :class:`BackendState` keeps no window for (error rate, p95 latency) come from
:class:`RecentWindow`, counter snapshots taken every few seconds by a task this server owns;
the same task samples the observed shares into the chart's :class:`SplitHistory`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from typing import NamedTuple, Protocol, TypedDict

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

import tdproxy
from tdproxy.config.model import Admin, Config
from tdproxy.controlplane.changes import ChangeLog
from tdproxy.controlplane.reload_state import ReloadHistory, ReloadOutcome
from tdproxy.controlplane.split_history import SplitHistory
from tdproxy.controlplane.status_page import CONTENT_SECURITY_POLICY, render_status_page
from tdproxy.observability.metrics import (
    build_registry,
    estimate_quantile,
    exposition,
    observed_shares,
)
from tdproxy.routing.router import Router
from tdproxy.routing.state import SHARE_WINDOW_SECONDS, BackendState
from tdproxy.routing.table import RoutingTable, Target
from tdproxy.workers.report import WorkersReport, WorkersStatus

log = logging.getLogger("tdproxy.admin")

WINDOW_SECONDS = SHARE_WINDOW_SECONDS
SAMPLE_INTERVAL = 5.0
HEAD_TIMEOUT = 10.0  # seconds a connection may take to complete a request head (or stay idle)
MAX_CONNECTIONS = 256  # admin connections open at once; more are closed at once
SAFE_METHODS = frozenset({"GET", "HEAD"})


class AdminSource(Protocol):
    """What the admin server needs from the running distributor."""

    router: Router
    config: Config  # the config now serving (replaced by each successful reload)
    config_path: str | None
    reload_history: ReloadHistory
    changes: ChangeLog

    @property
    def draining(self) -> bool: ...  # SIGTERM received: finishing in-flight work, nothing new

    def connections_active(self) -> int: ...

    def unrouted_requests(self) -> dict[int, int]: ...

    def workers_report(self) -> WorkersReport: ...

    async def reload(self, trigger: str) -> ReloadOutcome: ...


# -- the status document ---------------------------------------------------------------------


class ReloadStatus(TypedDict):
    time: float  # epoch seconds
    ok: bool
    trigger: str  # start | file | signal | api
    generation: int  # the generation serving after the attempt
    summary: str
    changes: list[str]
    errors: list[str]  # file, key path, reason; one line each
    pending_restart: list[str]  # changes that apply only at the next start


class BackendStatus(TypedDict):
    name: str
    url: str
    weight: int
    effective_weight: float  # the weight after slow start (= weight when not ramping)
    backup: bool
    configured_share: float  # 0..1 of the traffic the config asks for (0 for a backup)
    observed_share: float  # 0..1 of the requests answered over the last 60 s
    eligible: bool  # in the current selector (gets new traffic now)
    healthy: bool
    health_changed_at: float  # epoch seconds
    health_reason: str
    in_flight: int
    requests: int  # answered requests since start (any status)
    responses_5xx: int  # of those, answered with a 5xx (the backend's own or tdproxy's 502/504)
    retries: int  # requests that failed here and were retried on another backend
    errors: int  # requests that failed here, each once: responses_5xx + retries
    upstream_errors: dict[str, int]  # transport failures by kind (connect, timeout, reset, ...)
    request_rate: float  # requests answered per second over the last 60 s
    error_rate: float  # 0..1: errors / (requests + retries) over the last 60 s
    p95_latency_seconds: float | None  # over the last 60 s; None without requests


class StatusDoc(TypedDict):
    version: str
    time: float  # the server's clock, epoch seconds
    started_at: float
    uptime_seconds: float
    method: str
    when_all_down: str
    config_path: str | None
    generation: int
    ready: bool
    connections_active: int
    # requests answered without reaching a backend, by status (as tdproxy_unrouted_requests_total)
    unrouted_requests: dict[str, int]
    window_seconds: int
    reloads: dict[str, int]  # success / failure counts (as tdproxy_config_reloads_total)
    last_reload: ReloadStatus | None
    backends: list[BackendStatus]
    # the data-plane processes: configured, live, restarts, and one entry per process
    workers: WorkersStatus


class Counts(NamedTuple):
    """One backend's cumulative counters at one moment."""

    answered: int  # requests answered, any status
    fives: int  # of those, answered with a 5xx
    retried: int  # failed here, then retried on another backend
    durations: tuple[int, ...]  # per-bucket duration counts

    @classmethod
    def of(cls, state: BackendState) -> Counts:
        fives = sum(count for code, count in state.requests.items() if code >= 500)
        return cls(state.total_requests(), fives, state.retries, tuple(state.duration_counts))

    @property
    def failed(self) -> int:
        return self.fives + self.retried

    @property
    def error_rate(self) -> float:
        attempts = self.answered + self.retried
        return self.failed / attempts if attempts else 0.0

    def minus(self, earlier: Counts) -> Counts:
        durations = tuple(a - b for a, b in zip(self.durations, earlier.durations, strict=True))
        return Counts(
            self.answered - earlier.answered,
            self.fives - earlier.fives,
            self.retried - earlier.retried,
            durations,
        )


_Snapshot = dict[str, tuple[BackendState, Counts]]


class RecentWindow:
    """Snapshots of every backend's counters over the last minute, for windowed rates."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._samples: deque[tuple[float, _Snapshot]] = deque()

    def sample(self, router: Router) -> None:
        now = self._clock()
        self._samples.append((now, self._snapshot(router)))
        while len(self._samples) > 1 and self._samples[0][0] < now - WINDOW_SECONDS:
            self._samples.popleft()

    def recent(self, router: Router) -> dict[str, Counts]:
        """Each backend's counts since the oldest snapshot in the window (at first: since the
        server started; for a backend added since: since it was added)."""
        baseline = self._samples[0][1] if self._samples else {}
        recent = {}
        for name, (state, counts) in self._snapshot(router).items():
            then = baseline.get(name)
            # A backend removed and added again has a new state: its counters started over.
            recent[name] = counts.minus(then[1]) if then and then[0] is state else counts
        return recent

    @staticmethod
    def _snapshot(router: Router) -> _Snapshot:
        return {name: (state, Counts.of(state)) for name, state in router.states.items()}


def is_ready(table: RoutingTable) -> bool:
    """At least one backend can serve: the selector holds a healthy target."""
    return any(target.state.healthy for target in table.eligible())


def configured_shares(table: RoutingTable) -> dict[str, float]:
    """What the config asks for: weight over the non-backup weights; backups get 0. In failover
    the first non-backup backend is configured to take everything."""
    main = [t for t in table.targets if not t.backup]
    if table.method == "failover":
        return {t.name: (1.0 if main and t is main[0] else 0.0) for t in table.targets}
    total = sum(t.weight for t in main)
    return {t.name: (t.weight / total if total and not t.backup else 0.0) for t in table.targets}


def build_status(source: AdminSource, window: RecentWindow, now: float | None = None) -> StatusDoc:
    now = time.time() if now is None else now
    table = source.router.table
    history = source.reload_history
    configured = configured_shares(table)
    observed = observed_shares(table.targets, int(now))
    recent = window.recent(source.router)
    eligible = {target.name for target in table.eligible()}
    backends = [
        _backend_status(table, target, configured, observed, recent.get(target.name), eligible, now)
        for target in table.targets
    ]
    last = history.last
    return {
        "version": tdproxy.__version__,
        "time": now,
        "started_at": history.started_at,
        "uptime_seconds": max(0.0, now - history.started_at),
        "method": table.method,
        "when_all_down": table.config.routing.when_all_down,
        "config_path": source.config_path,
        "generation": source.router.generation,
        "ready": is_ready(table),
        "connections_active": source.connections_active(),
        "unrouted_requests": {
            str(code): count for code, count in sorted(source.unrouted_requests().items())
        },
        "window_seconds": WINDOW_SECONDS,
        "reloads": dict(history.reloads),
        "last_reload": outcome_json(last) if last is not None else None,
        "backends": backends,
        "workers": source.workers_report().to_json(),
    }


def _backend_status(
    table: RoutingTable,
    target: Target,
    configured: dict[str, float],
    observed: dict[str, float],
    recent: Counts | None,
    eligible: set[str],
    now: float,
) -> BackendStatus:
    state = target.state
    total = Counts.of(state)
    recent = recent or Counts(0, 0, 0, (0,) * len(total.durations))
    return {
        "name": target.name,
        "url": target.backend.url,
        "weight": target.weight,
        "effective_weight": table.effective_weight(target),
        "backup": target.backup,
        "configured_share": configured[target.name],
        "observed_share": observed[target.name],
        "eligible": target.name in eligible,
        "healthy": state.healthy,
        "health_changed_at": state.health_changed_at,
        "health_reason": state.health_reason,
        "in_flight": state.in_flight,
        "requests": total.answered,
        "responses_5xx": total.fives,
        "retries": total.retried,
        "errors": total.failed,
        "upstream_errors": dict(sorted(state.errors.items())),
        "request_rate": state.recent_requests(int(now)) / WINDOW_SECONDS,
        "error_rate": recent.error_rate,
        "p95_latency_seconds": estimate_quantile(0.95, recent.durations),
    }


def outcome_json(outcome: ReloadOutcome) -> ReloadStatus:
    return {
        "time": outcome.time,
        "ok": outcome.ok,
        "trigger": outcome.trigger,
        "generation": outcome.generation,
        "summary": outcome.summary(),
        "changes": list(outcome.changes),
        "errors": list(outcome.errors),
        "pending_restart": list(outcome.pending_restart),
    }


# -- guarding mutating requests ---------------------------------------------------------------


def admin_token(admin: Admin) -> tuple[bool, str | None]:
    """(required, token). Required with no token: ``token_env`` names an unset variable, so
    mutating requests are refused rather than left open by a forgotten export."""
    if admin.token is not None:
        return True, admin.token
    if admin.token_env is not None:
        return True, os.environ.get(admin.token_env) or None
    return False, None


def own_origin(request: web.Request) -> str:
    """The origin a browser shows for pages this server sent: scheme and the Host it asked for."""
    return f"{request.scheme}://{request.host}".lower()


def _refusal(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"ok": False, "errors": [message]}, status=status, headers=headers)


def _guard(source: AdminSource) -> Middleware:
    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method in SAFE_METHODS:
            return await handler(request)
        origin = request.headers.get("Origin")
        if origin is not None and origin.lower() != own_origin(request):
            return _refusal(403, f"cross-origin request refused (Origin: {origin})")
        required, token = admin_token(source.config.admin)
        if required:
            if token is None:
                variable = source.config.admin.token_env
                return _refusal(401, f"admin.token_env names {variable}, which is not set")
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(), token.encode()
            ):
                return _refusal(
                    401,
                    "missing or wrong bearer token",
                    {"WWW-Authenticate": 'Bearer realm="tdproxy-admin"'},
                )
        return await handler(request)

    return guard


# -- handlers -------------------------------------------------------------------------------


class _Handlers:
    def __init__(self, source: AdminSource, window: RecentWindow, history: SplitHistory) -> None:
        self.source = source
        self.window = window
        self.history = history
        self.registry = build_registry(source)

    async def metrics(self, request: web.Request) -> web.Response:
        body, content_type = exposition(self.registry, request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, request: web.Request) -> web.Response:
        if self.source.draining:
            return web.Response(status=503, text="not ready: shutting down\n")
        if self.source.workers_report().live == 0:
            return web.Response(status=503, text="not ready: no worker process is serving\n")
        table = self.source.router.table
        if is_ready(table):
            names = ", ".join(t.name for t in table.eligible() if t.state.healthy)
            return web.Response(text=f"ready: {names}\n")
        return web.Response(status=503, text="not ready: no healthy backend can serve\n")

    async def status_json(self, request: web.Request) -> web.Response:
        status = build_status(self.source, self.window)
        return web.json_response(status, headers={"Cache-Control": "no-store"})

    async def status_page(self, request: web.Request) -> web.Response:
        status = build_status(self.source, self.window)
        # The chart ends with the shares this very document shows.
        current = {b["name"]: b["observed_share"] for b in status["backends"]}
        points = self.history.points(status["time"], current)
        return web.Response(
            text=render_status_page(status, self.source.changes.latest(), points),
            content_type="text/html",
            headers={
                "Cache-Control": "no-store",
                "Content-Security-Policy": CONTENT_SECURITY_POLICY,
                "X-Content-Type-Options": "nosniff",
            },
        )

    async def changes(self, request: web.Request) -> web.Response:
        changes = [change.to_json() for change in self.source.changes.latest()]
        return web.json_response({"changes": changes}, headers={"Cache-Control": "no-store"})

    async def index(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/status")

    async def reload(self, request: web.Request) -> web.Response:
        outcome = await self.source.reload("api")
        return web.json_response(outcome_json(outcome), status=200 if outcome.ok else 422)


def make_app(
    source: AdminSource, window: RecentWindow | None = None, history: SplitHistory | None = None
) -> web.Application:
    handlers = _Handlers(source, window or RecentWindow(), history or SplitHistory())
    app = web.Application(middlewares=[_guard(source)])
    app.router.add_get("/", handlers.index)
    app.router.add_get("/metrics", handlers.metrics)
    app.router.add_get("/healthz", handlers.healthz)
    app.router.add_get("/readyz", handlers.readyz)
    app.router.add_get("/api/v1/status", handlers.status_json)
    app.router.add_get("/status", handlers.status_page)
    app.router.add_get("/api/v1/changes", handlers.changes)
    app.router.add_post("/api/v1/reload", handlers.reload)
    return app


# -- the server -----------------------------------------------------------------------------


class AdminServer:
    """Serves :func:`make_app` on the admin address and owns the sampling task
    (windowed rates, the split history).

    The listener is tdproxy's own rather than aiohttp's ``TCPSite``, to bound what a client can
    hold: at most ``MAX_CONNECTIONS`` connections (more are closed as soon as they are
    accepted), and a connection that has not completed a request head within ``HEAD_TIMEOUT``
    of opening (or of its previous response) is closed, which also ends idle keep-alive.
    """

    def __init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self._sampler: asyncio.Task[None] | None = None
        self._refusals = 0
        self.address = ""
        self.port = 0  # the bound port (useful when started with port 0)

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}"

    async def start(self, source: AdminSource, address: str, port: int) -> None:
        if self._runner is not None:
            raise RuntimeError("the admin server is already running")
        window = RecentWindow()
        window.sample(source.router)
        history = SplitHistory(interval=SAMPLE_INTERVAL)
        _sample_split(source.router, history)
        # aiohttp's keep-alive timer runs from the connection's start (and from each response
        # on) until a complete request head arrives, so it is a deadline for heads as well.
        runner = web.AppRunner(
            make_app(source, window, history), access_log=None, keepalive_timeout=HEAD_TIMEOUT
        )
        await runner.setup()
        server = runner.server
        assert server is not None
        try:
            self._listener = await asyncio.get_running_loop().create_server(
                lambda: self._accept(server), address, port, reuse_address=True
            )
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.address = address
        self.port = self._listener.sockets[0].getsockname()[1]
        self._sampler = asyncio.create_task(
            self._sample(source, window, history), name="admin-sampler"
        )
        required, token = admin_token(source.config.admin)
        if required and token is None:
            log.warning(
                "admin.token_env names %s, which is not set: POST endpoints are refused",
                source.config.admin.token_env,
            )
        elif not required and not is_loopback(address):
            log.warning(
                "admin server on %s without a token: anyone who can reach it can reload the "
                "config; set admin.token or admin.token_env, or listen on 127.0.0.1",
                self.url,
            )
        log.info("admin server on %s (status page %s/status)", self.url, self.url)

    def _accept(self, server: web.Server) -> asyncio.BaseProtocol:
        if len(server.connections) < MAX_CONNECTIONS:
            return server()
        self._refusals += 1
        if self._refusals == 1:
            log.warning(
                "admin server: %d connections open, closing new ones until some end",
                MAX_CONNECTIONS,
            )
        return _Refused()

    @staticmethod
    async def _sample(source: AdminSource, window: RecentWindow, history: SplitHistory) -> None:
        while True:
            await asyncio.sleep(SAMPLE_INTERVAL)
            window.sample(source.router)
            _sample_split(source.router, history)

    async def stop(self) -> None:
        sampler, self._sampler = self._sampler, None
        if sampler is not None:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        if listener is not None:
            await listener.wait_closed()


def _sample_split(router: Router, history: SplitHistory) -> None:
    now = time.time()
    history.sample(now, observed_shares(router.table.targets, int(now)))


class _Refused(asyncio.Protocol):
    """A connection over the cap: closed at once, nothing read."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


def is_loopback(address: str) -> bool:
    """Whether ``address`` (as ``admin.address`` writes it) is reachable from this host only."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything
