"""The health checker against real sockets: in-process aiohttp backends that can fail or hang.

Each fake backend's ``/health`` answers ``status`` (switchable at any moment), or hangs while
``hang`` is set, and records the path and Host header of every request. A port nobody listens on
gives "connection refused". Checks run every 100 ms with a 200 ms timeout; tests wait on
conditions with a deadline, never on fixed sleeps.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tdproxy.config import Config, parse_config
from tdproxy.controlplane.health import INITIAL_MARGIN, HealthChecker
from tdproxy.routing.router import Router
from tests.fakes.process import async_wait_until
from tests.fakes.routing import new_router
from tests.fakes.tls import make_self_signed, server_context

INTERVAL = "100ms"
TIMEOUT = 0.2


class HealthServer:
    """A small in-process HTTP backend for health checks."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.status = 200
        self.hang = False
        self.requests: list[tuple[str, str | None]] = []  # (path with query, Host header)
        self.in_flight = 0
        self._ssl_context = ssl_context
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> HealthServer:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # A short shutdown_timeout: a hanging handler must not hold the test's teardown.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self._ssl_context)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def url(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def hits(self) -> int:
        return len(self.requests)

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests.append((request.path_qs, request.headers.get("Host")))
        self.in_flight += 1
        try:
            if self.hang:
                await self._release.wait()
            if request.path != "/health":
                return web.Response(text="not the health page")
            if 300 <= self.status < 400:
                return web.Response(status=self.status, headers={"Location": "/landing"})
            body = None if self.status in (204, 304) else b"ok"
            return web.Response(status=self.status, body=body)
        finally:
            self.in_flight -= 1


ServerFactory = Callable[..., Awaitable[HealthServer]]


@pytest.fixture
async def server() -> AsyncIterator[ServerFactory]:
    """``await server(**attrs)`` starts a HealthServer; all are stopped after the test."""
    started: list[HealthServer] = []

    async def start(ssl_context: ssl.SSLContext | None = None, **attrs: Any) -> HealthServer:
        backend = await HealthServer(ssl_context).start()
        for key, value in attrs.items():
            setattr(backend, key, value)
        started.append(backend)
        return backend

    yield start
    for backend in started:
        await backend.stop()


@pytest.fixture
async def checkers() -> AsyncIterator[list[HealthChecker]]:
    """Checkers appended here are stopped after the test, even when it fails."""
    made: list[HealthChecker] = []
    yield made
    for checker in made:
        await checker.stop()


@pytest.fixture
def make_checker(checkers: list[HealthChecker]) -> Callable[..., HealthChecker]:
    def make(router: Router, **kwargs: Any) -> HealthChecker:
        checker = HealthChecker(router, router.table.config.health_check, **kwargs)
        checkers.append(checker)
        return checker

    return make


