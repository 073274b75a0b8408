"""Responses the fake backend cannot be told to send: hop-by-hop response fields, 1xx other
than 100, a 101 nobody asked for, HTTP/1.0 close-delimited answers, ambiguous framing, and a
backend that answers before it has read the request body.

A scripted backend (``tests.fakes.scripted``) answers each request path with canned bytes.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import pytest

from tests.fakes.client import RawClient
from tests.fakes.process import ProxyProcess, proxy_config, start_tdproxy
from tests.fakes.scripted import LINGER, ScriptedBackend, Step

RESPONSES: dict[str, bytes] = {
    # A complete answer, then the start of another in the same write: the tail must never reach
    # whoever uses the connection next.
    "/spliced": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
        b"HTTP/1.1 200 OK\r\nSet-Cookie: planted=1\r\nX-Swallow: "
    ),
    # A transfer coding tdproxy does not decode: forwarding it as plain chunked would corrupt it.
    "/gzip-te": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    ),
    "/hop": (
        b"HTTP/1.1 200 OK\r\n"
        b"Connection: X-Secret, keep-alive\r\n"
        b"X-Secret: do-not-forward\r\n"
        b"Keep-Alive: timeout=5, max=100\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"Trailer: X-Checksum\r\n"
        b"Upgrade: h2c\r\n"
        b"X-End: kept\r\n"
        b"Set-Cookie: a=1\r\n"
        b"Set-Cookie: b=2\r\n"
        b"Content-Length: 2\r\n"
        b"\r\n"
        b"ok"
    ),
    "/early-hints": (
        b"HTTP/1.1 103 Early Hints\r\n"
        b"Link: </style.css>; rel=preload\r\n"
        b"\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal"
    ),
    "/unasked-101": (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: foo\r\nConnection: Upgrade\r\n\r\n"
    ),
    "/http10": b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end",
    "/cl-and-te": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
    ),
    "/two-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello!!",
    "/early": b"HTTP/1.1 403 Forbidden\r\nContent-Length: 7\r\nConnection: close\r\n\r\ndenied\n",
}


# These end with a lingering close (the others leave the connection open).
CLOSING = {"/http10", "/cl-and-te", "/early"}
SCRIPTS: dict[str, list[Step]] = {
    path: [data, LINGER] if path in CLOSING else [data] for path, data in RESPONSES.items()
}


@pytest.fixture(scope="module")
def scripted() -> Iterator[ScriptedBackend]:
    backend = ScriptedBackend(SCRIPTS)
    try:
        yield backend
    finally:
        backend.close()


@pytest.fixture(scope="module")
def proxy(
    scripted: ScriptedBackend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    config = proxy_config([("scripted", scripted.url(), 1)], timeouts={"response_header": "5s"})
    with start_tdproxy(config, tmp_path_factory.mktemp("responses")) as running:
        yield running


def test_hop_by_hop_response_fields_are_removed(client: RawClient) -> None:
    response = client.request("GET", "/hop")
    assert response.status == 200
    assert response.body == b"ok"
    names = {name.lower() for name, _ in response.headers}
    for hop in ("x-secret", "keep-alive", "proxy-connection", "trailer", "upgrade"):
        assert hop not in names, (hop, response.headers)
    assert response.header_values("Connection") in ([], ["keep-alive"])
    assert response.header("X-End") == "kept"
    assert response.header_values("Set-Cookie") == ["a=1", "b=2"]  # repeated fields, in order
    assert client.request("GET", "/hop").status == 200  # the connection goes on


def test_other_1xx_responses_are_forwarded(client: RawClient) -> None:
    response = client.request("GET", "/early-hints")
    assert [interim.status for interim in response.interim] == [103]
    assert response.interim[0].header("Link") == "</style.css>; rel=preload"
    assert (response.status, response.body) == (200, b"final")


def test_http10_client_gets_no_other_1xx_either(client: RawClient) -> None:
    response = client.request(
        "GET", "/early-hints", headers=[("Connection", "keep-alive")], version="HTTP/1.0"
    )
    assert response.interim == []
    assert (response.status, response.body) == (200, b"final")


def test_an_unrequested_101_is_a_broken_response(client: RawClient, proxy: ProxyProcess) -> None:
    response = client.request("GET", "/unasked-101")
    assert response.status == 502
    with RawClient(proxy.host, proxy.port) as other:
        assert other.request("GET", "/hop").status == 200


def test_http10_close_delimited_backend_answer_is_rechunked(client: RawClient) -> None:
    response = client.request("GET", "/http10")
    assert response.status == 200
    assert response.header("Transfer-Encoding") == "chunked"
    assert response.body == b"until the end"
    assert client.request("GET", "/hop").body == b"ok"


def test_content_length_and_chunked_together_are_never_both_forwarded(
    client: RawClient,
) -> None:
    """RFC 9112 §6.3: Transfer-Encoding overrides Content-Length (or the response is refused);
    passing both on would let the client frame the body differently from the proxy."""
    response = client.request("GET", "/cl-and-te")
    if response.status == 200:
        assert response.header("Content-Length") is None
        assert response.body == b"hello"
    else:
        assert response.status == 502


def test_conflicting_content_lengths_are_refused(client: RawClient) -> None:
    assert client.request("GET", "/two-lengths").status == 502


def test_an_answer_before_the_request_body_reaches_the_client(proxy: ProxyProcess) -> None:
    """The backend refuses an upload after reading only its head; the client, still sending,
    must get the 403 (and then the connection ends, since the request was never finished)."""
    with RawClient(proxy.host, proxy.port) as raw:
        size = 64 * 1024 * 1024
        raw.send_request("POST", "/early", headers=[("Content-Length", str(size))])
        stop = threading.Event()

        def keep_sending() -> None:
            piece = b"u" * 65536
            with contextlib.suppress(OSError):
                for _ in range(size // len(piece)):
                    if stop.is_set():
                        return
                    raw.sock.sendall(piece)

        sender = threading.Thread(target=keep_sending, daemon=True)
        sender.start()
        try:
            response = raw.read_response()
        finally:
            stop.set()
            sender.join(timeout=10)
        assert (response.status, response.body) == (403, b"denied\n")


def test_bytes_after_a_complete_answer_never_reach_the_next_client(proxy: ProxyProcess) -> None:
    with RawClient(proxy.host, proxy.port) as first:
        response = first.request("GET", "/spliced")
        assert (response.status, response.body) == (200, b"hi")
    for _ in range(3):  # other clients, on connections tdproxy may pool
        with RawClient(proxy.host, proxy.port) as other:
            response = other.request("GET", "/hop")
            assert response.status == 200
            assert "planted=1" not in response.header_values("Set-Cookie"), response.headers
            assert response.header("X-Swallow") is None


def test_a_transfer_coding_other_than_chunked_is_a_broken_response(client: RawClient) -> None:
    response = client.request("GET", "/gzip-te")
    assert response.status == 502
