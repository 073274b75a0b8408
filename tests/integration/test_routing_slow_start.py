"""Slow start against a real ``tdproxy run``: a backend that comes back ramps up to its share.

issue 12, item 4: with ``routing.slow_start: 10s`` a backend that becomes healthy after being
down gets an effective weight that grows from 10 % to 100 % of its configured weight over 10 s;
``tdproxy_backend_effective_weight`` and ``effective_weight`` in ``/api/v1/status`` show it.
Which backend answered comes from the ``X-Backend`` header, checked against the fake backends'
own request counts.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from tests.fakes import client
from tests.fakes.client import RawClient
from tests.fakes.process import (
    BackendFactory,
    BackendProcess,
    ProxyFactory,
    ProxyProcess,
    proxy_config,
    wait_until,
)

WINDOW = 10.0
HEALTH = {
    "enabled": True,
    "path": "/health",
    "interval": "100ms",
    "timeout": "500ms",
    "fall": 1,
    "rise": 1,
}


def status(proxy: ProxyProcess) -> dict[str, dict[str, Any]]:
    doc = client.request(proxy.admin_url + "/api/v1/status").json()
    return {backend["name"]: backend for backend in doc["backends"]}


def served(proxy: ProxyProcess, *, count: int = 0, until: float = 0.0) -> Counter[str]:
    """Who answered sequential GETs on one keep-alive connection: ``count`` of them, or as many
    as fit before ``until`` (epoch seconds)."""
    seen: Counter[str] = Counter()
    with RawClient(proxy.host, proxy.port) as raw:
        while (count and seen.total() < count) or (until and time.time() < until):
            response = raw.request("GET", "/")
            assert response.status == 200, (response.status, response.text)
            seen[response.header("X-Backend") or "?"] += 1
    return seen


def root_requests(backend: BackendProcess) -> int:
    return int(backend.stats()["requests_by_path"].get("/", 0))


def test_a_recovered_backend_ramps_up_to_its_share_over_the_window(
    backend_factory: BackendFactory, proxy_factory: ProxyFactory
) -> None:
    blue, green = backend_factory("blue"), backend_factory("green")
    config = proxy_config(
        [("blue", blue.url, 50), ("green", green.url, 50)],
        routing={"slow_start": f"{WINDOW:g}s"},
        health_check=HEALTH,
    )
    proxy = proxy_factory(config, wait_admin=True)
    # Not at start: both serve their configured share at once.
    assert served(proxy, count=20) == {"blue": 10, "green": 10}
    assert status(proxy)["green"]["effective_weight"] == 50

    green.set_health(503)
    wait_until(lambda: not status(proxy)["green"]["healthy"], timeout=5, message="green down")
    green.set_health(200)
    back = wait_until(
        lambda: (s := status(proxy)["green"])["healthy"] and s, timeout=5, message="green up"
    )
    recovered = back["health_changed_at"]  # the proxy's clock (epoch), same host
    assert back["effective_weight"] < 50
    blue.reset_stats()
    green.reset_stats()

    # The first 2 s after recovery, second by second: well under its configured half.
    first = served(proxy, until=recovered + 1)
    second = served(proxy, until=recovered + 2)
    early = first + second
    assert (root_requests(blue), root_requests(green)) == (early["blue"], early["green"])
    print(
        f"green share after recovery: 0-1 s {first['green']}/{first.total()}, "
        f"1-2 s {second['green']}/{second.total()} (configured 50 %)"
    )
    assert early.total() >= 50, early  # enough requests to measure a share
    # The ramp's steps give 10/110 (9 %) in the first second and 95/595 (16 %) in the next.
    assert early["green"] / early.total() < 0.25, early
    assert first["green"] / max(1, first.total()) < 0.2, first

    # The gauge and the status show the ramp, and reach the configured weight at its end.
    ramping = client.metric(proxy.admin_url, "tdproxy_backend_effective_weight", backend="green")
    assert 5 <= ramping < 50
    assert client.metric(proxy.admin_url, "tdproxy_backend_effective_weight", backend="blue") == 50
    wait_until(
        lambda: status(proxy)["green"]["effective_weight"] == 50,
        timeout=WINDOW + 5,
        interval=0.1,
        message="green at full weight",
    )
    ramp = time.time() - recovered
    print(f"green at full weight {ramp:.2f} s after recovery")
    assert WINDOW - 1.5 <= ramp <= WINDOW + 2, ramp
    assert client.metric(proxy.admin_url, "tdproxy_backend_effective_weight", backend="green") == 50

    # After the window: its full share, in strict alternation again.
    assert served(proxy, count=100) == {"blue": 50, "green": 50}
    assert "backend green: down -> up" in proxy.stderr_text()


def test_without_slow_start_a_recovered_backend_gets_its_share_at_once(
    backend_factory: BackendFactory, proxy_factory: ProxyFactory
) -> None:
    blue, green = backend_factory("blue"), backend_factory("green")
    config = proxy_config([("blue", blue.url, 50), ("green", green.url, 50)], health_check=HEALTH)
    proxy = proxy_factory(config, wait_admin=True)
    green.set_health(503)
    wait_until(lambda: not status(proxy)["green"]["healthy"], timeout=5, message="green down")
    green.set_health(200)
    wait_until(lambda: status(proxy)["green"]["healthy"], timeout=5, message="green up")
    assert status(proxy)["green"]["effective_weight"] == 50
    assert served(proxy, count=40) == {"blue": 20, "green": 20}


def test_a_backend_a_reload_raises_from_zero_ramps_and_an_unchanged_one_does_not(
    backend_factory: BackendFactory, proxy_factory: ProxyFactory
) -> None:
    blue, green = backend_factory("blue"), backend_factory("green")
    config = proxy_config(
        [("blue", blue.url, 50), ("green", green.url, 0)],
        routing={"slow_start": "3s"},
        health_check=HEALTH,
    )
    proxy = proxy_factory(config, wait_admin=True)
    assert served(proxy, count=10) == {"blue": 10}
    raised = [
        {"name": "blue", "url": blue.url, "weight": 50},
        {"name": "green", "url": green.url, "weight": 50},
    ]
    proxy.write_config({**config, "backends": raised})
    response = client.request(proxy.admin_url + "/api/v1/reload", "POST")
    assert response.status == 200, response.text
    now = status(proxy)
    assert now["blue"]["effective_weight"] == 50  # unchanged by the reload: no ramp
    assert 5 <= now["green"]["effective_weight"] < 50
    wait_until(
        lambda: status(proxy)["green"]["effective_weight"] == 50,
        timeout=8,
        interval=0.1,
        message="green at full weight",
    )
    assert served(proxy, count=20) == {"blue": 10, "green": 10}
