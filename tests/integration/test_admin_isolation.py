"""The admin server is never reachable through the entrypoint port (issue 4).

Admin paths sent to the entrypoint are ordinary requests: they go to a backend like any other
path, and nothing of the admin server (metrics, status, reload) answers them.
"""

from __future__ import annotations

from tests.fakes import client
from tests.fakes.process import BackendFactory, ProxyFactory, proxy_config


def test_admin_paths_on_the_entrypoint_go_to_the_backend(
    backend_factory: BackendFactory, proxy_factory: ProxyFactory
) -> None:
    blue = backend_factory("blue")
    proxy = proxy_factory(proxy_config([("blue", blue.url, 1)]), wait_admin=True)
    for path in ("/metrics", "/healthz", "/readyz", "/api/v1/status", "/status"):
        through_entrypoint = client.request(proxy.url + path)
        assert through_entrypoint.header("X-Backend") == "blue", (path, through_entrypoint.headers)
        assert b"tdproxy_requests_total" not in through_entrypoint.body
    reload = client.request(proxy.url + "/api/v1/reload", method="POST", body=b"")
    assert reload.header("X-Backend") == "blue"
    admin = client.request(proxy.admin_url + "/metrics")
    assert admin.status == 200 and b"tdproxy_requests_total" in admin.body
    assert admin.header("X-Backend") is None
