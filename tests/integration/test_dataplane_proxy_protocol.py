"""entrypoint.proxy_protocol with real processes: headers sent over raw sockets.

The address a PROXY header names becomes the client address (X-Forwarded-For, X-Real-IP, the
access log); LOCAL uses the peer's own; an invalid, missing or slow header closes the
connection with no response; a peer outside trusted_proxies may not send one at all; with TLS
the header comes before the handshake. The backend's ``/echo`` reports what it received.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes import proxy_header
from tests.fakes.client import RawClient
from tests.fakes.process import (
    LOCALHOST,
    BackendProcess,
    ProxyFactory,
    ProxyProcess,
    free_port,
    proxy_config,
    start_tdproxy,
    wait_for_port,
    wait_until,
)
from tests.fakes.tls import make_self_signed

HTTP_TIMEOUT = 10.0


@pytest.fixture(scope="module")
def proxy(blue: BackendProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    config = proxy_config(
        [("blue", blue.url, 1)],
        entrypoint={"proxy_protocol": True, "trusted_proxies": ["127.0.0.1"]},
        timeouts={"client_header": "1s"},
        access_log={"format": "json"},
    )
    with start_tdproxy(config, tmp_path_factory.mktemp("proxy-protocol")) as running:
        yield running


def forwarded(response: Any) -> dict[str, str]:
    return {
        name.lower(): value
        for name, value in response.json()["headers"]
        if name.lower() in ("x-forwarded-for", "x-real-ip", "x-forwarded-proto")
    }


def send_with_header(
    proxy: ProxyProcess, header: bytes, *, target: str = "/echo", source: str | None = None
) -> Any:
    with RawClient(proxy.host, proxy.port, source=source) as raw:
        raw.send(header)
        return raw.request("GET", target)


def closed_without_response(raw: RawClient, timeout: float = HTTP_TIMEOUT) -> bool:
    data, _ = raw.read_until_closed(timeout)
    return data == b""


@pytest.mark.parametrize(
    ("header", "client"),
    [
        (proxy_header.v1("203.0.113.7", "127.0.0.1"), "203.0.113.7"),
        (proxy_header.v1("2001:db8::7", "::1"), "2001:db8::7"),
        (proxy_header.v2("203.0.113.8", "127.0.0.1"), "203.0.113.8"),
        (proxy_header.v2("2001:db8::8", "::1"), "2001:db8::8"),
        # TLVs (ALPN, a unique id) are part of the header and skipped.
        (
            proxy_header.v2("203.0.113.9", "127.0.0.1", tlvs=b"\x01\x00\x02h2\x05\x00\x03abc"),
            "203.0.113.9",
        ),
    ],
    ids=["v1-ipv4", "v1-ipv6", "v2-ipv4", "v2-ipv6", "v2-tlvs"],
)
def test_the_header_names_the_client(proxy: ProxyProcess, header: bytes, client: str) -> None:
    response = send_with_header(proxy, header)
    assert response.status == 200, response
    assert forwarded(response) == {
        "x-forwarded-for": client,
        "x-forwarded-proto": "http",
        "x-real-ip": client,
    }


def test_local_and_unknown_use_the_peer(proxy: ProxyProcess) -> None:
    for header in (
        proxy_header.v2_local(),
        proxy_header.v2_local(b"\x00" * 12),
        b"PROXY UNKNOWN\r\n",
    ):
        response = send_with_header(proxy, header)
        assert response.status == 200, (header, response)
        assert forwarded(response)["x-real-ip"] == "127.0.0.1"


def test_keep_alive_requests_share_the_header(proxy: ProxyProcess) -> None:
    with RawClient(proxy.host, proxy.port) as raw:
        raw.send(proxy_header.v2("198.51.100.20", "127.0.0.1"))
        for _ in range(3):
            response = raw.request("GET", "/echo")
            assert forwarded(response)["x-real-ip"] == "198.51.100.20"


def test_the_header_and_the_request_in_one_segment(proxy: ProxyProcess) -> None:
    """What a balancer does: the header and the first request bytes in one send."""
    with RawClient(proxy.host, proxy.port) as raw:
        raw.send(
            proxy_header.v1("198.51.100.21", "127.0.0.1") + b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        response = raw.read_response()
    assert forwarded(response)["x-real-ip"] == "198.51.100.21"


def test_the_header_in_pieces(proxy: ProxyProcess) -> None:
    header = proxy_header.v2("198.51.100.22", "127.0.0.1")
    with RawClient(proxy.host, proxy.port) as raw:
        raw.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for piece in (header[:5], header[5:14], header[14:20], header[20:]):
            raw.send(piece)
            time.sleep(0.05)  # separate segments; the deadline (1 s) is far off
        response = raw.request("GET", "/echo")
    assert forwarded(response)["x-real-ip"] == "198.51.100.22"


def test_the_access_log_shows_the_header_address(proxy: ProxyProcess) -> None:
    send_with_header(proxy, proxy_header.v1("198.51.100.23", "127.0.0.1"), target="/echo?log=pp")

    def remote() -> str | None:
        for line in proxy.stdout_text().splitlines():
            entry = json.loads(line)
            if entry["target"] == "/echo?log=pp":
                return str(entry["remote"])
        return None

    assert wait_until(remote, message="the access-log line") == "198.51.100.23"


@pytest.mark.parametrize(
    "data",
    [
        b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\n",  # no header at all
        b"PROXY TCP4 203.0.113.7 127.0.0.1 51000\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"PROXY TCP4 2001:db8::1 127.0.0.1 51000 80\r\n",  # family mismatch
        b"PROXY TCP4 203.0.113.7 127.0.0.1 51000 80\n",  # LF without CR
        b"PROXY UNKNOWN " + b"x" * 120 + b"\r\n",  # longer than 107 bytes
        proxy_header.V2_SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12),  # UDP
        proxy_header.V2_SIGNATURE + b"\x21\x11\x02\x10" + bytes(528),  # 544 bytes in all
        proxy_header.V2_SIGNATURE + b"\x23\x11\x00\x0c" + bytes(12),  # unknown command
    ],
    ids=["none", "v1-fields", "v1-family", "v1-lf", "v1-long", "v2-udp", "v2-long", "v2-cmd"],
)
def test_an_invalid_header_is_closed_without_a_response(proxy: ProxyProcess, data: bytes) -> None:
    with RawClient(proxy.host, proxy.port) as raw:
        raw.send(data)
        assert closed_without_response(raw)
    assert send_with_header(proxy, proxy_header.v1("203.0.113.7", "127.0.0.1")).status == 200


def test_a_slow_header_is_cut_off_after_client_header(proxy: ProxyProcess) -> None:
    with RawClient(proxy.host, proxy.port) as raw:
        raw.send(b"PROXY TCP4 203.0.")  # and nothing more
        started = time.monotonic()
        assert closed_without_response(raw)
        assert time.monotonic() - started < 5  # client_header is 1 s here
    with RawClient(proxy.host, proxy.port) as idle:
        assert closed_without_response(idle)  # nothing sent at all: the same deadline


def test_an_untrusted_peer_may_not_send_one(proxy: ProxyProcess) -> None:
    with RawClient(proxy.host, proxy.port, source="127.0.0.2") as raw:
        try:
            raw.send(
                proxy_header.v1("203.0.113.7", "127.0.0.1") + b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
            )
        except OSError:
            return  # closed before the bytes went out: refused all the same
        assert closed_without_response(raw)


def test_waiting_headers_count_towards_max_connections(
    blue: BackendProcess, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(
        proxy_config(
            [("blue", blue.url, 1)],
            entrypoint={"proxy_protocol": True},
            limits={"max_connections": 2},
            timeouts={"client_header": "5s"},
        )
    )
    # The readiness probe's connection closes at once; wait until the proxy has let it go.
    holders = []
    try:
        for _ in range(2):
            raw = RawClient(proxy.host, proxy.port)
            raw.send(b"PROXY ")
            holders.append(raw)
        with RawClient(proxy.host, proxy.port) as third:
            third.send(proxy_header.v1("203.0.113.7", "127.0.0.1"))
            assert closed_without_response(third)
    finally:
        for raw in holders:
            raw.close()

    def served() -> bool:
        return send_with_header(proxy, proxy_header.v1("203.0.113.7", "127.0.0.1")).status == 200

    assert wait_until(served, ignore=(OSError,), message="a connection served again")


# -- with TLS ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_proxy(
    blue: BackendProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ProxyProcess, ssl.SSLContext, int]]:
    directory = tmp_path_factory.mktemp("proxy-protocol-tls")
    cert, key = make_self_signed(directory, ("127.0.0.1",))
    trust = ssl.create_default_context(cafile=str(cert))
    redirect_port = free_port()
    config = proxy_config(
        [("blue", blue.url, 1)],
        entrypoint={
            "proxy_protocol": True,
            "tls": {"certificate": str(cert), "key": str(key)},
            "redirect_http_port": redirect_port,
        },
    )
    with start_tdproxy(config, directory) as running:
        # Ready means the entrypoint listens; the redirect port opens right after it.
        wait_for_port(LOCALHOST, redirect_port, alive=lambda: running.running)
        yield running, trust, redirect_port


def test_with_tls_the_header_precedes_the_handshake(
    tls_proxy: tuple[ProxyProcess, ssl.SSLContext, int],
) -> None:
    proxy, trust, _ = tls_proxy
    for header, client in (
        (proxy_header.v1("203.0.113.30", "127.0.0.1"), "203.0.113.30"),
        (proxy_header.v2("2001:db8::30", "::1"), "2001:db8::30"),
        (proxy_header.v2_local(), "127.0.0.1"),
    ):
        with RawClient(proxy.host, proxy.port) as raw:
            raw.send(header)
            raw.sock = trust.wrap_socket(raw.sock, server_hostname="127.0.0.1")
            response = raw.request("GET", "/echo")
        assert response.status == 200
        assert forwarded(response) == {
            "x-forwarded-for": client,
            "x-forwarded-proto": "https",
            "x-real-ip": client,
        }


def test_with_tls_a_handshake_without_a_header_is_closed(
    tls_proxy: tuple[ProxyProcess, ssl.SSLContext, int],
) -> None:
    proxy, trust, _ = tls_proxy
    with (
        socket.create_connection((proxy.host, proxy.port), timeout=HTTP_TIMEOUT) as sock,
        pytest.raises((ssl.SSLError, OSError)),
    ):
        trust.wrap_socket(sock, server_hostname="127.0.0.1")


def test_the_redirect_port_expects_the_header_too(
    tls_proxy: tuple[ProxyProcess, ssl.SSLContext, int],
) -> None:
    proxy, _, redirect_port = tls_proxy
    with RawClient(proxy.host, redirect_port) as raw:
        raw.send(proxy_header.v1("203.0.113.31", "127.0.0.1"))
        response = raw.request("GET", "/x")
    assert response.status == 301
    assert response.header("Location") == f"https://127.0.0.1:{proxy.port}/x"
    with RawClient(proxy.host, redirect_port) as bare:
        bare.send(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        assert closed_without_response(bare)


def test_invalid_entries_stop_the_start(tmp_path: Path, blue: BackendProcess) -> None:
    from tests.fakes.process import run_tdproxy

    config_path = tmp_path / "bad.yaml"
    config_path.write_text(
        json.dumps(
            proxy_config(
                [("blue", blue.url, 1)],
                entrypoint={"proxy_protocol": "maybe", "trusted_proxies": ["10.0.0.0/8", "lb"]},
            )
        )
    )
    result = run_tdproxy("check", "--config", str(config_path))
    assert result.returncode == 2
    assert "entrypoint.proxy_protocol" in result.stdout + result.stderr
    assert (
        "entrypoint.trusted_proxies[1]: 'lb' is not an IP address" in result.stdout + result.stderr
    )


def test_http2_after_the_header_and_the_handshake(
    blue: BackendProcess, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    """PROXY header, then TLS choosing h2 by ALPN: the stream's request names the client."""
    from h2.config import H2Configuration
    from h2.connection import H2Connection
    from h2.events import DataReceived, StreamEnded

    cert, key = make_self_signed(tmp_path, ("127.0.0.1",))
    proxy = proxy_factory(
        proxy_config(
            [("blue", blue.url, 1)],
            entrypoint={
                "proxy_protocol": True,
                "http2": True,
                "tls": {"certificate": str(cert), "key": str(key)},
            },
        )
    )
    context = ssl.create_default_context(cafile=str(cert))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection((proxy.host, proxy.port), timeout=HTTP_TIMEOUT) as raw:
        raw.sendall(proxy_header.v2("203.0.113.40", "127.0.0.1"))
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.selected_alpn_protocol() == "h2"
            h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
            h2.initiate_connection()
            h2.send_headers(
                1,
                [(":method", "GET"), (":scheme", "https"), (":authority", "a"), (":path", "/echo")],
                end_stream=True,
            )
            tls.sendall(h2.data_to_send())
            body = b""
            ended = False
            while not ended:
                data = tls.recv(65536)
                assert data, "closed before the answer"
                for event in h2.receive_data(data):
                    if isinstance(event, DataReceived):
                        body += event.data
                        h2.acknowledge_received_data(len(event.data), event.stream_id)
                    ended = ended or isinstance(event, StreamEnded)
                tls.sendall(h2.data_to_send())
    headers = {name.lower(): value for name, value in json.loads(body)["headers"]}
    assert headers["x-real-ip"] == "203.0.113.40"
    assert headers["x-forwarded-for"] == "203.0.113.40"
    assert headers["x-forwarded-proto"] == "https"


