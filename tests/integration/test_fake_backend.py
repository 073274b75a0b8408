"""The fake backend on its own, over plain sockets: every behaviour the proxy tests rely on."""

from __future__ import annotations

import hashlib
import http.client
import os
import time
from collections.abc import Iterator

import aiohttp
import pytest

from tests.fakes.backend import GARBAGE, HEAD_TEST_BODY, PARTIAL_HEAD
from tests.fakes.bodies import stream_body, stream_sha256
from tests.fakes.client import RawClient, encode_chunked, request
from tests.fakes.process import BackendFactory, BackendProcess, ProcessFailed, wait_until
from tests.fakes.scripted import AWAIT_DATA, ScriptedBackend
from tests.fakes.websocket import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    accept_key,
    close_payload,
)


@pytest.fixture
def backend(backend_factory: BackendFactory) -> BackendProcess:
    return backend_factory("blue")


@pytest.fixture
def conn(backend: BackendProcess) -> Iterator[RawClient]:
    with RawClient(backend.host, backend.port) as client:
        yield client


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- plain answers -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/no/such/path?x=1"])
def test_unknown_paths_say_hello(backend: BackendProcess, path: str) -> None:
    response = request(backend.url + path)
    assert response.status == 200
    assert response.body == b"hello from blue\n"
    assert response.header("X-Backend") == "blue"
    assert (
        response.header(
            "Content-Type",
        )
        == "text/plain; charset=utf-8"
    )
    assert response.header("X-Request-Id") is None


def test_request_id_is_echoed(backend: BackendProcess) -> None:
    response = request(backend.url + "/status/404", headers=[("X-Request-Id", "req-1")])
    assert (response.status, response.header("X-Request-Id")) == (404, "req-1")
    assert response.header("X-Backend") == "blue"


def test_echo_reports_the_request_exactly_as_received(conn: RawClient) -> None:
    conn.send(
        b"POST http://example.com/echo?a=1 HTTP/1.1\r\n"
        b"Host: example.com\r\n"
        b"x-dup: 1\r\n"
        b"X-Forwarded-For: 10.0.0.1\r\n"
        b"X-Dup:  2 \r\n"
        b"Content-Length: 5\r\n"
        b"\r\n"
        b"hello"
    )
    echo = conn.read_response().json()
    assert echo["backend"] == "blue"
    assert echo["method"] == "POST"
    assert echo["path"] == "http://example.com/echo?a=1"
    assert echo["version"] == "HTTP/1.1"
    assert echo["headers"] == [
        ["Host", "example.com"],
        ["x-dup", "1"],
        ["X-Forwarded-For", "10.0.0.1"],
        ["X-Dup", "2"],
        ["Content-Length", "5"],
    ]
    assert (echo["body_len"], echo["body_sha256"]) == (5, sha256(b"hello"))
    assert echo["peer"][0] == "127.0.0.1"


def test_echo_reads_a_chunked_body_and_its_trailers(conn: RawClient) -> None:
    pieces = [b"a" * 10, b"b" * 70_000, b"c"]
    body = encode_chunked(pieces, trailers=[("X-Checksum", "abc")])
    conn.send_request("PUT", "/echo", headers=[("Transfer-Encoding", "chunked")], body=body)
    echo = conn.read_response().json()
    assert echo["body_len"] == 70_011
    assert echo["body_sha256"] == sha256(b"".join(pieces))
    assert echo["trailers"] == [["X-Checksum", "abc"]]


# -- connection handling -----------------------------------------------------------------------


def test_keep_alive_and_pipelining_use_one_connection(
    backend: BackendProcess, conn: RawClient
) -> None:
    conn.send(
        b"GET /status/201 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
    )
    assert conn.read_response().status == 201
    assert conn.read_response().json()["body_len"] == 3
    assert conn.request("GET", "/").body == b"hello from blue\n"
    stats = backend.stats()
    assert (stats["connections_total"], stats["connections_open"]) == (1, 1)
    assert stats["requests_total"] == 3


