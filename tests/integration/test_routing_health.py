"""Active and passive health checks, seen from the outside: who gets traffic, and what is logged.

issue 3: an HTTP check (GET ``path``, healthy when the status is expected) or a TCP check
(connect); ``fall`` failures in a row take a backend out, ``rise`` successes bring it back; one
round of checks runs before the entrypoint accepts traffic, so a dead environment never gets the
first request and a live one serves at once; connection failures on real traffic count too
(``passive.max_failures`` in a row mark a backend down at once), but only active checks bring it
back; every state change is logged with the backend, ``old -> new`` and the reason.

Backends are fake backend processes whose ``/health`` can be switched to 500 or to hanging, or
that are killed outright. Which backend answered comes from the ``X-Backend`` header.
"""

from __future__ import annotations

import functools
import re
import time
from collections import Counter
from typing import Any

import pytest

from tests.fakes import client
from tests.fakes.client import RawClient
from tests.fakes.process import (
    BackendFactory,
    BackendProcess,
    ProxyFactory,
    ProxyProcess,
    free_port,
    proxy_config,
    wait_until,
)

FALL = 2
RISE = 2
HEALTH = {
    "enabled": True,
    "path": "/health",
    "interval": "300ms",
    "timeout": "200ms",
    "fall": FALL,
    "rise": RISE,
}
ONLY_AT_START = {**HEALTH, "interval": "60s", "timeout": "500ms"}  # the start-up round only


def config_for(
    backends: list[tuple[str, str]], health: dict[str, Any], **overrides: Any
) -> dict[str, Any]:
    """round_robin over ``(name, url)`` pairs at weight 1, with ``health`` as health_check."""
    specs = [(name, url, 1) for name, url in backends]
    return proxy_config(specs, health_check=health, **overrides)


def pairs(*backends: BackendProcess) -> list[tuple[str, str]]:
    return [(backend.name, backend.url) for backend in backends]


def backends_served(proxy: ProxyProcess, count: int = 20) -> Counter[str]:
    """Who answered ``count`` sequential GETs from fresh connections (all must be 200)."""
    seen: Counter[str] = Counter()
    for _ in range(count):
        response = client.request(proxy.url + "/")
        assert response.status == 200, (response.status, response.text)
        seen[response.header("X-Backend") or "?"] += 1
    return seen


def log_line(proxy: ProxyProcess, text: str, timeout: float = 15.0) -> str:
    return proxy.wait_for_output(text, timeout=timeout, stream="stderr")


def root_requests(backend: BackendProcess) -> int:
    """Requests for ``/`` (real traffic, not health checks) the backend has seen."""
    return int(backend.stats()["requests_by_path"].get("/", 0))


# ---------------------------------------------------------------------------------------------
# Active HTTP checks


@pytest.mark.parametrize("failure", ["status-500", "hang"])
def test_failing_health_path_takes_a_backend_out_and_rise_brings_it_back(
    backend_factory: BackendFactory, proxy_factory: ProxyFactory, failure: str
) -> None:
    blue, green = backend_factory("blue"), backend_factory("green")
    proxy = proxy_factory(config_for(pairs(blue, green), HEALTH))
    assert backends_served(proxy) == {"blue": 10, "green": 10}

    green.reset_stats()
    if failure == "hang":
        green.set_health(hang=True)
        reason = "timeout"
    else:
        green.set_health(500)
        reason = "HTTP 500"
    down = log_line(proxy, "backend green: up -> down")
    # The log names the backend, the change and why: the run of failures and the last result.
    assert re.search(rf"backend green: up -> down \({FALL} consecutive failures: {reason}", down)
    assert green.stats()["requests_by_path"].get("/health", 0) >= FALL
    assert backends_served(proxy) == {"blue": 20}
    assert root_requests(green) == 0

    green.set_health(200, hang=False)
    up = log_line(proxy, "backend green: down -> up")
    assert re.search(rf"backend green: down -> up \({RISE} consecutive successes: HTTP 200\)", up)
    assert backends_served(proxy) == {"blue": 10, "green": 10}


