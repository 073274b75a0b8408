"""timeouts.upstream_idle below the backend's keep-alive timeout: no request races a close.

A backend closes keep-alive connections after 1 s of idleness (Node's default is 5 s, many
servers use less). With ``upstream_idle: 500ms`` tdproxy retires a pooled connection before the
backend does, so a request sent just after the backend's close window finds no connection that
is being closed under it. POST is the case that matters: a non-idempotent request that dies on
a reused connection before any response byte is answered 502, never sent twice (docs:
operations.md, "Backend keep-alive").
"""

from __future__ import annotations

import time

from tests.fakes.client import RawClient
from tests.fakes.process import BackendFactory, ProxyFactory, proxy_config

BACKEND_IDLE = 1.0
# Sends fall across the backend's close window: just before, at and just after 1 s.
DELAYS = [BACKEND_IDLE + offset / 100 for offset in range(-10, 16, 2)]


def test_a_post_after_the_backends_close_window_gets_no_502(
    backend_factory: BackendFactory, proxy_factory: ProxyFactory
) -> None:
    backend = backend_factory("short", keepalive_timeout=BACKEND_IDLE)
    proxy = proxy_factory(
        proxy_config([("short", backend.url, 1)], timeouts={"upstream_idle": "500ms"})
    )
    statuses = []
    with RawClient(proxy.host, proxy.port) as raw:
        for delay in DELAYS:
            first = raw.request("POST", "/upload", body=b"warm the pool")
            assert first.status == 200, first
            time.sleep(delay)  # the stimulus: idle for as long as the backend's window
            statuses.append(raw.request("POST", "/upload", body=b"x" * 1000).status)
    assert statuses == [200] * len(DELAYS)
    # tdproxy retired each idle connection itself (even after the pauses shorter than the
    # backend's window): every POST after a pause opened a new one.
    assert backend.stats()["connections_total"] == len(DELAYS) + 1