def test_http10_closes_unless_keep_alive_is_asked_for(backend: BackendProcess) -> None:
    with RawClient(backend.host, backend.port) as client:
        response = client.request("GET", "/", version="HTTP/1.0")
        assert (response.status, response.header("Connection")) == (200, "close")
        assert client.read_until_closed() == (b"", "eof")
    with RawClient(backend.host, backend.port) as client:
        for _ in range(2):
            response = client.request(
                "GET", "/echo", headers=[("Connection", "keep-alive")], version="HTTP/1.0"
            )
            assert response.header("Connection") == "keep-alive"
            assert response.json()["version"] == "HTTP/1.0"


@pytest.mark.parametrize(
    ("target", "headers"),
    [("/", [("Connection", "close")]), ("/echo?close=1", [])],
)
def test_connection_close_is_announced_and_honoured(
    conn: RawClient, target: str, headers: list[tuple[str, str]]
) -> None:
    response = conn.request("GET", target, headers=headers)
    assert (response.status, response.header("Connection")) == (200, "close")
    assert conn.read_until_closed() == (b"", "eof")


def test_malformed_request_gets_400_and_close(conn: RawClient) -> None:
    conn.send(b"NONSENSE\r\n\r\n")
    response = conn.read_response()
    assert (response.status, response.header("Connection")) == (400, "close")
    assert conn.read_until_closed() == (b"", "eof")


def test_keepalive_timeout_closes_idle_connections(backend_factory: BackendFactory) -> None:
    backend = backend_factory("idle", keepalive_timeout=0.2)
    with RawClient(backend.host, backend.port) as client:
        assert client.request("GET", "/").status == 200
        assert client.read_until_closed(timeout=5) == (b"", "eof")


# -- statuses, delays, bodies ------------------------------------------------------------------


@pytest.mark.parametrize("code", [200, 302, 404, 500, 502, 503])
def test_status_with_body(conn: RawClient, code: int) -> None:
    response = conn.request("GET", f"/status/{code}")
    assert (response.status, response.body) == (code, f"status {code} from blue\n".encode())


@pytest.mark.parametrize("code", [204, 304])
def test_status_without_body_keeps_the_connection_usable(conn: RawClient, code: int) -> None:
    response = conn.request("GET", f"/status/{code}")
    assert response.status == code
    assert response.header("Content-Length") is None
    assert conn.request("GET", "/").status == 200  # no stray body bytes came first


def test_slow_waits_before_sending_the_head(backend: BackendProcess) -> None:
    started = time.monotonic()
    response = request(backend.url + "/slow?ms=300")
    assert response.status == 200
    assert time.monotonic() - started >= 0.3


@pytest.mark.parametrize(
    ("query", "chunked"),
    [
        ("bytes=0", False),
        ("bytes=1", False),
        ("bytes=200000&chunk=7000&seed=3", False),
        ("bytes=200000&chunk=7000&seed=3&chunked=1", True),
        ("bytes=1000000&chunked=1", True),
    ],
)
def test_stream_sends_the_announced_deterministic_body(
    conn: RawClient, query: str, chunked: bool
) -> None:
    params = dict(item.split("=") for item in query.split("&"))
    size, seed = int(params["bytes"]), int(params.get("seed", 0))
    response = conn.request("GET", f"/stream?{query}")
    assert response.header("X-Body-Sha256") == stream_sha256(size, seed) == sha256(response.body)
    assert len(response.body) == size
    if chunked:
        assert response.header("Transfer-Encoding") == "chunked"
        assert response.header("Content-Length") is None
    else:
        assert response.header("Content-Length") == str(size)


def test_stream_bytes_depend_on_seed_and_size_only() -> None:
    assert stream_body(100_000, seed=1)[:1000] == stream_body(1000, seed=1)
    assert stream_body(1000, seed=1) != stream_body(1000, seed=2)


