"""Limits and slow clients: ``limits.*`` give 431/414/413 at their exact boundaries, and
``timeouts.client_header``/``client_body`` and ``limits.max_connections`` cut off the clients that
hold resources, without affecting anyone else.

The proxy here runs with small limits and one-second client timeouts so that the boundaries are
cheap to reach. "Nothing reached the backend" is checked as in ``test_hostile_requests``: a
sentinel request goes through after each case, and once the backend has seen it, its request
count must have grown by exactly one.
"""

from __future__ import annotations

import contextlib
import itertools
import select
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.client import IncompleteResponse, RawClient, Response, encode_chunked
from tests.fakes.process import (
    BackendProcess,
    ProxyProcess,
    proxy_config,
    start_backend,
    start_tdproxy,
    wait_until,
)

MAX_HEADER_BYTES = 4096
MAX_HEADERS = 20
MAX_URL_BYTES = 1024
MAX_BODY_BYTES = 100_000
CLIENT_HEADER = 1.0
CLIENT_BODY = 1.0
# Deadlines are set on a coarse clock and checked by a sweeper, both every 0.25 s: a timeout fires
# up to that much early or late.
COARSE = 0.3
SWEEP_SLACK = 1.0


@pytest.fixture(scope="module")
def backend() -> Iterator[BackendProcess]:
    with start_backend("origin") as running:
        yield running


