"""Several tdproxy replicas behind one load balancer agree on sticky sessions.

A load balancer in front of replicas (a Kubernetes Service, say) sends each request of a user to
any replica. Sticky routing holds anyway because the cookie token is derived from the backend's
name (and the shared secret, when set), not from anything one process made up: a cookie issued
by one replica is honoured by every other with the same config. These tests run two real tdproxy
processes on different ports with the same backends and alternate one user's requests between
them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest

from tests.fakes.client import Response, request
from tests.fakes.process import (
    BackendFactory,
    BackendProcess,
    ProxyFactory,
    ProxyProcess,
    proxy_config,
)

COOKIE = "TDSESSION"
ROUNDS = 20  # requests per user, alternating between the replicas


def _sticky(
    backends: Mapping[str, BackendProcess], weights: Mapping[str, int], **sticky: Any
) -> dict[str, Any]:
    """A sticky config on fresh entrypoint and admin ports (so replicas never collide)."""
    specs = [(name, backend.url, weights[name]) for name, backend in backends.items()]
    return proxy_config(specs, routing={"method": "sticky", "sticky": {"cookie": COOKIE, **sticky}})


def _cookie(response: Response) -> str | None:
    """The ``name=value`` this response's Set-Cookie pins the client with, if any."""
    for header in response.header_values("Set-Cookie"):
        pair = header.split(";", 1)[0].strip()
        if pair.startswith(COOKIE + "="):
            return pair
    return None


def _get(proxy: ProxyProcess, cookie: str | None = None) -> Response:
    headers = [("Cookie", cookie)] if cookie else []
    response = request(proxy.url + "/", headers=headers)
    assert response.status == 200, (response.status, response.text)
    return response


def _new_users(proxy: ProxyProcess, count: int) -> dict[str, str]:
    """Place ``count`` new users (no cookie) on ``proxy``: backend -> one cookie pinning there."""
    cookies: dict[str, str] = {}
    for _ in range(count):
        response = _get(proxy)
        cookie = _cookie(response)
        assert cookie is not None, f"a new user got no sticky cookie: {response.headers}"
        backend = response.header("X-Backend")
        assert backend is not None
        cookies.setdefault(backend, cookie)
    return cookies


def _assert_pinned(replicas: list[ProxyProcess], cookie: str, backend: str) -> None:
    """``ROUNDS`` requests with ``cookie``, alternating between the replicas, all reach
    ``backend`` and none is handed a new cookie."""
    seen = []
    for index in range(ROUNDS):
        proxy = replicas[index % len(replicas)]
        response = _get(proxy, cookie)
        seen.append((proxy.port, response.header("X-Backend")))
        assert _cookie(response) is None, f"replica :{proxy.port} re-pinned {cookie}"
    assert {served for _, served in seen} == {backend}, seen


StartPair = Callable[..., list[ProxyProcess]]


@pytest.fixture
def backends(backend_factory: BackendFactory) -> dict[str, BackendProcess]:
    return {name: backend_factory(name) for name in ("blue", "green")}


@pytest.fixture
def start_pair(backends: dict[str, BackendProcess], proxy_factory: ProxyFactory) -> StartPair:
    """Two replicas: the same routing config, each on its own entrypoint and admin port."""

    def start(
        weights: Mapping[str, int] | None = None,
        other_weights: Mapping[str, int] | None = None,
        **sticky: Any,
    ) -> list[ProxyProcess]:
        first = weights or {"blue": 50, "green": 50}
        second = other_weights or first
        return [
            proxy_factory(_sticky(backends, first, **sticky)),
            proxy_factory(_sticky(backends, second, **sticky)),
        ]

    return start


@pytest.mark.parametrize("secret", [None, "shared-between-replicas"], ids=["plain", "secret"])
def test_a_cookie_from_one_replica_is_honoured_by_the_other(
    start_pair: StartPair, secret: str | None
) -> None:
    replicas = start_pair(secret=secret)
    assert replicas[0].port != replicas[1].port
    assert replicas[0].admin_port != replicas[1].admin_port
    # At 50/50 new users alternate between the backends, so four cover both, from each replica.
    for issuer in replicas:
        cookies = _new_users(issuer, 4)
        assert set(cookies) == {"blue", "green"}, cookies
        for backend, cookie in cookies.items():
            _assert_pinned(replicas, cookie, backend)


def test_replicas_issue_the_same_cookie_for_a_backend(start_pair: StartPair) -> None:
    """Nothing per-process goes into the token: both replicas pin to blue with the same value."""
    replicas = start_pair(secret="shared-between-replicas")
    issued = [_new_users(proxy, 4) for proxy in replicas]
    assert issued[0] == issued[1]


def test_replicas_mid_rollout_still_honour_the_cookie(start_pair: StartPair) -> None:
    """A weight change reaches replicas at different moments (each pod's kubelet updates its
    ConfigMap volume on its own schedule). While they disagree, a pinned user stays put: one
    replica already gives blue weight 0, and the user pinned to blue stays on blue there too."""
    replicas = start_pair({"blue": 100, "green": 0}, {"blue": 0, "green": 100})
    (blue_cookie,) = _new_users(replicas[0], 2).values()
    (green_cookie,) = _new_users(replicas[1], 2).values()
    _assert_pinned(replicas, blue_cookie, "blue")
    _assert_pinned(replicas, green_cookie, "green")


def test_replicas_with_different_secrets_do_not_agree(
    backends: dict[str, BackendProcess], proxy_factory: ProxyFactory
) -> None:
    """Why every replica needs the same ``routing.sticky.secret``: a token made with another
    secret decodes to no backend, so the user is placed afresh and handed a new cookie."""
    weights = {"blue": 50, "green": 50}
    issuer = proxy_factory(_sticky(backends, weights, secret="one"))
    other = proxy_factory(_sticky(backends, weights, secret="another"))
    for cookie in _new_users(issuer, 4).values():
        response = _get(other, cookie)
        reissued = _cookie(response)
        assert reissued is not None and reissued != cookie