def test_stream_pause_spreads_the_pieces_over_time(conn: RawClient) -> None:
    conn.send_request("GET", "/stream?bytes=4&chunk=1&chunked=1&pause_ms=200")
    started = time.monotonic()
    head = conn.read_head()
    assert time.monotonic() - started < 0.2  # the head is not held back
    assert conn.read_body(head) == stream_body(4)
    assert time.monotonic() - started >= 0.8  # four pieces, a pause before each


def test_chunked_stream_to_http10_is_close_delimited(conn: RawClient) -> None:
    response = conn.request("GET", "/stream?bytes=5000&chunked=1", version="HTTP/1.0")
    assert response.header("Transfer-Encoding") is None
    assert response.header("Connection") == "close"
    assert response.body == stream_body(5000)


def test_head_test_matches_get_without_the_body(conn: RawClient) -> None:
    get = conn.request("GET", "/head-test")
    head = conn.request("HEAD", "/head-test")
    assert get.body == HEAD_TEST_BODY
    assert head.header("Content-Length") == get.header("Content-Length") == "1000"
    assert head.body == b""
    assert conn.request("GET", "/").status == 200  # HEAD left no body on the wire


@pytest.mark.parametrize(
    "target",
    ["/", "/echo", "/status/404", "/health", "/stream?bytes=5000", "/stream?bytes=5&chunked=1"],
)
def test_head_works_on_every_path(conn: RawClient, target: str) -> None:
    head = conn.request("HEAD", target)
    get = conn.request("GET", target)
    assert head.status == get.status
    assert head.header("X-Backend") == "blue"
    assert head.header("Transfer-Encoding") == get.header("Transfer-Encoding")
    if target != "/echo":  # the echo's body describes the method, so its length differs
        assert head.header("Content-Length") == get.header("Content-Length")
    assert conn.request("GET", "/").status == 200


def test_upload_hashes_a_large_chunked_body(backend: BackendProcess) -> None:
    pieces = [os.urandom(64 * 1024) for _ in range(80)]  # 5 MiB
    client = http.client.HTTPConnection(backend.host, backend.port, timeout=30)
    try:
        client.request("POST", "/upload", body=iter(pieces), encode_chunked=True)
        response = client.getresponse()
        result = response.read()
    finally:
        client.close()
    assert response.status == 200
    assert response.getheader("X-Backend") == "blue"
    assert b'"body_len": 5242880' in result
    assert sha256(b"".join(pieces)).encode() in result


def test_upload_with_content_length(conn: RawClient) -> None:
    body = os.urandom(3_000_001)
    result = conn.request("POST", "/upload", body=body).json()
    assert result == {"backend": "blue", "body_len": len(body), "body_sha256": sha256(body)}


# -- Expect: 100-continue ----------------------------------------------------------------------


def test_continue_sends_100_before_reading_the_body(conn: RawClient) -> None:
    body = b"x" * 100_000
    conn.send_request(
        "POST",
        "/continue",
        headers=[("Expect", "100-continue"), ("Content-Length", str(len(body)))],
    )
    interim = conn.read_head()  # arrives although no body byte has been sent
    assert (interim.status, interim.reason) == (100, "Continue")
    conn.send(body)
    result = conn.read_response().json()
    assert result["continue_sent"] is True
    assert (result["body_len"], result["body_sha256"]) == (len(body), sha256(body))


def test_continue_without_expect_sends_no_interim_response(conn: RawClient) -> None:
    response = conn.request("POST", "/continue", body=b"abc")
    assert response.interim == []
    assert response.json()["continue_sent"] is False


# -- WebSocket ---------------------------------------------------------------------------------