def test_expect_status_decides_what_healthy_means(
    backend_factory: BackendFactory, proxy_factory: ProxyFactory
) -> None:
    blue, green = backend_factory("blue"), backend_factory("green")
    health = {**HEALTH, "expect_status": ["200-299", 503]}
    proxy = proxy_factory(config_for(pairs(blue, green), health))
    green.set_health(503)  # expected: stays up
    blue.set_health(500)  # not expected: goes down
    log_line(proxy, "backend blue: up -> down")
    assert backends_served(proxy) == {"green": 20}
    assert "backend green: up -> down" not in proxy.stderr_text()


# ---------------------------------------------------------------------------------------------
# TCP checks


def test_tcp_check_follows_the_port_not_the_health_page(
    backend_factory: BackendFactory, proxy_factory: ProxyFactory
) -> None:
    blue, green = backend_factory("blue"), backend_factory("green")
    blue.set_health(500)  # an HTTP check would take blue out; a TCP check must not
    proxy = proxy_factory(config_for(pairs(blue, green), {**HEALTH, "type": "tcp"}))
    assert backends_served(proxy) == {"blue": 10, "green": 10}

    green.kill()
    down = log_line(proxy, "backend green: up -> down")
    assert "connect refused" in down, down
    assert backends_served(proxy) == {"blue": 20}

    green.restart()
    up = log_line(proxy, "backend green: down -> up")
    assert f"{RISE} consecutive successes" in up, up
    assert backends_served(proxy) == {"blue": 10, "green": 10}
    assert "backend blue: up -> down" not in proxy.stderr_text()
    assert "/health" not in blue.stats()["requests_by_path"], "a TCP check sent HTTP"


# ---------------------------------------------------------------------------------------------
# The start-up round


def test_startup_round_keeps_the_first_requests_off_an_unhealthy_backend(
    backend_factory: BackendFactory, proxy_factory: ProxyFactory
) -> None:
    blue, green = backend_factory("blue"), backend_factory("green")
    green.set_health(500)
    proxy = proxy_factory(config_for(pairs(blue, green), ONLY_AT_START))
    # From the very first request on: no interval has passed, only the start-up round ran.
    assert backends_served(proxy) == {"blue": 20}
    assert root_requests(green) == 0
    assert "backend green: up -> down (initial check: HTTP 500)" in proxy.stderr_text()


def test_startup_round_is_bounded_by_the_timeout_when_a_check_hangs(
    backend_factory: BackendFactory, proxy_factory: ProxyFactory
) -> None:
    blue, stuck = backend_factory("blue"), backend_factory("stuck")
    stuck.set_health(hang=True)
    started = time.monotonic()
    proxy = proxy_factory(config_for(pairs(blue, stuck), ONLY_AT_START))
    assert time.monotonic() - started < 10, "the start-up round was not bounded"
    assert backends_served(proxy) == {"blue": 20}
    assert root_requests(stuck) == 0
    assert "backend stuck: up -> down (initial check: timeout" in proxy.stderr_text()


def test_proxy_started_in_front_of_a_dead_backend_sends_nothing_there(
    proxy_factory: ProxyFactory,
) -> None:
    # ``reject``: a backend wrongly believed up would be tried and answer 502, not 503.
    config = config_for(
        [("dead", f"http://127.0.0.1:{free_port()}")],
        ONLY_AT_START,
        routing={"when_all_down": "reject"},
    )
    proxy = proxy_factory(config)
    response = client.request(proxy.url + "/")
    assert response.status == 503, (response.status, response.text)
    assert "backend dead: up -> down (initial check: connect refused)" in proxy.stderr_text()