@pytest.mark.parametrize("send_proxy", ["send-proxy", "send-proxy-v2"])
def test_behind_a_real_haproxy(
    blue: BackendProcess, proxy_factory: ProxyFactory, tmp_path: Path, send_proxy: str
) -> None:
    """HAProxy in TCP mode sends the header (v1 or v2); the backend sees the client HAProxy
    accepted (connecting from 127.0.0.2), and HAProxy's own address is the trusted peer."""
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        pytest.skip("haproxy is not installed")
    proxy = proxy_factory(
        proxy_config(
            [("blue", blue.url, 1)],
            entrypoint={"proxy_protocol": True, "trusted_proxies": ["127.0.0.1"]},
        )
    )
    front = free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n"
        "  timeout server 30s\n"
        f"frontend fe\n  bind 127.0.0.1:{front}\n  default_backend be\n"
        f"backend be\n  server td {proxy.host}:{proxy.port} {send_proxy}\n"
    )
    process = subprocess.Popen(
        [haproxy, "-db", "-f", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_port(LOCALHOST, front, alive=lambda: process.poll() is None)
        with RawClient(LOCALHOST, front, source="127.0.0.2") as raw:
            for _ in range(2):
                response = raw.request("GET", "/echo", headers=[("X-Forwarded-For", "6.6.6.6")])
                assert response.status == 200, response
                assert forwarded(response) == {
                    "x-forwarded-for": "6.6.6.6, 127.0.0.2",
                    "x-forwarded-proto": "http",
                    "x-real-ip": "127.0.0.2",
                }
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()


def test_with_worker_processes(blue: BackendProcess, proxy_factory: ProxyFactory) -> None:
    """Every worker listens on the port (SO_REUSEPORT) and takes the header the same way."""
    proxy = proxy_factory(
        proxy_config(
            [("blue", blue.url, 1)],
            workers=2,
            entrypoint={"proxy_protocol": True, "trusted_proxies": ["127.0.0.1"]},
        ),
        wait_admin=True,
    )
    for number in range(12):  # new connections: the kernel spreads them over the workers
        client = f"198.51.100.{100 + number}"
        response = send_with_header(proxy, proxy_header.v2(client, "127.0.0.1"))
        assert response.status == 200, response
        assert forwarded(response)["x-real-ip"] == client