def test_websocket_handshake_and_echo(conn: RawClient) -> None:
    response = conn.websocket_handshake(headers=[("Sec-WebSocket-Protocol", "chat, superchat")])
    assert response.status == 101
    assert response.header("Sec-WebSocket-Accept") == accept_key("dGhlIHNhbXBsZSBub25jZQ==")
    assert response.header("Sec-WebSocket-Accept") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert response.header("Sec-WebSocket-Protocol") == "chat"
    assert response.header("X-Backend") == "blue"

    conn.ws_send(OP_TEXT, b"hello")
    assert conn.ws_recv() == (OP_TEXT, b"hello")
    big = os.urandom(70_000)  # needs the 8-byte length form
    conn.ws_send(OP_BINARY, big)
    assert conn.ws_recv() == (OP_BINARY, big)
    conn.ws_send(OP_PING, b"p")
    assert conn.ws_recv() == (OP_PONG, b"p")
    conn.ws_send(OP_TEXT, b"frag", fin=False)
    conn.ws_send(OP_CONTINUATION, b"mented")
    assert conn.ws_recv() == (OP_TEXT, b"fragmented")
    assert conn.ws_close(1000) == (OP_CLOSE, close_payload(1000))
    assert conn.read_until_closed() == (b"", "eof")


def test_websocket_path_without_upgrade_gets_426(backend: BackendProcess) -> None:
    response = request(backend.url + "/ws")
    assert (response.status, response.header("Upgrade")) == (426, "websocket")


async def test_websocket_echo_with_an_independent_client(backend: BackendProcess) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(backend.url + "/ws") as ws,
    ):
        await ws.send_str("héllo")
        assert await ws.receive_str(timeout=5) == "héllo"
        await ws.send_bytes(b"\x00\x01")
        assert await ws.receive_bytes(timeout=5) == b"\x00\x01"


# -- health and stats control ------------------------------------------------------------------


def test_health_status_can_be_changed_at_runtime(backend: BackendProcess) -> None:
    response = request(backend.url + "/health")
    assert (response.status, response.body) == (200, b"ok\n")
    backend.set_health(500)
    assert request(backend.url + "/health").status == 500
    backend.set_health(200)
    assert request(backend.url + "/health").status == 200
    assert request(backend.url + "/_control/health?status=500").status == 405  # GET changes nothing
    assert request(backend.url + "/health").status == 200


def test_health_can_be_made_to_hang(backend: BackendProcess) -> None:
    backend.set_health(hang=True)
    with RawClient(backend.host, backend.port, timeout=0.3) as client:
        client.send_request("GET", "/health")
        with pytest.raises(TimeoutError):
            client.read_head()
    backend.set_health(hang=False)
    assert request(backend.url + "/health").status == 200


def test_stats_count_requests_ids_and_connections(backend: BackendProcess) -> None:
    for number in range(3):
        request(backend.url + "/echo", headers=[("X-Request-Id", f"id-{number}")])
    request(backend.url + "/health")
    stats = backend.stats()
    assert stats["requests_total"] == 4
    assert stats["requests_by_path"] == {"/echo": 3, "/health": 1}
    assert stats["request_ids"] == ["id-0", "id-1", "id-2"]
    assert stats["connections_total"] == 4
    assert stats["connections_open"] == 0  # control connections are never counted
    assert backend.saw_request_id("id-1")
    assert not backend.saw_request_id("id-9")

    with RawClient(backend.host, backend.port) as idle:
        idle.request("GET", "/")
        assert backend.stats()["connections_open"] == 1
    wait_until(lambda: backend.stats()["connections_open"] == 0, message="connection closed")

    backend.reset_stats()
    stats = backend.stats()
    assert (stats["requests_total"], stats["request_ids"], stats["connections_total"]) == (0, [], 0)


# -- faults ------------------------------------------------------------------------------------


def test_reset_headers_sends_part_of_a_head_then_rst(conn: RawClient) -> None:
    conn.send_request("GET", "/reset-headers")
    assert conn.read_until_closed() == (PARTIAL_HEAD, "reset")


