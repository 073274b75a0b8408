"""Backend faults: tdproxy answers 502 when it still can, never presents a broken response as
complete when it cannot, and goes on serving other requests in every case.

With one backend per proxy there is nowhere to retry, so each fault reaches the client.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes.client import IncompleteResponse, RawClient, Response
from tests.fakes.process import (
    BackendProcess,
    ProxyProcess,
    proxy_config,
    start_backend,
    start_tdproxy,
    wait_until,
)

MB = 1024 * 1024


@pytest.fixture(scope="module")
def proxy(blue: BackendProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    config = proxy_config([("blue", blue.url, 1)], timeouts={"response_header": "5s"})
    with start_tdproxy(config, tmp_path_factory.mktemp("faults")) as running:
        yield running


@pytest.fixture(scope="module")
def unreachable_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """A proxy whose only backend's port refuses connections.

    The port is held bound (never listening) for the whole module: connecting to it is refused,
    and no other process on the machine can start listening on it meanwhile."""
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
        config = proxy_config([("gone", f"http://127.0.0.1:{port}", 1)])
        with start_tdproxy(config, tmp_path_factory.mktemp("unreachable")) as running:
            yield running


def assert_502(response: Response) -> None:
    assert response.status == 502
    assert (response.header("Content-Type") or "").startswith("text/plain")
    assert response.body.startswith(b"502 ")


def assert_serving(proxy: ProxyProcess, name: str = "blue") -> None:
    """The proxy is alive and answers new connections and several requests on them."""
    assert proxy.running
    with RawClient(proxy.host, proxy.port) as raw:
        for _ in range(3):
            response = raw.request("GET", "/echo")
            assert (response.status, response.json()["backend"]) == (200, name)


# -- faults before the response head: 502 ------------------------------------------------------


def test_unreachable_backend_gives_502_quickly(unreachable_proxy: ProxyProcess) -> None:
    with RawClient(unreachable_proxy.host, unreachable_proxy.port, timeout=5) as raw:
        for _ in range(2):  # and the connection is still usable after the first
            assert_502(raw.request("GET", "/"))
    assert unreachable_proxy.running


def test_reset_in_the_middle_of_the_response_head_gives_502(
    client: RawClient, proxy: ProxyProcess
) -> None:
    assert_502(client.request("GET", "/reset-headers"))
    assert_serving(proxy)


def test_garbage_instead_of_http_gives_502(client: RawClient, proxy: ProxyProcess) -> None:
    assert_502(client.request("GET", "/garbage"))
    assert_serving(proxy)


def test_a_backend_that_closes_at_once_gives_502(tmp_path: Path) -> None:
    with start_backend("closer", accept_then_close=True) as closer:
        config = proxy_config(
            [("closer", closer.url, 1)],
            timeouts={"response_header": "30s", "shutdown_grace": "1s"},
        )
        with start_tdproxy(config, tmp_path) as proxy:
            # One after another (the race needs an otherwise idle proxy), and many: a run of a
            # hundred has never been seen to miss it, a run of sixteen did.
            for _ in range(100):
                # A deadline far below response_header: a 502 must not wait for it.
                with RawClient(proxy.host, proxy.port, timeout=2) as raw:
                    assert_502(raw.request("GET", "/"))
            assert proxy.running


def test_a_non_idempotent_request_is_not_replayed_after_a_fault(
    client: RawClient, blue: BackendProcess
) -> None:
    blue.reset_stats()
    assert_502(client.request("POST", "/reset-headers", body=b"once"))
    assert blue.stats()["requests_by_path"] == {"/reset-headers": 1}


def test_a_backend_killed_and_restarted_is_used_again(tmp_path: Path) -> None:
    """The pooled connections to a backend that died are dropped, not reused for the next
    request after it comes back."""
    with start_backend("phoenix") as phoenix:
        config = proxy_config([("phoenix", phoenix.url, 1)], timeouts={"connect": "2s"})
        with start_tdproxy(config, tmp_path) as proxy, RawClient(proxy.host, proxy.port) as raw:
            assert raw.request("GET", "/").status == 200
            phoenix.kill()
            assert_502(raw.request("GET", "/"))
            phoenix.restart()
            response = raw.request("GET", "/echo")
            assert response.status == 200
            assert response.json()["backend"] == "phoenix"


# -- faults after the response head: the client must see a broken response ---------------------


def test_reset_in_the_middle_of_a_fixed_length_body_is_not_presented_as_complete(
    client: RawClient, proxy: ProxyProcess
) -> None:
    client.send_request("GET", "/reset-body?bytes=200000")
    head = client.read_head()
    assert head.status == 200
    promised = int(head.header("Content-Length") or 0)
    assert promised == 200_000 + 1_000_000
    data, _ = client.read_until_closed(timeout=5)
    assert 0 < len(data) < promised  # some of it came, then the connection ended early
    assert_serving(proxy)


def test_close_right_after_the_head_is_not_presented_as_complete(
    client: RawClient, proxy: ProxyProcess
) -> None:
    client.send_request("GET", "/close-after-headers")
    head = client.read_head()
    assert (head.status, head.header("Content-Length")) == (200, "100")
    data, _ = client.read_until_closed(timeout=5)
    assert len(data) < 100
    assert_serving(proxy)


def test_backend_dying_mid_chunked_body_breaks_the_chunked_stream(tmp_path: Path) -> None:
    with start_backend("victim") as victim:
        config = proxy_config([("victim", victim.url, 1)])
        with start_tdproxy(config, tmp_path) as proxy, RawClient(proxy.host, proxy.port) as raw:
            raw.send_request("GET", f"/stream?bytes={64 * MB}&chunked=1")
            head = raw.read_head()
            assert head.header("Transfer-Encoding") == "chunked"
            size = int(raw.read_until(b"\r\n")[:-2], 16)  # the stream is flowing:
            assert size > 0 and raw.read_exactly(size + 2).endswith(b"\r\n")  # one whole chunk
            victim.kill()  # the backend vanishes mid-body
            with pytest.raises((IncompleteResponse, ConnectionResetError)):
                raw.read_body(head)  # the terminating zero-size chunk never comes
            assert proxy.running
            with RawClient(proxy.host, proxy.port, timeout=5) as again:
                assert_502(again.request("GET", "/"))  # still answering, now for a dead backend


def test_the_pool_keeps_no_broken_connection_after_faults(proxy: ProxyProcess) -> None:
    faults = {  # path -> whether the fault comes before the response head (so: a 502)
        "/reset-headers": True,
        "/garbage": True,
        "/reset-body?bytes=1000": False,
        "/close-after-headers": False,
    }
    for path, before_head in faults.items():
        with RawClient(proxy.host, proxy.port) as raw:
            raw.send_request("GET", path)
            if before_head:
                assert_502(raw.read_response())
            else:
                assert raw.read_head().status == 200
                raw.read_until_closed(timeout=5)
        with RawClient(proxy.host, proxy.port) as raw:
            for _ in range(5):
                assert raw.request("GET", "/").status == 200


# -- the client goes away ----------------------------------------------------------------------


@pytest.fixture
def lone_backend(tmp_path: Path) -> Iterator[tuple[BackendProcess, ProxyProcess]]:
    """A backend of its own, so its open-connection count shows only this test's traffic."""
    with start_backend("lone") as lone:
        config = proxy_config([("lone", lone.url, 1)], timeouts={"shutdown_grace": "1s"})
        with start_tdproxy(config, tmp_path) as proxy:
            yield lone, proxy


