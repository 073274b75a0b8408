"""Connection handling through tdproxy: keep-alive on both sides, HTTP/1.0, Connection: close,
pipelining, and pooled upstream connections that the backend closes while they wait.

The fake backend counts the connections it accepts (``/_control/stats``), so upstream reuse is
observed where it happens rather than inferred from timing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes.bodies import stream_sha256
from tests.fakes.client import RawClient, Response, encode_request
from tests.fakes.process import (
    BackendProcess,
    ProxyProcess,
    proxy_config,
    start_backend,
    start_tdproxy,
    wait_until,
)


@pytest.fixture(scope="module")
def proxy(
    blue: BackendProcess, green: BackendProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    config = proxy_config([("blue", blue.url, 1), ("green", green.url, 1)])
    with start_tdproxy(config, tmp_path_factory.mktemp("connections")) as running:
        yield running


def connection_tokens(response: Response) -> set[str]:
    return {
        token.strip().lower()
        for value in response.header_values("Connection")
        for token in value.split(",")
    }


def assert_open(client: RawClient) -> None:
    """The connection still answers: one more request on it succeeds."""
    response = client.request("GET", "/status/200")
    assert response.status == 200


def assert_closed_by_proxy(client: RawClient) -> None:
    assert client.read_until_closed(timeout=5) == (b"", "eof")


# -- keep-alive ------------------------------------------------------------------------------


def test_many_requests_on_one_client_connection(client: RawClient) -> None:
    seen = []
    for number in range(60):
        response = client.request("GET", f"/echo?n={number}")
        assert response.status == 200
        assert "close" not in connection_tokens(response)
        assert response.json()["path"] == f"/echo?n={number}"
        seen.append(response.header("X-Backend"))
    assert seen.count("blue") == seen.count("green") == 30


def test_upstream_connections_are_pooled_across_client_connections(
    proxy: ProxyProcess, blue: BackendProcess, green: BackendProcess
) -> None:
    # Let connections from earlier tests settle, then count only what this test opens.
    for backend in (blue, green):
        backend.reset_stats()
    for _ in range(5):
        with RawClient(proxy.host, proxy.port) as raw:
            for _ in range(20):
                assert raw.request("GET", "/").status == 200
    for backend in (blue, green):
        stats = backend.stats()
        assert stats["requests_total"] == 50
        # Requests are sequential, so one pooled connection per backend suffices; allow slack
        # for a pooled connection the proxy found closed, but nothing like one per request.
        assert stats["connections_total"] <= 2, stats


def test_a_pooled_connection_the_backend_closed_is_replaced_transparently(
    tmp_path: Path,
) -> None:
    with (
        start_backend("short", keepalive_timeout=0.3) as short,
        start_tdproxy(proxy_config([("short", short.url, 1)]), tmp_path) as proxy,
        RawClient(proxy.host, proxy.port) as raw,
    ):
        assert raw.request("GET", "/").status == 200
        # The backend closes its idle side of the pooled connection.
        wait_until(
            lambda: short.stats()["connections_open"] == 0,
            timeout=5,
            message="the backend closed the idle upstream connection",
        )
        for _ in range(3):
            response = raw.request("GET", "/echo")
            assert response.status == 200
            assert response.json()["backend"] == "short"
        assert short.stats()["connections_total"] >= 2  # a new upstream connection was made


# -- HTTP/1.0 and Connection: close ------------------------------------------------------------


def test_http10_without_keep_alive_is_answered_and_closed(client: RawClient) -> None:
    response = client.request("GET", "/echo", version="HTTP/1.0")
    assert response.status == 200
    # The backend always gets HTTP/1.1 from the proxy.
    assert response.json()["version"] == "HTTP/1.1"
    assert "close" in connection_tokens(response)
    assert_closed_by_proxy(client)


def test_http10_keep_alive_is_honoured(client: RawClient) -> None:
    for number in range(3):
        response = client.request(
            "GET", f"/echo?n={number}", headers=[("Connection", "keep-alive")], version="HTTP/1.0"
        )
        assert response.status == 200
        assert "keep-alive" in connection_tokens(response)
        assert response.header("Content-Length") is not None
        assert response.header("Transfer-Encoding") is None
    assert_open(client)


def test_http10_gets_a_chunked_backend_response_close_delimited(client: RawClient) -> None:
    """An HTTP/1.0 client cannot read chunked framing: the body ends with the connection."""
    size = 300_000
    response = client.request(
        "GET",
        f"/stream?bytes={size}&chunked=1&chunk=7000",
        headers=[("Connection", "keep-alive")],
        version="HTTP/1.0",
    )
    assert response.status == 200
    assert response.header("Transfer-Encoding") is None
    assert response.header("Content-Length") is None
    assert "close" in connection_tokens(response)
    # read_response read to EOF since there was no framing: the whole body arrived intact.
    assert len(response.body) == size
    assert response.header("X-Body-Sha256") == stream_sha256(size)
    assert hashlib.sha256(response.body).hexdigest() == stream_sha256(size)


@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.0"])
def test_connection_close_is_honoured(client: RawClient, version: str) -> None:
    response = client.request("GET", "/echo", headers=[("Connection", "close")], version=version)
    assert response.status == 200
    assert "close" in connection_tokens(response)
    # The backend does not see the client's Connection header (hop-by-hop).
    assert "connection" not in {name.lower() for name, _ in response.json()["headers"]}
    assert_closed_by_proxy(client)


def test_backend_connection_close_does_not_close_the_client(client: RawClient) -> None:
    """``close=1`` makes the backend answer with Connection: close and hang up; the client's
    keep-alive connection is a different hop and stays open."""
    for _ in range(4):
        response = client.request("GET", "/echo?close=1")
        assert response.status == 200
        assert "close" not in connection_tokens(response)
    assert_open(client)


# -- pipelining --------------------------------------------------------------------------------


def test_pipelined_requests_are_answered_in_order(client: RawClient) -> None:
    paths = ["/slow?ms=150", "/echo", "/stream?bytes=50000", "/status/404", "/", "/slow?ms=30"]
    requests = []
    for number in range(20):
        path = paths[number % len(paths)]
        requests.append(
            encode_request(
                "GET", path, host=client.authority, headers=[("X-Request-Id", f"req-{number}")]
            )
        )
    client.send(b"".join(requests))  # all twenty in one write
    for number in range(20):
        response = client.read_response()
        assert response.header("X-Request-Id") == f"req-{number}"
        expected = 404 if paths[number % len(paths)] == "/status/404" else 200
        assert response.status == expected
    assert_open(client)


def test_pipelined_requests_with_bodies_stay_in_order(client: RawClient) -> None:
    requests = []
    for number in range(10):
        body = bytes([65 + number]) * (1000 * (number + 1))
        requests.append(
            encode_request(
                "POST",
                "/upload",
                host=client.authority,
                headers=[("X-Request-Id", f"up-{number}")],
                body=body,
            )
        )
    client.send(b"".join(requests))
    for number in range(10):
        response = client.read_response()
        assert response.status == 200
        assert response.header("X-Request-Id") == f"up-{number}"
        assert response.json()["body_len"] == 1000 * (number + 1)


def test_pipelined_requests_after_connection_close_are_not_answered(
    client: RawClient, blue: BackendProcess, green: BackendProcess
) -> None:
    first = encode_request(
        "GET",
        "/",
        host=client.authority,
        headers=[("Connection", "close"), ("X-Request-Id", "closing")],
    )
    second = encode_request(
        "GET", "/", host=client.authority, headers=[("X-Request-Id", "after-close")]
    )
    client.send(first + second)
    response = client.read_response()
    assert response.header("X-Request-Id") == "closing"
    assert client.read_until_closed(timeout=5)[0] == b""
    assert not blue.saw_request_id("after-close") and not green.saw_request_id("after-close")