def test_reset_body_sends_fewer_bytes_than_promised_then_rst(conn: RawClient) -> None:
    conn.send_request("GET", "/reset-body?bytes=5000")
    head = conn.read_head()
    assert head.header("Content-Length") == str(5000 + 1_000_000)
    assert conn.read_until_closed() == (stream_body(5000), "reset")


def test_close_after_headers_sends_a_head_then_fin(conn: RawClient) -> None:
    conn.send_request("GET", "/close-after-headers")
    head = conn.read_head()
    assert (head.status, head.header("Content-Length")) == (200, "100")
    assert conn.read_until_closed() == (b"", "eof")


def test_hang_never_answers_but_counts_the_request(backend: BackendProcess) -> None:
    with RawClient(backend.host, backend.port, timeout=0.3) as client:
        client.send_request("GET", "/hang", headers=[("X-Request-Id", "hung")])
        with pytest.raises(TimeoutError):
            client.read_head()
        assert backend.saw_request_id("hung")
        assert backend.stats()["connections_open"] == 1
    wait_until(lambda: backend.stats()["connections_open"] == 0, message="hang ended")


def test_garbage_then_fin(conn: RawClient) -> None:
    conn.send_request("GET", "/garbage")
    assert conn.read_until_closed() == (GARBAGE, "eof")


def test_nolength_body_is_delimited_by_close(conn: RawClient) -> None:
    response = conn.request("GET", "/nolength?bytes=100000&seed=7")
    assert response.header("Content-Length") is None
    assert response.header("Transfer-Encoding") is None
    assert response.header("Connection") == "close"
    assert response.body == stream_body(100_000, 7)
    assert response.header("X-Body-Sha256") == sha256(response.body)


def test_scripted_await_data_answers_once_more_bytes_arrive() -> None:
    """``AWAIT_DATA`` holds the rest of a script until the peer talks again, and what it read
    is the next request."""
    scripted = ScriptedBackend(
        {"/early": [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", AWAIT_DATA, b"late!"]}
    )
    try:
        with RawClient("127.0.0.1", scripted.port, timeout=0.5) as client:
            client.send_request("GET", "/early")
            head = client.read_head()
            assert head.header("Content-Length") == "5"
            with pytest.raises(TimeoutError):
                client.read_exactly(1)  # nothing more until the client sends something
            client.send_request("GET", "/next")
            assert client.read_exactly(5) == b"late!"
            assert client.read_response().header("X-Scripted") == "ok"  # /next, answered
        assert [record.paths for record in scripted.connections] == [["/early", "/next"]]
    finally:
        scripted.close()


def test_accept_then_close_mode(backend_factory: BackendFactory) -> None:
    backend = backend_factory("dead", accept_then_close=True)
    with RawClient(backend.host, backend.port) as client:
        data, _how = client.read_until_closed()  # FIN or, if our request raced it, RST
    assert data == b""


def test_garbage_mode(backend_factory: BackendFactory) -> None:
    backend = backend_factory("junk", garbage=True)
    with RawClient(backend.host, backend.port) as client:
        client.send_request("GET", "/")
        assert client.read_until_closed() == (GARBAGE, "eof")


# -- the process -------------------------------------------------------------------------------


def test_sigterm_stops_promptly_despite_open_connections(backend: BackendProcess) -> None:
    with RawClient(backend.host, backend.port) as idle:
        idle.request("GET", "/")
        started = time.monotonic()
        assert backend.stop(timeout=5) == 0
        assert time.monotonic() - started < 5
        assert idle.read_until_closed() == (b"", "eof")
    assert not backend.running


def test_kill_and_restart_on_the_same_port(backend: BackendProcess) -> None:
    port = backend.port
    backend.kill()
    assert backend.returncode == -9
    backend.restart()
    assert backend.port == port
    assert request(backend.url + "/").body == b"hello from blue\n"


def test_a_backend_that_cannot_start_reports_its_stderr(backend_factory: BackendFactory) -> None:
    with pytest.raises(ProcessFailed, match="unrecognized arguments"):
        backend_factory("bad", no_such_flag=True)
