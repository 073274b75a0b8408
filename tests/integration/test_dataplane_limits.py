"""Timeouts and limits: what tdproxy answers itself (400, 408, 413, 414, 431, 502, 504), and the
connections it cuts off (slow heads, idle keep-alive).

Timeouts are short here (a second or less) and every assertion about time is a generous deadline
("closed within a few seconds"), never an exact duration.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.fakes.client import RawClient, Response, encode_chunked, metric
from tests.fakes.process import (
    BackendProcess,
    ProxyProcess,
    proxy_config,
    start_tdproxy,
)

MAX_HEADER_BYTES = 2048
MAX_HEADERS = 20
MAX_URL_BYTES = 256
MAX_BODY_BYTES = 4096
CLIENT_HEADER = 1.0
CLIENT_BODY = 1.0
IDLE = 1.0


@pytest.fixture(scope="module")
def proxy(blue: BackendProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    config = proxy_config(
        [("blue", blue.url, 1)],
        timeouts={
            "connect": "2s",
            "response_header": "500ms",
            "client_header": f"{CLIENT_HEADER}s",
            "client_body": f"{CLIENT_BODY}s",
            "idle": f"{IDLE}s",
        },
        limits={
            "max_header_bytes": MAX_HEADER_BYTES,
            "max_headers": MAX_HEADERS,
            "max_url_bytes": MAX_URL_BYTES,
            "max_body_bytes": MAX_BODY_BYTES,
        },
    )
    with start_tdproxy(config, tmp_path_factory.mktemp("limits")) as running:
        yield running


def assert_generated(response: Response, status: int) -> None:
    """A status tdproxy makes itself: a short plain-text body that names the status."""
    assert response.status == status
    assert (response.header("Content-Type") or "").startswith("text/plain")
    assert response.body.startswith(f"{status} ".encode())
    assert len(response.body) < 200
    assert response.header("X-Backend") is None  # not the backend's answer


def assert_rejected_and_closed(client: RawClient, status: int) -> None:
    response = client.read_response()
    assert_generated(response, status)
    assert response.header("Connection") == "close"
    assert client.read_until_closed(timeout=5)[0] == b""


def assert_serving(proxy: ProxyProcess) -> None:
    with RawClient(proxy.host, proxy.port) as raw:
        assert raw.request("GET", "/").status == 200


# -- backend timeouts and errors ---------------------------------------------------------------


def test_response_header_timeout_gives_504(client: RawClient, proxy: ProxyProcess) -> None:
    started = time.monotonic()
    response = client.request("GET", "/hang")
    assert_generated(response, 504)
    assert time.monotonic() - started < 5  # response_header is 500ms; 5s is the generous bound
    assert_serving(proxy)


def test_a_slow_backend_within_the_timeout_is_fine(client: RawClient) -> None:
    assert client.request("GET", "/slow?ms=100").status == 200


# -- client timeouts ---------------------------------------------------------------------------


def test_a_stalled_request_head_is_cut_off(client: RawClient, proxy: ProxyProcess) -> None:
    client.send(b"GET / HTTP/1.1\r\nHost: x\r\nX-Partial: ")
    data, _ = client.read_until_closed(timeout=CLIENT_HEADER + 5)
    assert data == b"" or data.startswith(b"HTTP/1.1 408 ")
    assert_serving(proxy)


def test_client_header_is_a_deadline_not_an_inactivity_timer(client: RawClient) -> None:
    """A head trickled a byte at a time, never idle for long, is still cut off once the whole
    header section took longer than client_header."""
    client.send(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    client.sock.settimeout(0.1)  # the trickle's pace: a byte every tenth of a second
    deadline = time.monotonic() + CLIENT_HEADER + 5
    while time.monotonic() < deadline:
        try:
            client.sock.sendall(b"a")
            if client.sock.recv(65536) == b"":
                break  # closed by the proxy (after its 408, if it sent one)
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            break
    else:
        pytest.fail("the trickled head was never cut off")


def test_a_head_sent_in_pieces_in_time_is_served(client: RawClient) -> None:
    """A head that completes in time, even in pieces, is served."""
    for piece in (b"GET /echo HTTP/1.1\r\n", b"Host: x\r\n", b"X-A: 1\r\n", b"\r\n"):
        client.send(piece)
    assert client.read_response().status == 200


def test_a_stalled_request_body_is_cut_off(client: RawClient, proxy: ProxyProcess) -> None:
    client.send_request("POST", "/upload", headers=[("Content-Length", "100")])
    client.send(b"only ten b")
    data, _ = client.read_until_closed(timeout=CLIENT_BODY + 5)
    assert data == b"" or data.startswith(b"HTTP/1.1 408 ")
    assert_serving(proxy)


def test_client_body_is_an_inactivity_timer(client: RawClient) -> None:
    """A body that keeps coming, however slowly, is not cut off by client_body: it took longer
    than client_body in all, but was never idle that long."""
    pieces = [b"abc"] * 6
    client.send_request("POST", "/upload", headers=[("Content-Length", str(3 * len(pieces)))])
    for piece in pieces:
        client.send(piece)
        time.sleep(CLIENT_BODY / 3)  # the trickle's pace, not a wait for a condition
    assert client.read_response().json()["body_len"] == 18


def test_idle_keep_alive_connections_are_closed(client: RawClient) -> None:
    assert client.request("GET", "/").status == 200
    data, _ = client.read_until_closed(timeout=IDLE + 5)
    assert data == b""


def test_a_connection_that_never_sends_is_closed(proxy: ProxyProcess) -> None:
    with RawClient(proxy.host, proxy.port) as raw:
        data, _ = raw.read_until_closed(timeout=IDLE + CLIENT_HEADER + 5)
        assert data == b"" or data.startswith(b"HTTP/1.1 408 ")


# -- limits ------------------------------------------------------------------------------------


def test_too_large_header_section_gives_431(client: RawClient, proxy: ProxyProcess) -> None:
    client.send_request("GET", "/", headers=[("X-Big", "b" * (MAX_HEADER_BYTES + 100))])
    assert_rejected_and_closed(client, 431)
    assert_serving(proxy)


def test_too_many_header_fields_gives_431(client: RawClient) -> None:
    client.send_request("GET", "/", headers=[(f"X-N{n}", "v") for n in range(MAX_HEADERS + 5)])
    assert_rejected_and_closed(client, 431)


def test_headers_within_the_limits_pass(client: RawClient) -> None:
    headers = [(f"X-N{n}", "v" * 50) for n in range(MAX_HEADERS - 2)]
    response = client.request("GET", "/echo", headers=headers)
    assert response.status == 200


def test_too_long_url_gives_414(client: RawClient, proxy: ProxyProcess) -> None:
    client.send_request("GET", "/echo?q=" + "u" * MAX_URL_BYTES)
    assert_rejected_and_closed(client, 414)
    assert_serving(proxy)


def test_refusals_are_counted_by_status_without_a_backend(
    proxy: ProxyProcess, blue: BackendProcess
) -> None:
    def counted(code: int) -> float:
        return metric(proxy.admin_url, "tdproxy_unrouted_requests_total", code=str(code))

    before = {code: counted(code) for code in (400, 414, 431)}
    answered_before = metric(proxy.admin_url, "tdproxy_requests_total")
    refusals = [
        (400, b"GET / HTTP/1.1\r\nHost: h\r\nNo-Colon-Here\r\n\r\n"),
        (414, b"GET /" + b"u" * MAX_URL_BYTES + b" HTTP/1.1\r\nHost: h\r\n\r\n"),
        (431, b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"b" * MAX_HEADER_BYTES + b"\r\n\r\n"),
        (400, b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
    ]
    for code, raw_request in refusals:
        with RawClient(proxy.host, proxy.port) as raw:
            raw.send(raw_request)
            assert_rejected_and_closed(raw, code)
    assert counted(400) == before[400] + 2
    assert counted(414) == before[414] + 1
    assert counted(431) == before[431] + 1
    assert metric(proxy.admin_url, "tdproxy_requests_total") == answered_before


def test_a_url_at_the_limit_passes(client: RawClient) -> None:
    target = "/echo?q="
    target += "u" * (MAX_URL_BYTES - len(target))
    response = client.request("GET", target)
    assert response.status == 200
    assert response.json()["path"] == target


def test_too_large_content_length_gives_413_before_the_body(
    client: RawClient, blue: BackendProcess
) -> None:
    blue.reset_stats()
    client.send_request("POST", "/upload", headers=[("Content-Length", str(MAX_BODY_BYTES + 1))])
    # No body sent: the proxy must answer from the head alone.
    assert_rejected_and_closed(client, 413)
    assert blue.stats()["requests_total"] == 0


def test_chunked_body_overflowing_the_limit_gives_413(
    client: RawClient, proxy: ProxyProcess
) -> None:
    pieces = [b"z" * 1000] * (MAX_BODY_BYTES // 1000 + 2)
    client.send_request(
        "POST",
        "/upload",
        headers=[("Transfer-Encoding", "chunked")],
        body=encode_chunked(pieces),
    )
    assert_rejected_and_closed(client, 413)
    assert_serving(proxy)


def test_a_body_at_the_limit_passes(client: RawClient) -> None:
    body = b"k" * MAX_BODY_BYTES
    assert client.request("POST", "/upload", body=body).json()["body_len"] == MAX_BODY_BYTES
    chunked = encode_chunked([body[:1000], body[1000:]])
    response = client.request(
        "POST", "/upload", headers=[("Transfer-Encoding", "chunked")], body=chunked
    )
    assert response.json()["body_len"] == MAX_BODY_BYTES


@pytest.mark.parametrize(
    "raw",
    [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
    ],
    ids=["garbage", "two-hosts", "no-host", "conflicting-lengths"],
)
def test_malformed_requests_get_400_and_close(
    client: RawClient, proxy: ProxyProcess, raw: bytes
) -> None:
    client.send(raw)
    assert_rejected_and_closed(client, 400)
    assert_serving(proxy)