@pytest.fixture
def closed_port() -> int:
    """A port that was just free: connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_config(backends: dict[str, str | dict[str, Any]], **health: Any) -> Config:
    """``{name: url or backend dict}`` plus health_check overrides -> Config."""
    entries = [
        {"name": name, **({"url": spec} if isinstance(spec, str) else spec)}
        for name, spec in backends.items()
    ]
    settings = {"path": "/health", "interval": INTERVAL, "timeout": TIMEOUT, "fall": 3, "rise": 2}
    settings.update(health)
    return parse_config({"backends": entries, "health_check": settings})


def eligible(router: Router) -> list[str]:
    return [target.name for target in router.table.eligible()]


async def wait_for(predicate: Callable[[], object], message: str, timeout: float = 5.0) -> None:
    await async_wait_until(predicate, timeout=timeout, interval=0.005, message=message)


# -- start-up round ---------------------------------------------------------------------------


async def test_initial_round_sets_health_from_one_check(
    server: ServerFactory, closed_port: int, make_checker: Callable[..., HealthChecker]
) -> None:
    ok, failing, hanging = await server(), await server(status=500), await server(hang=True)
    config = make_config(
        {
            "ok": ok.url,
            "failing": failing.url,
            "hanging": hanging.url,
            "refused": f"http://127.0.0.1:{closed_port}",
        }
    )
    router = new_router(config)
    checker = make_checker(router)

    started = time.monotonic()
    await checker.initial_round()
    assert time.monotonic() - started < TIMEOUT + INITIAL_MARGIN

    states = router.states
    assert states["ok"].healthy
    assert states["ok"].health_reason == "initial"  # was up already: no change recorded
    assert states["failing"].health_reason == "initial check: HTTP 500"
    assert states["hanging"].health_reason == "initial check: timeout after 0.2s"
    assert states["refused"].health_reason == "initial check: connect refused"
    assert not any(states[name].healthy for name in ("failing", "hanging", "refused"))
    assert eligible(router) == ["ok"]
    assert {name: state.checks for name, state in states.items()} == {
        "ok": {"success": 1, "failure": 0},
        "failing": {"success": 0, "failure": 1},
        "hanging": {"success": 0, "failure": 1},
        "refused": {"success": 0, "failure": 1},
    }
    assert checker.checking == frozenset()  # the round starts no loops


async def test_initial_round_brings_up_a_backend_that_starts_down(
    server: ServerFactory, make_checker: Callable[..., HealthChecker]
) -> None:
    ok = await server()
    router = new_router(make_config({"ok": ok.url}), initial_health=lambda backend: False)
    await make_checker(router).initial_round()
    assert router.states["ok"].healthy
    assert router.states["ok"].health_reason == "initial check: HTTP 200"


# -- the loops: fall and rise -----------------------------------------------------------------


async def test_goes_down_after_fall_failures_and_up_after_rise_successes(
    server: ServerFactory,
    make_checker: Callable[..., HealthChecker],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tdproxy.health")
    a, b = await server(), await server()
    router = new_router(make_config({"a": a.url, "b": b.url}, fall=3, rise=2))
    checker = make_checker(router)
    await checker.initial_round()
    checker.start()
    state = router.states["a"]
    await wait_for(lambda: state.checks["success"] >= 3, "a few healthy checks")

    a.status = 500
    await wait_for(lambda: not state.healthy, "a marked down")
    assert state.checks["failure"] == 3
    assert state.health_reason == "3 consecutive failures: HTTP 500"
    assert eligible(router) == ["b"]
    down = [r for r in caplog.records if "up -> down" in r.getMessage()]
    assert [(r.levelno, r.getMessage()) for r in down] == [
        (logging.WARNING, "backend a: up -> down (3 consecutive failures: HTTP 500)")
    ]

    successes = state.checks["success"]
    a.status = 200
    await wait_for(lambda: state.healthy, "a back up")
    assert state.checks["success"] - successes == 2
    assert state.health_reason == "2 consecutive successes: HTTP 200"
    assert sorted(eligible(router)) == ["a", "b"]
    up = [r for r in caplog.records if "down -> up" in r.getMessage()]
    assert [(r.levelno, r.getMessage()) for r in up] == [
        (logging.INFO, "backend a: down -> up (2 consecutive successes: HTTP 200)")
    ]
    assert router.states["b"].healthy
    assert router.states["b"].checks["failure"] == 0


async def test_a_hanging_backend_goes_down_on_timeouts(
    server: ServerFactory, make_checker: Callable[..., HealthChecker]
) -> None:
    a, b = await server(), await server()
    router = new_router(make_config({"a": a.url, "b": b.url}, fall=2))
    checker = make_checker(router)
    checker.start()
    a.hang = True
    await wait_for(lambda: not router.states["a"].healthy, "a marked down")
    assert router.states["a"].health_reason == "2 consecutive failures: timeout after 0.2s"
    assert eligible(router) == ["b"]


@pytest.mark.parametrize("tell_checker", [True, False], ids=["passive_down", "state_only"])
async def test_after_a_passive_down_only_rise_fresh_successes_bring_it_back(
    server: ServerFactory, make_checker: Callable[..., HealthChecker], tell_checker: bool
) -> None:
    a, b = await server(), await server()
    router = new_router(make_config({"a": a.url, "b": b.url}, rise=3))
    checker = make_checker(router)
    checker.start()
    state = router.states["a"]
    await wait_for(lambda: state.checks["success"] >= 4, "a long healthy run")

    # What the data plane does on consecutive connect failures on live traffic.
    state.set_health(False, "3 consecutive connect failures on live traffic")
    router.refresh()
    if tell_checker:
        checker.passive_down("a")
    successes = state.checks["success"]
    assert eligible(router) == ["b"]

    await wait_for(lambda: state.healthy, "a back up")
    assert state.checks["success"] - successes == 3
    assert state.health_reason == "3 consecutive successes: HTTP 200"


async def test_first_check_is_jittered_within_the_interval(
    server: ServerFactory, make_checker: Callable[..., HealthChecker]
) -> None:
    a = await server()
    router = new_router(make_config({"a": a.url}, interval="10s"))
    delays: list[float] = []

    async def sleep(seconds: float) -> None:
        delays.append(seconds)
        await asyncio.sleep(0 if len(delays) == 1 else 3600)  # first wait skipped, then park

    checker = make_checker(router, sleep=sleep, jitter=lambda: 0.25)
    checker.start()
    await wait_for(lambda: len(delays) == 2, "one check done")
    assert delays[0] == 2.5
    assert 9.0 < delays[1] <= 10.0  # start to start: the check's own time is subtracted
    assert router.states["a"].checks == {"success": 1, "failure": 0}


# -- what one probe sends and how it judges ---------------------------------------------------


async def test_expect_status_ranges_and_redirects_are_not_followed(
    server: ServerFactory, make_checker: Callable[..., HealthChecker]
) -> None:
    a = await server()
    router = new_router(make_config({"a": a.url}, expect_status=["200-299", 418]))
    checker = make_checker(router)
    target = router.table.by_name["a"]
    verdicts = {}
    for status in (200, 204, 299, 418, 302, 301, 404, 500, 503):
        a.status = status
        verdicts[status] = await checker.probe(target)
    assert verdicts == {
        200: (True, "HTTP 200"),
        204: (True, "HTTP 204"),
        299: (True, "HTTP 299"),
        418: (True, "HTTP 418"),
        302: (False, "HTTP 302"),
        301: (False, "HTTP 301"),
        404: (False, "HTTP 404"),
        500: (False, "HTTP 500"),
        503: (False, "HTTP 503"),
    }
    assert {path for path, _ in a.requests} == {"/health"}  # never went to /landing


async def test_host_header_follows_the_backend_rule(
    server: ServerFactory, make_checker: Callable[..., HealthChecker]
) -> None:
    a = await server()
    config = make_config(
        {
            "preserve": {"url": a.url + "/", "host_header": "preserve"},
            "backend": {"url": a.url, "host_header": "backend"},
            "explicit": {"url": a.url, "host_header": "app.example.com"},
        },
        path="/health?from=tdproxy",
    )
    router = new_router(config)
    checker = make_checker(router)
    for target in router.table.targets:
        assert await checker.probe(target) == (True, "HTTP 200")
    authority = f"127.0.0.1:{a.port}"
    assert a.requests == [
        ("/health?from=tdproxy", authority),
        ("/health?from=tdproxy", authority),
        ("/health?from=tdproxy", "app.example.com"),
    ]


async def test_tcp_checks_only_connect(
    server: ServerFactory, closed_port: int, make_checker: Callable[..., HealthChecker]
) -> None:
    a = await server(status=500)
    config = make_config({"a": a.url, "refused": f"http://127.0.0.1:{closed_port}"}, type="tcp")
    router = new_router(config)
    checker = make_checker(router)
    assert await checker.probe(router.table.by_name["a"]) == (True, "connected")
    assert await checker.probe(router.table.by_name["refused"]) == (False, "connect refused")
    assert a.hits == 0  # a TCP check sends no request

    await checker.initial_round()
    assert router.states["a"].healthy
    assert not router.states["refused"].healthy
    assert router.states["refused"].health_reason == "initial check: connect refused"


async def test_tls_verification_follows_the_backend(
    server: ServerFactory, make_checker: Callable[..., HealthChecker], tmp_path: Path
) -> None:
    a = await server(ssl_context=self_signed_server_context(tmp_path))
    config = make_config(
        {"lax": {"url": a.url, "tls_verify": False}, "strict": {"url": a.url, "tls_verify": True}}
    )
    router = new_router(config)
    checker = make_checker(router)
    assert await checker.probe(router.table.by_name["lax"]) == (True, "HTTP 200")
    healthy, detail = await checker.probe(router.table.by_name["strict"])
    assert not healthy
    assert detail.startswith("TLS error"), detail


# -- reconfiguration and shutdown -------------------------------------------------------------


async def test_update_adds_and_removes_backends(
    server: ServerFactory, make_checker: Callable[..., HealthChecker]
) -> None:
    a, b = await server(), await server()
    router = new_router(make_config({"a": a.url}))
    checker = make_checker(router)
    checker.start()
    await wait_for(lambda: router.states["a"].checks["success"] >= 1, "a checked")
    tracker = checker.hysteresis("a")

    config = router.apply(make_config({"a": a.url, "b": b.url})).config
    checker.update(config.health_check)
    assert checker.checking == {"a", "b"}
    await wait_for(lambda: router.states["b"].checks["success"] >= 1, "b checked")
    assert checker.hysteresis("a") is tracker  # same name: same counts

    config = router.apply(make_config({"b": b.url})).config
    checker.update(config.health_check)
    assert checker.checking == {"b"}
    assert checker.hysteresis("a") is None
    b_checks = router.states["b"].checks
    start = b_checks["success"]
    await wait_for(lambda: b_checks["success"] >= start + 2, "b checked twice more")
    a_hits = a.hits  # anything a cancelled check had in flight has arrived by now
    await wait_for(lambda: b_checks["success"] >= start + 4, "b checked twice again")
    assert a.hits == a_hits


async def test_first_checks_then_admit_keep_a_failing_new_backend_out(
    server: ServerFactory, make_checker: Callable[..., HealthChecker]
) -> None:
    a, b, c = await server(), await server(status=503), await server()
    router = new_router(make_config({"a": a.url}, rise=2))
    checker = make_checker(router)
    await checker.initial_round()
    checker.start()
    config = make_config({"a": a.url, "b": b.url, "c": c.url}, rise=2)
    table, commit = router.prepare(config)
    new = [table.by_name["b"], table.by_name["c"]]
    results = await checker.first_checks(new, config.health_check)
    assert results == [(False, "HTTP 503"), (True, "HTTP 200")]
    assert checker.admit(new, results) == ["backend b down after its first check (HTTP 503)"]
    table.refresh()  # as a reload does: health set, then the selector, then the swap
    router.install(table, commit)
    checker.update(config.health_check)
    assert eligible(router) == ["a", "c"]
    assert router.states["b"].health_reason == "first check: HTTP 503"
    assert router.states["b"].checks == {"success": 0, "failure": 1}
    b.status = 200  # rise (2) successes in a row bring it in, as for any backend marked down
    await wait_for(lambda: router.states["b"].healthy, "b up")
    assert router.states["b"].checks["success"] == 2
    assert sorted(eligible(router)) == ["a", "b", "c"]


async def test_first_checks_are_bounded_by_the_timeout(
    server: ServerFactory, make_checker: Callable[..., HealthChecker]
) -> None:
    a, hanging = await server(), await server(hang=True)
    router = new_router(make_config({"a": a.url}))
    checker = make_checker(router)
    config = make_config({"a": a.url, "new": hanging.url})
    table, _ = router.prepare(config)
    started = time.monotonic()
    results = await checker.first_checks([table.by_name["new"]], config.health_check)
    assert time.monotonic() - started < TIMEOUT + INITIAL_MARGIN + 0.5
    assert results == [(False, f"timeout after {TIMEOUT:g}s")]


async def test_update_keeps_counts_when_thresholds_change(
    server: ServerFactory, make_checker: Callable[..., HealthChecker]
) -> None:
    a = await server()
    router = new_router(make_config({"a": a.url}, fall=5, rise=5))
    checker = make_checker(router)
    await checker.initial_round()
    tracker = checker.hysteresis("a")
    assert tracker is not None
    tracker.observe(False)
    tracker.observe(False)

    checker.update(make_config({"a": a.url}, fall=3, rise=2).health_check)
    assert checker.hysteresis("a") is tracker
    assert (tracker.fall, tracker.rise, tracker.failures) == (3, 2, 2)
    assert tracker.observe(False) is False


async def test_disabling_stops_the_loops_and_marks_everything_up(
    server: ServerFactory, make_checker: Callable[..., HealthChecker]
) -> None:
    a, b = await server(status=500), await server()
    router = new_router(make_config({"a": a.url, "b": b.url}))
    checker = make_checker(router)
    await checker.initial_round()
    checker.start()
    assert eligible(router) == ["b"]
    await wait_for(lambda: router.states["b"].checks["success"] >= 2, "loops running")

    checker.update(make_config({"a": a.url, "b": b.url}, enabled=False).health_check)
    assert checker.checking == frozenset()
    assert router.states["a"].healthy
    assert router.states["a"].health_reason == "health checks disabled"
    assert sorted(eligible(router)) == ["a", "b"]

    hits = a.hits + b.hits
    await checker.initial_round()  # disabled: does nothing
    checker.start()  # disabled: starts nothing
    assert checker.checking == frozenset()
    assert a.hits + b.hits == hits

    checker.update(make_config({"a": a.url, "b": b.url}, fall=1).health_check)
    assert checker.checking == {"a", "b"}
    await wait_for(lambda: not router.states["a"].healthy, "a down again once re-enabled")


async def test_stop_is_clean_while_a_check_hangs(
    server: ServerFactory, make_checker: Callable[..., HealthChecker]
) -> None:
    a = await server(hang=True)
    router = new_router(make_config({"a": a.url}, timeout="5s"))
    checker = make_checker(router, jitter=lambda: 0.0)
    checker.start()
    await wait_for(lambda: a.in_flight == 1, "a check waiting on the backend")

    started = time.monotonic()
    await checker.stop()
    assert time.monotonic() - started < 1.0
    assert checker.checking == frozenset()
    await checker.stop()  # twice is fine
    gc.collect()  # an unclosed session or transport would warn here, and -W error fails the test


async def test_stop_without_start() -> None:
    router = new_router(make_config({"a": "http://127.0.0.1:9"}))
    await HealthChecker(router, router.table.config.health_check).stop()


# -- helpers ----------------------------------------------------------------------------------


def self_signed_server_context(directory: Path) -> ssl.SSLContext:
    """A server context with a fresh self-signed certificate for 127.0.0.1."""
    return server_context(make_self_signed(directory, ("127.0.0.1",)))
