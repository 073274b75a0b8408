"""Graceful stop: on SIGTERM (or SIGINT) tdproxy stops accepting, lets answers in progress
finish within ``shutdown_grace``, closes idle keep-alive connections at once, and exits 0.

Each test starts its own proxy, since each one ends it.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable

import pytest

from tests.fakes.client import RawClient, metric
from tests.fakes.process import (
    BackendProcess,
    ProxyFactory,
    ProxyProcess,
    port_is_open,
    proxy_config,
    wait_until,
)

StartProxy = Callable[[str], ProxyProcess]


@pytest.fixture
def start_proxy(blue: BackendProcess, proxy_factory: ProxyFactory) -> StartProxy:
    def start(grace: str) -> ProxyProcess:
        config = proxy_config([("blue", blue.url, 1)], timeouts={"shutdown_grace": grace})
        return proxy_factory(config)

    return start


def wait_for_path(backend: BackendProcess, path: str) -> None:
    wait_until(
        lambda: backend.stats()["requests_by_path"].get(path, 0) >= 1,
        timeout=5,
        message=f"{path} reached the backend",
    )


def test_sigterm_lets_the_request_in_flight_finish(
    start_proxy: StartProxy, blue: BackendProcess
) -> None:
    proxy = start_proxy("20s")
    blue.reset_stats()
    with RawClient(proxy.host, proxy.port) as raw:
        raw.send_request("GET", "/slow?ms=2000")
        wait_for_path(blue, "/slow")
        proxy.terminate()
        wait_until(
            lambda: not port_is_open(proxy.host, proxy.port, timeout=0.2),
            timeout=2,
            message="new connections refused",
        )
        assert proxy.running  # still draining: the slow answer is not out yet
        response = raw.read_response()
        assert response.status == 200
        assert response.body == b"hello from blue\n"
        assert response.header("Connection") == "close"
        assert raw.read_until_closed(timeout=5)[0] == b""
    assert proxy.wait(timeout=10) == 0


def test_sigterm_with_only_idle_keep_alive_connections_exits_promptly(
    start_proxy: StartProxy,
) -> None:
    proxy = start_proxy("30s")
    clients = [RawClient(proxy.host, proxy.port) for _ in range(3)]
    try:
        for raw in clients:
            assert raw.request("GET", "/").status == 200  # now idle, kept alive
        proxy.terminate()
        # Well under the 30 s grace: nothing was in flight.
        assert proxy.wait(timeout=5) == 0
        for raw in clients:
            assert raw.read_until_closed(timeout=2)[0] == b""
    finally:
        for raw in clients:
            raw.close()


def test_sigint_stops_gracefully_too(start_proxy: StartProxy) -> None:
    proxy = start_proxy("30s")
    with RawClient(proxy.host, proxy.port) as raw:
        assert raw.request("GET", "/").status == 200
        proxy.send_signal(signal.SIGINT)
        assert proxy.wait(timeout=5) == 0
        assert raw.read_until_closed(timeout=2)[0] == b""


def test_the_grace_period_bounds_the_drain(start_proxy: StartProxy, blue: BackendProcess) -> None:
    """A request that never gets an answer is cut off once the grace is over; the exit is
    still clean."""
    proxy = start_proxy("1s")
    blue.reset_stats()
    with RawClient(proxy.host, proxy.port) as raw:
        raw.send_request("GET", "/hang")
        wait_for_path(blue, "/hang")
        proxy.terminate()
        assert proxy.wait(timeout=8) == 0
        data, _ = raw.read_until_closed(timeout=2)
        assert not data.startswith(b"HTTP/1.1 200")


def test_sigterm_during_a_connect_that_never_completes_exits_cleanly(
    proxy_factory: ProxyFactory,
) -> None:
    """A backend whose listen queue is full never answers the SYN: the connect task is still
    waiting when the drain ends. The entrypoint cancels and awaits it, so the process exits 0
    at the end of the grace, with no task left pending and nothing logged about it."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):  # fills the queue: nothing accepts
            config = proxy_config(
                [("stuck", f"http://127.0.0.1:{port}", 1)],
                timeouts={"connect": "30s", "shutdown_grace": "1s"},
            )
            proxy = proxy_factory(config)
            with RawClient(proxy.host, proxy.port, timeout=10) as client:
                client.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
                wait_until(
                    lambda: metric(proxy.admin_url, "tdproxy_backend_in_flight") == 1,
                    timeout=5,
                    message="the request waiting for its connect",
                    ignore=(OSError,),
                )
                proxy.terminate()
                assert proxy.wait(timeout=10) == 0
    stderr = proxy.stderr_text()
    assert "Task was destroyed" not in stderr, stderr
    assert "Traceback" not in stderr, stderr
