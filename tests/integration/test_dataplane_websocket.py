"""Upgrades through tdproxy: WebSocket tunnelled both ways after the 101, the backend chosen once
at the handshake; every other upgrade (notably h2c, a request-smuggling vector) not forwarded.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes.client import RawClient
from tests.fakes.process import (
    BackendProcess,
    ProxyProcess,
    proxy_config,
    start_tdproxy,
    wait_until,
)
from tests.fakes.websocket import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    accept_key,
    encode_frame,
)

CLIENT_KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # the key RawClient.websocket_handshake sends


@pytest.fixture(scope="module")
def backends(blue: BackendProcess, green: BackendProcess) -> dict[str, BackendProcess]:
    return {"blue": blue, "green": green}


@pytest.fixture(scope="module")
def proxy(
    backends: dict[str, BackendProcess], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    specs = [(name, backend.url, 1) for name, backend in backends.items()]
    # A short idle timeout: an open tunnel must not be mistaken for an idle connection.
    config = proxy_config(specs, timeouts={"idle": "1s", "client_header": "1s"})
    with start_tdproxy(config, tmp_path_factory.mktemp("websocket")) as running:
        yield running


def header_names(echo: dict[str, object]) -> set[str]:
    headers = echo["headers"]
    assert isinstance(headers, list)
    return {str(name).lower() for name, _ in headers}


def test_websocket_echo_both_ways(client: RawClient) -> None:
    response = client.websocket_handshake()
    assert response.status == 101
    assert response.header("Sec-WebSocket-Accept") == accept_key(CLIENT_KEY)
    assert (response.header("Upgrade") or "").lower() == "websocket"
    client.ws_send(OP_TEXT, "héllo".encode())
    assert client.ws_recv() == (OP_TEXT, "héllo".encode())
    client.ws_send(OP_BINARY, b"\x00\x01\x02\xff")
    assert client.ws_recv() == (OP_BINARY, b"\x00\x01\x02\xff")
    client.ws_send(OP_PING, b"are you there")
    assert client.ws_recv() == (OP_PONG, b"are you there")
    client.ws_send(OP_TEXT, b"frag-", fin=False)
    client.ws_send(OP_CONTINUATION, b"mented")
    assert client.ws_recv() == (OP_TEXT, b"frag-mented")
    opcode, payload = client.ws_close(1000)
    assert (opcode, payload[:2]) == (OP_CLOSE, (1000).to_bytes(2, "big"))
    # The backend ended the tunnel, so the proxy closes the client side too.
    assert client.read_until_closed(timeout=5)[0] == b""


def test_a_large_frame_crosses_the_tunnel_intact(client: RawClient) -> None:
    assert client.websocket_handshake().status == 101
    payload = os.urandom(8 * 1024 * 1024)
    client.ws_send(OP_BINARY, payload)
    assert client.ws_recv() == (OP_BINARY, payload)
    client.ws_close()


def test_the_tunnel_outlives_the_idle_timeout(client: RawClient, proxy: ProxyProcess) -> None:
    """idle is 1s for this proxy: a tunnel quiet for longer is still open afterwards."""
    assert client.websocket_handshake().status == 101
    with RawClient(proxy.host, proxy.port) as idle:
        assert idle.request("GET", "/").status == 200
        # Wait until the idle timeout has demonstrably passed (it closed the plain connection).
        assert idle.read_until_closed(timeout=10)[0] == b""
    client.ws_send(OP_TEXT, b"still here")
    assert client.ws_recv() == (OP_TEXT, b"still here")
    client.ws_close()


def open_connections(backend: BackendProcess) -> int:
    return int(backend.stats()["connections_open"])


def test_the_backend_is_picked_at_the_handshake_and_kept(
    proxy: ProxyProcess, backends: dict[str, BackendProcess]
) -> None:
    for backend in backends.values():
        backend.reset_stats()
    with RawClient(proxy.host, proxy.port) as first, RawClient(proxy.host, proxy.port) as second:
        one = first.websocket_handshake().header("X-Backend")
        two = second.websocket_handshake().header("X-Backend")
        # 50/50: the two handshakes went to the two backends (the split applies per upgrade).
        assert {one, two} == {"blue", "green"}
        with_tunnels = {name: open_connections(backend) for name, backend in backends.items()}
        for round_number in range(20):
            for client in (first, second):
                client.ws_send(OP_TEXT, f"message {round_number}".encode())
                assert client.ws_recv() == (OP_TEXT, f"message {round_number}".encode())
        # Every message went over the upstream connection chosen at the handshake: each backend
        # saw one request (the upgrade) and no new connection.
        for name, backend in backends.items():
            assert backend.stats()["requests_by_path"] == {"/ws": 1}
            assert open_connections(backend) == with_tunnels[name]
        first.ws_close()
        second.ws_close()
    for name, backend in backends.items():
        wait_until(
            lambda backend=backend, name=name: open_connections(backend) < with_tunnels[name],
            timeout=5,
            message=f"{name}'s tunnel connection closed",
        )


def test_data_sent_right_after_the_handshake_reaches_the_backend(client: RawClient) -> None:
    """A frame in the same write as the upgrade request is held until the 101, not lost."""
    handshake = (
        "GET /ws HTTP/1.1\r\n"
        f"Host: {client.authority}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {CLIENT_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    frame = encode_frame(OP_TEXT, b"eager", mask=os.urandom(4))
    client.send(handshake + frame)
    assert client.read_response().status == 101
    assert client.ws_recv() == (OP_TEXT, b"eager")
    client.ws_close()


def test_a_client_leaving_the_tunnel_closes_the_backend_side(
    proxy: ProxyProcess, backends: dict[str, BackendProcess]
) -> None:
    with RawClient(proxy.host, proxy.port) as raw:
        response = raw.websocket_handshake()
        assert response.status == 101
        backend = backends[response.header("X-Backend") or "?"]
        raw.ws_send(OP_TEXT, b"hi")
        assert raw.ws_recv() == (OP_TEXT, b"hi")
        with_tunnel = open_connections(backend)
    # The client vanished without a close frame: the proxy must not keep the upstream open.
    wait_until(
        lambda: open_connections(backend) < with_tunnel,
        timeout=5,
        message="the tunnel's upstream connection closed",
    )


def test_a_declined_upgrade_leaves_the_connection_usable(client: RawClient) -> None:
    """The backend answers an upgrade request with a plain 404: no tunnel, and the connection
    goes on as HTTP/1.1 (RFC 9110 §7.8)."""
    response = client.websocket_handshake("/status/404")
    assert response.status == 404
    assert client.request("GET", "/echo").status == 200


def test_a_request_pipelined_behind_a_declined_upgrade_is_answered(client: RawClient) -> None:
    handshake = (
        "GET /status/404 HTTP/1.1\r\n"
        f"Host: {client.authority}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {CLIENT_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    follow_up = f"GET /echo HTTP/1.1\r\nHost: {client.authority}\r\n\r\n".encode()
    client.send(handshake + follow_up)
    assert client.read_response().status == 404
    # This proxy's idle timeout is 1s: a dropped request shows as a close, not a long wait.
    assert client.read_response().status == 200


def test_h2c_upgrade_is_not_forwarded(client: RawClient) -> None:
    response = client.request(
        "GET",
        "/echo",
        headers=[
            ("Connection", "Upgrade, HTTP2-Settings"),
            ("Upgrade", "h2c"),
            ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA"),
        ],
    )
    assert response.status == 200  # a normal response, not 101
    echo = response.json()
    names = header_names(echo)
    assert "upgrade" not in names
    assert "http2-settings" not in names  # named in Connection, so hop-by-hop
    assert "connection" not in names


def test_h2c_upgrade_on_a_request_with_a_body_is_not_forwarded(
    backends: dict[str, BackendProcess], tmp_path: Path
) -> None:
    # Its own proxy with short timeouts, so the failure shows fast and the stop is quick.
    config = proxy_config(
        [("blue", backends["blue"].url, 1)],
        timeouts={"response_header": "1s", "client_body": "1s", "shutdown_grace": "1s"},
    )
    with start_tdproxy(config, tmp_path) as proxy, RawClient(proxy.host, proxy.port) as client:
        response = client.request(
            "POST",
            "/echo",
            headers=[
                ("Connection", "Upgrade, HTTP2-Settings"),
                ("Upgrade", "h2c"),
                ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA"),
            ],
            body=b"payload",
        )
        assert response.status == 200
        echo = response.json()
        assert "upgrade" not in header_names(echo)
        assert echo["body_len"] == 7


def test_another_upgrade_to_the_websocket_path_is_not_tunnelled(client: RawClient) -> None:
    """The fake backend answers 426 to /ws when it sees no WebSocket upgrade: the proxy must not
    pass ``Upgrade: foo`` on, nor switch protocols."""
    response = client.request(
        "GET",
        "/ws",
        headers=[("Connection", "Upgrade"), ("Upgrade", "foo/1"), ("Sec-WebSocket-Key", "x")],
    )
    assert response.status == 426


def test_the_proxy_serves_plain_requests_after_upgrades(proxy: ProxyProcess) -> None:
    with RawClient(proxy.host, proxy.port) as raw:
        for _ in range(4):
            assert raw.request("GET", "/").status == 200
