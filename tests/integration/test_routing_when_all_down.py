"""``routing.when_all_down``: what happens when every backend is marked down.

issue 3: ``fail_open`` (the default) tries the backends anyway, because the checks may be what is
wrong; ``reject`` answers 503 with a short body. The backends here keep serving ``/`` while their
``/health`` answers 500, which is exactly the "checks are wrong" case.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from tests.fakes import client
from tests.fakes.process import (
    BackendFactory,
    BackendProcess,
    ProxyFactory,
    ProxyProcess,
    proxy_config,
)

HEALTH = {
    "enabled": True,
    "path": "/health",
    "interval": "200ms",
    "timeout": "200ms",
    "fall": 1,
    "rise": 1,
}


def all_down_proxy(
    backend_factory: BackendFactory, proxy_factory: ProxyFactory, **routing: Any
) -> tuple[ProxyProcess, BackendProcess, BackendProcess]:
    """blue and green, healthy at start, then both failing their checks (``/`` still works)."""
    blue, green = backend_factory("blue"), backend_factory("green")
    specs = [("blue", blue.url, 1), ("green", green.url, 1)]
    proxy = proxy_factory(proxy_config(specs, health_check=HEALTH, routing=routing))
    first = client.request(proxy.url + "/")
    assert first.status == 200, "healthy at start"
    for backend in (blue, green):
        backend.set_health(500)
    for backend in (blue, green):
        proxy.wait_for_output(f"backend {backend.name}: up -> down", stream="stderr")
    blue.reset_stats()
    green.reset_stats()
    return proxy, blue, green


def root_requests(backend: BackendProcess) -> int:
    return int(backend.stats()["requests_by_path"].get("/", 0))


@pytest.mark.parametrize("routing", [{}, {"when_all_down": "fail_open"}], ids=["default", "set"])
def test_fail_open_still_tries_the_backends(
    backend_factory: BackendFactory, proxy_factory: ProxyFactory, routing: dict[str, str]
) -> None:
    proxy, blue, green = all_down_proxy(backend_factory, proxy_factory, **routing)
    seen: Counter[str | None] = Counter()
    for _ in range(20):
        response = client.request(proxy.url + "/")
        assert response.status == 200, (response.status, response.text)
        seen[response.header("X-Backend")] += 1
    assert seen == {"blue": 10, "green": 10}, "fail_open keeps the weights"
    assert (root_requests(blue), root_requests(green)) == (10, 10)


def test_fail_open_sticky_cookie_holders_keep_their_backend(
    backend_factory: BackendFactory, proxy_factory: ProxyFactory
) -> None:
    proxy, _, _ = all_down_proxy(backend_factory, proxy_factory, method="sticky")
    placed = client.request(proxy.url + "/")
    assert placed.status == 200
    cookie = (placed.header("Set-Cookie") or "").split(";", 1)[0]
    assert cookie.startswith("TDSESSION="), placed.headers
    for _ in range(10):
        response = client.request(proxy.url + "/", headers=[("Cookie", cookie)])
        assert response.status == 200
        assert response.header("X-Backend") == placed.header("X-Backend")


@pytest.mark.parametrize("method", ["round_robin", "sticky", "failover"])
def test_reject_answers_503_with_a_short_body(
    backend_factory: BackendFactory, proxy_factory: ProxyFactory, method: str
) -> None:
    proxy, blue, green = all_down_proxy(
        backend_factory, proxy_factory, method=method, when_all_down="reject"
    )
    for _ in range(5):
        response = client.request(proxy.url + "/")
        assert response.status == 503, (response.status, response.text)
        assert response.header("X-Backend") is None, "a backend answered"
        assert 0 < len(response.body) <= 200, response.body
        assert (response.header("Content-Type") or "").startswith("text/plain")
    assert root_requests(blue) == root_requests(green) == 0

    blue.set_health(200)
    proxy.wait_for_output("backend blue: down -> up", stream="stderr")
    response = client.request(proxy.url + "/")
    assert response.status == 200
    assert response.header("X-Backend") == "blue"


def test_rejected_requests_are_counted_without_a_backend(
    backend_factory: BackendFactory, proxy_factory: ProxyFactory
) -> None:
    proxy, _, _ = all_down_proxy(backend_factory, proxy_factory, when_all_down="reject")
    answered_before = client.metric(proxy.admin_url, "tdproxy_requests_total")
    for _ in range(7):
        assert client.request(proxy.url + "/").status == 503
    assert client.metric(proxy.admin_url, "tdproxy_unrouted_requests_total", code="503") == 7
    assert client.metric(proxy.admin_url, "tdproxy_requests_total") == answered_before
    status = client.request(proxy.admin_url + "/api/v1/status").json()
    assert status["unrouted_requests"] == {"503": 7}