@pytest.fixture(scope="module")
def proxy(
    backend: BackendProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    config = proxy_config(
        [("origin", backend.url, 1)],
        limits={
            "max_header_bytes": MAX_HEADER_BYTES,
            "max_headers": MAX_HEADERS,
            "max_url_bytes": MAX_URL_BYTES,
            "max_body_bytes": MAX_BODY_BYTES,
        },
        timeouts={"client_header": f"{CLIENT_HEADER}s", "client_body": f"{CLIENT_BODY}s"},
    )
    with start_tdproxy(config, tmp_path_factory.mktemp("limits")) as running:
        yield running


# -- helpers ---------------------------------------------------------------------------------

_sequence = itertools.count()


def new_id(prefix: str = "limits") -> str:
    return f"{prefix}-{next(_sequence)}-{uuid.uuid4().hex[:12]}"


class BackendLedger:
    """The backend's request count before a case, and the check that settles it afterwards."""

    def __init__(self, proxy: ProxyProcess, backend: BackendProcess) -> None:
        self.proxy = proxy
        self.backend = backend
        self.before = backend.stats()

    def settle(self) -> dict[str, Any]:
        sentinel = new_id("sentinel")
        assert_serves(self.proxy, sentinel)
        wait_until(
            lambda: self.backend.saw_request_id(sentinel),
            timeout=5,
            message="the backend saw the sentinel request",
        )
        return self.backend.stats()

    def assert_nothing_reached(self, *request_ids: str, others: int = 0) -> None:
        """Only the sentinel (and ``others`` requests the test sent itself) reached it."""
        stats = self.settle()
        assert stats["requests_total"] - self.before["requests_total"] == 1 + others
        for request_id in request_ids:
            assert request_id not in stats["request_ids"]


def assert_serves(proxy: ProxyProcess, request_id: str | None = None) -> None:
    """A normal request on a fresh connection gets its 200."""
    request_id = request_id or new_id("ok")
    with RawClient(proxy.host, proxy.port) as client:
        response = client.request("GET", "/", headers=[("X-Request-Id", request_id)])
    assert response.status == 200
    assert response.header("X-Request-Id") == request_id


def assert_refusal(response: Response, status: int) -> None:
    assert response.status == status, (response.status, response.body)
    assert response.header("X-Backend") is None
    assert "close" in (response.header("Connection") or "").lower()


def head(request_line: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [request_line, *(f"{name}: {value}" for name, value in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def header_section_bytes(headers: list[tuple[str, str]]) -> int:
    """Bytes of the header lines as sent: ``name: value`` plus CRLF, each."""
    return sum(len(name) + len(value) + 4 for name, value in headers)


def refused_with(proxy: ProxyProcess, data: bytes, status: int) -> None:
    """Send ``data``; the proxy answers ``status`` and closes the connection cleanly."""
    with RawClient(proxy.host, proxy.port) as client:
        with contextlib.suppress(OSError):
            client.send(data)
        response = client.read_response()
        assert_refusal(response, status)
        assert client.read_until_closed(timeout=5) == (b"", "eof")


def readable_within(sock: socket.socket, seconds: float) -> bool:
    return bool(select.select([sock], [], [], max(seconds, 0.0))[0])


# -- header section, header count, request-target --------------------------------------------


def padded_headers(request_id: str, total: int) -> list[tuple[str, str]]:
    """Host, the id, and one padding header making the section exactly ``total`` bytes."""
    headers = [("Host", "h"), ("X-Request-Id", request_id)]
    padding = total - header_section_bytes(headers) - len("X-Pad") - 4
    return [*headers, ("X-Pad", "p" * padding)]


def test_header_section_at_the_limit_is_served(
    proxy: ProxyProcess, backend: BackendProcess
) -> None:
    request_id = new_id()
    headers = padded_headers(request_id, MAX_HEADER_BYTES)
    assert header_section_bytes(headers) == MAX_HEADER_BYTES
    with RawClient(proxy.host, proxy.port) as client:
        client.send(head("GET / HTTP/1.1", headers))
        response = client.read_response()
    assert response.status == 200
    assert response.header("X-Request-Id") == request_id


def test_header_section_one_byte_over_the_limit_gets_431(
    proxy: ProxyProcess, backend: BackendProcess
) -> None:
    request_id = new_id()
    ledger = BackendLedger(proxy, backend)
    refused_with(
        proxy, head("GET / HTTP/1.1", padded_headers(request_id, MAX_HEADER_BYTES + 1)), 431
    )
    ledger.assert_nothing_reached(request_id)


def test_many_small_headers_over_the_byte_limit_get_431(
    proxy: ProxyProcess, backend: BackendProcess
) -> None:
    request_id = new_id()
    headers = [("Host", "h"), ("X-Request-Id", request_id)]
    headers += [(f"X-{number}", "v" * 400) for number in range(12)]  # 12 of ~410 bytes
    assert len(headers) <= MAX_HEADERS and header_section_bytes(headers) > MAX_HEADER_BYTES
    ledger = BackendLedger(proxy, backend)
    refused_with(proxy, head("GET / HTTP/1.1", headers), 431)
    ledger.assert_nothing_reached(request_id)


def test_a_huge_header_section_is_cut_off_without_waiting_for_its_end(
    proxy: ProxyProcess, backend: BackendProcess
) -> None:
    # 1 MB of one header value and no blank line: refused while it is still arriving.
    request_id = new_id()
    data = f"GET / HTTP/1.1\r\nHost: h\r\nX-Request-Id: {request_id}\r\nX-Big: ".encode()
    ledger = BackendLedger(proxy, backend)
    with RawClient(proxy.host, proxy.port) as client:
        with contextlib.suppress(OSError):
            client.send(data + b"b" * 1_000_000)
        response = client.read_response()
        assert_refusal(response, 431)
        client.read_until_closed(timeout=5)
    ledger.assert_nothing_reached(request_id)


def test_max_headers_is_served_and_one_more_gets_431(
    proxy: ProxyProcess, backend: BackendProcess
) -> None:
    request_id = new_id()
    headers = [("Host", "h"), ("X-Request-Id", request_id)]
    headers += [(f"X-{number}", "v") for number in range(MAX_HEADERS - len(headers))]
    with RawClient(proxy.host, proxy.port) as client:
        client.send(head("GET / HTTP/1.1", headers))
        assert client.read_response().status == 200

    over_id = new_id()
    headers = [("Host", "h"), ("X-Request-Id", over_id)]
    headers += [(f"X-{number}", "v") for number in range(MAX_HEADERS + 1 - len(headers))]
    ledger = BackendLedger(proxy, backend)
    refused_with(proxy, head("GET / HTTP/1.1", headers), 431)
    ledger.assert_nothing_reached(over_id)


def target_of(length: int) -> str:
    target = "/echo?q="
    return target + "t" * (length - len(target))


def test_target_at_the_limit_is_served_and_one_byte_more_gets_414(
    proxy: ProxyProcess, backend: BackendProcess
) -> None:
    request_id = new_id()
    target = target_of(MAX_URL_BYTES)
    with RawClient(proxy.host, proxy.port) as client:
        response = client.request("GET", target, headers=[("X-Request-Id", request_id)])
    assert response.status == 200
    assert response.json()["path"] == target

    over_id = new_id()
    ledger = BackendLedger(proxy, backend)
    data = head(
        f"GET {target_of(MAX_URL_BYTES + 1)} HTTP/1.1", [("Host", "h"), ("X-Request-Id", over_id)]
    )
    refused_with(proxy, data, 414)
    ledger.assert_nothing_reached(over_id)


def test_a_target_split_over_many_writes_is_still_counted(
    proxy: ProxyProcess, backend: BackendProcess
) -> None:
    ledger = BackendLedger(proxy, backend)
    with RawClient(proxy.host, proxy.port) as client:
        client.send(b"GET /echo?q=")
        for _ in range(MAX_URL_BYTES // 100 + 1):
            try:
                client.send(b"t" * 100)
            except OSError:
                break
            if readable_within(client.sock, 0.01):
                break
        with contextlib.suppress(OSError):
            client.send(b" HTTP/1.1\r\nHost: h\r\n\r\n")
        assert_refusal(client.read_response(), 414)
    ledger.assert_nothing_reached()


# -- request bodies --------------------------------------------------------------------------


def upload_head(request_id: str, framing: tuple[str, str]) -> bytes:
    return head("POST /upload HTTP/1.1", [("Host", "h"), ("X-Request-Id", request_id), framing])


def test_body_at_the_limit_is_served(proxy: ProxyProcess) -> None:
    body = bytes(range(256)) * (MAX_BODY_BYTES // 256) + b"x" * (MAX_BODY_BYTES % 256)
    assert len(body) == MAX_BODY_BYTES
    with RawClient(proxy.host, proxy.port) as client:
        fixed = client.request("POST", "/upload", body=body)
        client.send(upload_head(new_id(), ("Transfer-Encoding", "chunked")))
        client.send(encode_chunked([body[:30_000], body[30_000:]]))
        chunked = client.read_response()
    assert fixed.status == chunked.status == 200
    assert fixed.json()["body_len"] == chunked.json()["body_len"] == MAX_BODY_BYTES


def test_content_length_over_the_limit_gets_413_before_the_body_is_sent(
    proxy: ProxyProcess, backend: BackendProcess
) -> None:
    request_id = new_id()
    ledger = BackendLedger(proxy, backend)
    # Only the head is sent: the refusal must not wait for a body the client may never send.
    refused_with(proxy, upload_head(request_id, ("Content-Length", str(MAX_BODY_BYTES + 1))), 413)
    ledger.assert_nothing_reached(request_id)


def test_chunked_body_over_the_limit_gets_413(proxy: ProxyProcess, backend: BackendProcess) -> None:
    request_id = new_id()
    ledger = BackendLedger(proxy, backend)
    body = encode_chunked([b"c" * 50_000, b"c" * 50_000, b"c"])  # one byte over
    with RawClient(proxy.host, proxy.port) as client:
        client.send(upload_head(request_id, ("Transfer-Encoding", "chunked")) + body)
        assert_refusal(client.read_response(), 413)
        assert client.read_until_closed(timeout=5) == (b"", "eof")
    stats = ledger.settle()
    # The head was streamed upstream before the body grew too large; nothing else was.
    assert stats["requests_total"] - ledger.before["requests_total"] <= 2


def test_a_large_chunked_upload_over_the_limit_is_stopped_early(proxy: ProxyProcess) -> None:
    """The client is still sending megabytes when the 413 comes: it gets the 413 and a closed
    connection, and the proxy does not swallow the rest of the upload first."""
    with RawClient(proxy.host, proxy.port) as client:
        client.send(upload_head(new_id(), ("Transfer-Encoding", "chunked")))
        piece = b"%x\r\n%b\r\n" % (65536, b"u" * 65536)
        sent = 0
        with contextlib.suppress(OSError):  # the proxy closes while we are still sending
            while sent < 64 * 1024 * 1024 and not readable_within(client.sock, 0):
                client.send(piece)
                sent += 65536
        assert sent < 64 * 1024 * 1024, "the proxy read a 64 MB upload over a 100 kB limit"
        assert_refusal(client.read_response(), 413)
        client.read_until_closed(timeout=5)
    assert_serves(proxy)


# -- slow clients ----------------------------------------------------------------------------


def serve_others_until_readable(
    proxy: ProxyProcess, sock: socket.socket, limit: float
) -> tuple[float, int]:
    """Keep a second client busy with normal requests until ``sock`` turns readable (the proxy
    answered or closed it); every one must succeed. Returns the seconds that took and the number
    of requests served meanwhile."""
    start = time.monotonic()
    served = 0
    with RawClient(proxy.host, proxy.port) as other:
        while not readable_within(sock, 0.05):
            assert time.monotonic() - start < limit, f"still open after {limit}s"
            response = other.request("GET", "/", headers=[("X-Request-Id", new_id("other"))])
            assert response.status == 200
            served += 1
    return time.monotonic() - start, served


def test_an_unfinished_head_is_cut_off_after_client_header(
    proxy: ProxyProcess, backend: BackendProcess
) -> None:
    request_id = new_id()
    ledger = BackendLedger(proxy, backend)
    with RawClient(proxy.host, proxy.port) as slow:
        slow.send(f"GET / HTTP/1.1\r\nHost: h\r\nX-Request-Id: {request_id}\r\n".encode())
        waited, served = serve_others_until_readable(
            proxy, slow.sock, CLIENT_HEADER + SWEEP_SLACK + 2
        )
        assert_refusal(slow.read_response(), 408)
        assert slow.read_until_closed(timeout=5) == (b"", "eof")
    assert CLIENT_HEADER - COARSE <= waited <= CLIENT_HEADER + SWEEP_SLACK
    assert served > 0
    ledger.assert_nothing_reached(request_id, others=served)


def test_client_header_is_a_deadline_not_an_inactivity_timer(
    proxy: ProxyProcess, backend: BackendProcess
) -> None:
    """Slowloris: one byte of the head every 100 ms never finishes and is cut off on time."""
    request_id = new_id()
    data = f"GET / HTTP/1.1\r\nHost: h\r\nX-Request-Id: {request_id}\r\nX-Slow: ".encode()
    data += b"s" * 200
    ledger = BackendLedger(proxy, backend)
    with RawClient(proxy.host, proxy.port) as slow:
        start = time.monotonic()
        for byte in data:
            try:
                slow.send(bytes([byte]))
            except OSError:
                break
            if readable_within(slow.sock, 0.1):
                break
        elapsed = time.monotonic() - start
        assert_refusal(slow.read_response(), 408)
        slow.read_until_closed(timeout=5)
    assert elapsed <= CLIENT_HEADER + SWEEP_SLACK, "the trickle kept extending the deadline"
    ledger.assert_nothing_reached(request_id)


def test_an_idle_request_body_is_cut_off_after_client_body(
    proxy: ProxyProcess, backend: BackendProcess
) -> None:
    request_id = new_id()
    with RawClient(proxy.host, proxy.port) as slow:
        slow.send(upload_head(request_id, ("Content-Length", "100")) + b"0123456789")
        waited, served = serve_others_until_readable(
            proxy, slow.sock, CLIENT_BODY + SWEEP_SLACK + 2
        )
        assert_refusal(slow.read_response(), 408)
        slow.read_until_closed(timeout=5)
    assert CLIENT_BODY - COARSE <= waited <= CLIENT_BODY + SWEEP_SLACK
    assert served > 0
    # The head was streamed upstream; the upstream exchange was abandoned, not completed, and
    # the backend connection carrying it was closed rather than reused.
    wait_until(
        lambda: backend.stats()["connections_open"] <= 1,
        timeout=5,
        message="the abandoned upstream connection was closed",
    )
    assert_serves(proxy)


def test_a_body_that_keeps_arriving_is_not_cut_off(proxy: ProxyProcess) -> None:
    """client_body is an idle timeout: a slow but steady upload outlives it."""
    body = b"012345"
    with RawClient(proxy.host, proxy.port) as client:
        client.send(upload_head(new_id(), ("Content-Length", str(len(body)))))
        start = time.monotonic()
        for byte in body:
            assert not readable_within(client.sock, CLIENT_BODY / 4), "cut off while sending"
            client.send(bytes([byte]))
        response = client.read_response()
    assert time.monotonic() - start > CLIENT_BODY
    assert response.status == 200
    assert response.json()["body_len"] == len(body)


# -- connection limit ------------------------------------------------------------------------


def test_connections_over_max_connections_are_cut_off_without_affecting_others(
    backend: BackendProcess, tmp_path: Path
) -> None:
    limit = 4
    config = proxy_config([("origin", backend.url, 1)], limits={"max_connections": limit})
    with start_tdproxy(config, tmp_path) as proxy, contextlib.ExitStack() as stack:
        clients = [stack.enter_context(RawClient(proxy.host, proxy.port)) for _ in range(limit)]
        for client in clients:
            assert client.request("GET", "/").status == 200  # each is open and counted

        for _ in range(3):
            with RawClient(proxy.host, proxy.port) as extra:
                with contextlib.suppress(OSError):
                    extra.send_request("GET", "/")
                with pytest.raises((IncompleteResponse, ConnectionResetError)):
                    extra.read_response()

        for client in clients:  # the ones already in are untouched
            assert client.request("GET", "/").status == 200

        clients.pop().close()  # one leaves: there is room again

        def a_new_connection_is_served() -> bool:
            with RawClient(proxy.host, proxy.port) as late:
                with contextlib.suppress(OSError):
                    late.send_request("GET", "/")
                try:
                    return late.read_response().status == 200
                except (IncompleteResponse, ConnectionResetError):
                    return False

        wait_until(a_new_connection_is_served, timeout=5, message="a new connection is served")
        for client in clients:
            assert client.request("GET", "/").status == 200