def test_proxy_started_in_front_of_a_live_backend_serves_at_once(
    backend_factory: BackendFactory, proxy_factory: ProxyFactory
) -> None:
    live = backend_factory("live")
    config = config_for(pairs(live), ONLY_AT_START, routing={"when_all_down": "reject"})
    proxy = proxy_factory(config)
    response = client.request(proxy.url + "/")
    assert response.status == 200, (response.status, response.text)
    assert response.header("X-Backend") == "live"
    assert "up -> down" not in proxy.stderr_text()


# ---------------------------------------------------------------------------------------------
# Passive failures


def test_passive_failure_marks_down_at_once_and_only_active_checks_bring_it_back(
    backend_factory: BackendFactory, proxy_factory: ProxyFactory
) -> None:
    blue, green = backend_factory("blue"), backend_factory("green")
    # Active checks alone would need 3 failures 1.5 s apart: far slower than live traffic.
    health = {**HEALTH, "interval": "1500ms", "fall": 3, "passive": {"max_failures": 1}}
    proxy = proxy_factory(config_for(pairs(blue, green), health))
    assert backends_served(proxy, 2) == {"blue": 1, "green": 1}

    green.kill()  # its port now refuses connections
    assert backends_served(proxy, 2) == {"blue": 2}, "the refused request was not retried"
    down = log_line(proxy, "backend green: up -> down", timeout=5)
    assert "1 consecutive connect failures on live traffic" in down, down
    assert backends_served(proxy) == {"blue": 20}

    green.restart()
    # Live traffic never brings it back: until the active checks say so, all goes to blue.
    flip = "backend green: down -> up"
    before_flip: list[str | None] = []

    def back_up() -> bool:
        flipped = flip in proxy.stderr_text()
        response = client.request(proxy.url + "/")
        assert response.status == 200, (response.status, response.text)
        if flip not in proxy.stderr_text():  # sent and answered while green was still down
            before_flip.append(response.header("X-Backend"))
        return flipped

    wait_until(back_up, timeout=15, interval=0.05, message="green back up by active checks")
    assert before_flip and set(before_flip) == {"blue"}, Counter(before_flip)
    up = log_line(proxy, flip)
    assert f"{RISE} consecutive successes" in up, up
    assert backends_served(proxy) == {"blue": 10, "green": 10}


# ---------------------------------------------------------------------------------------------
# Health changes outside the rotation do not restart it


def test_a_backup_flipping_health_leaves_the_99_1_rotation_alone(
    backend_factory: BackendFactory, proxy_factory: ProxyFactory
) -> None:
    """issue 11: each health change rebuilt the smooth weighted cycle at its start, and the
    1-weight backend's turn comes halfway through a 100-request cycle: with a backup flipping
    every 40 requests it got 0 of 1,000. The rotation now goes on: exactly 10 of 1,000."""
    main, canary, spare = (backend_factory(name) for name in ("main", "canary", "spare"))
    backends = [
        {"name": "main", "url": main.url, "weight": 99},
        {"name": "canary", "url": canary.url, "weight": 1},
        {"name": "spare", "url": spare.url, "weight": 1, "backup": True},
    ]
    health = {**HEALTH, "interval": "100ms", "fall": 1, "rise": 1}
    proxy = proxy_factory(proxy_config(backends, health_check=health), wait_admin=True)

    def flipped(change: str, times: int) -> bool:
        return proxy.stderr_text().count(f"backend spare: {change}") >= times

    seen: Counter[str] = Counter()
    with RawClient(proxy.host, proxy.port) as raw:
        for flip in range(25):
            for _ in range(40):
                response = raw.request("GET", "/")
                assert response.status == 200, (response.status, response.body)
                seen[response.header("X-Backend") or "?"] += 1
            healthy = flip % 2 == 1  # down first, then up again, and so on
            spare.set_health(200 if healthy else 500)
            change = "down -> up" if healthy else "up -> down"
            times = flip // 2 + 1
            wait_until(
                functools.partial(flipped, change, times), message=f"spare: {change} x{times}"
            )
    assert seen == {"main": 990, "canary": 10}