def test_a_client_leaving_mid_download_frees_the_upstream_connection(
    lone_backend: tuple[BackendProcess, ProxyProcess],
) -> None:
    lone, proxy = lone_backend
    with RawClient(proxy.host, proxy.port) as raw:
        raw.send_request("GET", f"/stream?bytes={64 * MB}")
        assert raw.read_head().status == 200
        raw.read_exactly(MB)
    # Far more than socket buffers hold was asked for; with the client gone the proxy must
    # drop the upstream side rather than pool it mid-response or keep draining it.
    wait_until(
        lambda: lone.stats()["connections_open"] == 0,
        timeout=5,
        message="the upstream connection of the abandoned download closed",
    )
    assert_serving(proxy, "lone")


def test_a_client_leaving_mid_upload_frees_the_upstream_connection(
    lone_backend: tuple[BackendProcess, ProxyProcess],
) -> None:
    lone, proxy = lone_backend
    with RawClient(proxy.host, proxy.port) as raw:
        raw.send_request("POST", "/upload", headers=[("Content-Length", str(100 * MB))])
        raw.send(b"x" * MB)
        wait_until(
            lambda: lone.stats()["requests_by_path"].get("/upload") == 1,
            timeout=5,
            message="the upload reached the backend",
        )
    wait_until(
        lambda: lone.stats()["connections_open"] == 0,
        timeout=2,  # client_body is 60 s: this is not it
        message="the upstream connection of the abandoned upload closed",
    )
    assert_serving(proxy, "lone")


def test_a_half_closed_client_still_gets_its_answer(client: RawClient) -> None:
    """A client may send its request and shut down its sending side (shutdown(SHUT_WR))."""
    client.send_request("GET", "/stream?bytes=100000")
    client.sock.shutdown(socket.SHUT_WR)
    response = client.read_response()
    assert response.status == 200
    assert len(response.body) == 100_000
    assert client.read_until_closed(timeout=5)[0] == b""
