"""HTTP/2 at the TLS entrypoint, with real processes and real clients.

One tdproxy (TLS, ``http2: true``, sticky routing, JSON access log) in front of two fake backends.
The clients are real HTTP/2 stacks: httpx (the ``h2`` package), curl (nghttp2), h2load (nghttp2)
and headless Chromium; the hostile ones (rapid reset, an HPACK bomb, a reader that never reads)
are raw ``h2`` connections over a TLS socket, so they can break the rules on purpose.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated, DataReceived, Event, StreamEnded, StreamReset

from tests.fakes.browser import Chromium, require_chromium
from tests.fakes.process import (
    LOCALHOST,
    REPO_ROOT,
    BackendProcess,
    ProxyProcess,
    free_port,
    proxy_config,
    start_backend,
    start_tdproxy,
    wait_for_port,
    wait_until,
)
from tests.fakes.tls import make_self_signed

MIB = 1024 * 1024


@dataclass
class H2Setup:
    proxy: ProxyProcess
    backends: list[BackendProcess]
    cert: Path
    trust: ssl.SSLContext


def _tls_config(
    backends: list[BackendProcess], cert: Path, key: Path, **extra: Any
) -> dict[str, Any]:
    return proxy_config(
        [(backend.name, backend.url, 1) for backend in backends],
        entrypoint={"tls": {"certificate": str(cert), "key": str(key)}, "http2": True},
        routing={"method": "sticky"},
        **extra,
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[H2Setup]:
    directory = tmp_path_factory.mktemp("h2")
    cert, key = make_self_signed(directory, (LOCALHOST,))
    backends = [start_backend("blue"), start_backend("green")]
    try:
        config = _tls_config(backends, cert, key)
        with start_tdproxy(config, directory, wait_admin=True) as proxy:
            yield H2Setup(proxy, backends, cert, ssl.create_default_context(cafile=str(cert)))
    finally:
        for backend in backends:
            backend.stop()


def client(setup: H2Setup, **kwargs: Any) -> httpx.Client:
    return httpx.Client(http2=True, verify=setup.trust, timeout=30, **kwargs)


def metric_total(setup: H2Setup, name: str) -> float:
    text = httpx.get(setup.proxy.admin_url + "/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M))


class RawH2:
    """An HTTP/2 connection over a verified TLS socket, driven by hand."""

    def __init__(self, setup: H2Setup, **settings: int) -> None:
        proxy = setup.proxy
        context = ssl.create_default_context(cafile=str(setup.cert))
        context.set_alpn_protocols(["h2"])
        raw = socket.create_connection((proxy.host, proxy.port), timeout=10)
        self.sock = context.wrap_socket(raw, server_hostname=proxy.host)
        assert self.sock.selected_alpn_protocol() == "h2"
        self.h2 = H2Connection(
            H2Configuration(
                client_side=True,
                header_encoding=None,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        self.h2.initiate_connection()
        if settings:
            self.h2.update_settings(settings)  # type: ignore[arg-type]
        self.closed = False
        self.flush()

    def headers(self, path: str, **extra: str) -> list[tuple[bytes, bytes]]:
        fields = [
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":authority", b"127.0.0.1"),
            (b":path", path.encode()),
        ]
        fields.extend((k.encode(), v.encode()) for k, v in extra.items())
        return fields

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.sock.sendall(data)

    def read(self, timeout: float = 10.0) -> list[Event]:
        """One read's events; [] and ``closed`` once the proxy closed the connection."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            data = b""
        if not data:
            self.closed = True
            return []
        events = self.h2.receive_data(data)
        self.flush()
        return events

    def close(self) -> None:
        self.sock.close()


# -- it speaks HTTP/2 ---------------------------------------------------------------------------


def test_alpn_offers_h2_and_http11_still_works(setup: H2Setup) -> None:
    proxy = setup.proxy
    for offered, chosen in ((["h2", "http/1.1"], "h2"), (["http/1.1"], "http/1.1")):
        context = ssl.create_default_context(cafile=str(setup.cert))
        context.set_alpn_protocols(offered)
        with (
            socket.create_connection((proxy.host, proxy.port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname=proxy.host) as tls,
        ):
            assert tls.selected_alpn_protocol() == chosen
    with httpx.Client(verify=setup.trust, timeout=10) as http1:
        answer = http1.get(proxy.url + "/")
        assert answer.http_version == "HTTP/1.1" and answer.status_code == 200


def test_a_request_over_h2_reaches_the_backend_with_the_forwarded_fields(setup: H2Setup) -> None:
    with client(setup) as h2:
        answer = h2.get(setup.proxy.url + "/echo?x=1", headers={"x-request-id": "h2-1"})
    assert answer.http_version == "HTTP/2"
    assert answer.status_code == 200
    seen = json.loads(answer.content)
    headers = {name.lower(): value for name, value in seen["headers"]}
    assert seen["path"] == "/echo?x=1"
    assert headers["host"] == f"{setup.proxy.host}:{setup.proxy.port}"
    assert headers["x-forwarded-proto"] == "https"
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-request-id"] == "h2-1"
    assert "transfer-encoding" not in headers and seen["version"] == "HTTP/1.1"


def test_sticky_placement_works_over_h2(setup: H2Setup) -> None:
    with client(setup) as first:
        answer = first.get(setup.proxy.url + "/")
        cookie = answer.headers["set-cookie"]
        backend = answer.headers["x-backend"]
    assert "Secure" in cookie and cookie.startswith("TDSESSION=")
    token = cookie.split(";")[0]
    for _ in range(12):
        with client(setup) as again:
            seen = again.get(setup.proxy.url + "/", headers={"cookie": token})
        assert seen.headers["x-backend"] == backend
        assert "set-cookie" not in seen.headers


def test_many_concurrent_streams_on_one_connection_are_byte_exact(setup: H2Setup) -> None:
    url = setup.proxy.url

    async def fetch_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(http2=True, verify=setup.trust, timeout=60) as h2:
            return await asyncio.gather(
                *(h2.get(f"{url}/stream?bytes={20000 + i * 997}&seed={i}") for i in range(120))
            )

    answers = asyncio.run(fetch_all())
    for i, answer in enumerate(answers):
        assert answer.http_version == "HTTP/2"
        assert len(answer.content) == 20000 + i * 997
        assert hashlib.sha256(answer.content).hexdigest() == answer.headers["x-body-sha256"]


def test_large_download_and_uploads_are_byte_exact(setup: H2Setup) -> None:
    url = setup.proxy.url
    with client(setup) as h2:
        download = h2.get(f"{url}/stream?bytes={24 * MIB}&seed=7")
        assert len(download.content) == 24 * MIB
        assert hashlib.sha256(download.content).hexdigest() == download.headers["x-body-sha256"]
        body = hashlib.sha256(b"seed").digest() * (16 * MIB // 32)

        def pieces() -> Iterator[bytes]:  # no content-length: chunked towards the backend
            for start in range(0, len(body), 300_000):
                yield body[start : start + 300_000]

        for content in (body, pieces()):
            upload = h2.post(f"{url}/upload", content=content)
            assert upload.status_code == 200
            seen = upload.json()
            assert seen["body_len"] == len(body)
            assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_curl_speaks_h2_to_it(setup: H2Setup, tmp_path: Path) -> None:
    curl = shutil.which("curl")
    assert curl is not None, "curl is needed (Debian package curl)"
    out = tmp_path / "body"
    result = subprocess.run(
        [
            curl,
            "--http2",
            "--silent",
            "--show-error",
            "--cacert",
            str(setup.cert),
            "--output",
            str(out),
            "--write-out",
            "%{http_version} %{http_code}",
            f"{setup.proxy.url}/stream?bytes=300000&seed=3",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "2 200"
    assert out.stat().st_size == 300000


def test_h2load_many_streams_all_succeed_and_are_counted(setup: H2Setup) -> None:
    h2load = shutil.which("h2load")
    if h2load is None:
        pytest.fail("h2load is not installed: run scripts/system-deps (Debian nghttp2-client)")
    before = metric_total(setup, "tdproxy_requests_total")
    result = subprocess.run(
        [h2load, "-n", "3000", "-c", "2", "-m", "50", f"{setup.proxy.url}/"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3000 succeeded, 0 failed, 0 errored" in result.stdout, result.stdout
    assert "status codes: 3000 2xx" in result.stdout, result.stdout
    assert re.search(r"Application protocol: h2", result.stdout), result.stdout
    wait_until(
        lambda: metric_total(setup, "tdproxy_requests_total") - before >= 3000,
        timeout=10,
        message="tdproxy_requests_total counts the h2load requests",
    )


def test_the_access_log_says_http_2(setup: H2Setup) -> None:
    with client(setup) as h2:
        h2.get(setup.proxy.url + "/?marker=h2-access-log")
    line = setup.proxy.wait_for_output("h2-access-log", stream="stdout")
    entry = json.loads(line.splitlines()[-1] if "\n" in line else line)
    assert entry["version"] == "2.0" and entry["status"] == 200


def test_chromium_loads_the_demo_page_over_h2(tmp_path: Path) -> None:
    binary = require_chromium()
    cert, key = make_self_signed(tmp_path, (LOCALHOST,))
    ports = [free_port(), free_port()]
    demos = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tdproxy",
                "demo-backend",
                "--name",
                name,
                "--host",
                LOCALHOST,
                "--port",
                str(port),
            ],
            cwd=REPO_ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, port in zip(("blue", "green"), ports, strict=True)
    ]
    try:
        for port in ports:
            wait_for_port(LOCALHOST, port)
        config = proxy_config(
            [
                (name, f"http://{LOCALHOST}:{port}", 1)
                for name, port in zip(("blue", "green"), ports, strict=True)
            ],
            entrypoint={"tls": {"certificate": str(cert), "key": str(key)}, "http2": True},
        )
        with start_tdproxy(config, tmp_path) as proxy:
            net_log = tmp_path / "net-log.json"
            with Chromium(
                binary,
                tmp_path / "profile",
                proxy.url + "/",
                "--dump-dom",
                "--ignore-certificate-errors",
                f"--log-net-log={net_log}",
            ) as chromium:
                dom = chromium.output()
            assert re.search(r"<h1>(blue|green)</h1>", dom), dom[:500]
            assert '"negotiated_protocol":"h2"' in net_log.read_text(errors="replace")
            assert '"version":"2.0"' in proxy.wait_for_output('"version":"2.0"', stream="stdout")
    finally:
        for demo in demos:
            demo.terminate()
            demo.wait(10)


# -- hostile and unlucky clients ------------------------------------------------------------------


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_client_that_stops_reading_holds_the_backend_back(setup: H2Setup) -> None:
    """A 64 MiB download to a client that reads nothing: tdproxy must not buffer it."""
    raw = RawH2(setup)
    try:
        stream_id = raw.h2.get_next_available_stream_id()
        raw.h2.send_headers(
            stream_id, raw.headers("/stream?bytes=67108864&seed=5"), end_stream=True
        )
        raw.flush()
        rss_before = _rss_kib(setup.proxy.pid)
        received = held = 0
        digest = hashlib.sha256()
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:  # read, but never acknowledge: the window shuts
            with contextlib.suppress(TimeoutError):
                for event in raw.read(timeout=0.5):
                    if isinstance(event, DataReceived):
                        digest.update(event.data or b"")
                        received += len(event.data or b"")
                        held += event.flow_controlled_length or 0
        assert received < 2 * MIB  # the initial windows, not the body
        growth = _rss_kib(setup.proxy.pid) - rss_before
        assert growth < 16 * 1024, f"tdproxy grew by {growth} KiB for a client that reads nothing"
        raw.h2.acknowledge_received_data(held, stream_id)  # now it reads
        raw.flush()
        ended = False
        while not ended and not raw.closed:
            for event in raw.read():
                if isinstance(event, DataReceived):
                    digest.update(event.data or b"")
                    received += len(event.data or b"")
                    raw.h2.acknowledge_received_data(event.flow_controlled_length or 0, stream_id)
                elif isinstance(event, StreamEnded):
                    ended = True
            raw.flush()
        assert ended and received == 64 * MIB
    finally:
        raw.close()


def test_rapid_reset_gets_goaway_and_the_proxy_keeps_serving(setup: H2Setup) -> None:
    raw = RawH2(setup)
    try:
        for _ in range(1000):
            stream_id = raw.h2.get_next_available_stream_id()
            raw.h2.send_headers(stream_id, raw.headers("/slow?ms=200"), end_stream=True)
            raw.h2.reset_stream(stream_id, ErrorCodes.CANCEL)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            raw.flush()  # the proxy may close while we still send
        goaway = None
        while not raw.closed and goaway is None:
            goaway = next((e for e in raw.read() if isinstance(e, ConnectionTerminated)), None)
        assert goaway is not None and goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    finally:
        raw.close()
    with client(setup) as h2:
        assert h2.get(setup.proxy.url + "/").status_code == 200


def test_an_hpack_bomb_is_refused_before_any_backend_sees_it(setup: H2Setup) -> None:
    before = sum(backend.stats()["requests_total"] for backend in setup.backends)
    raw = RawH2(setup)
    try:
        stream_id = raw.h2.get_next_available_stream_id()
        bomb = [(b"x-bomb", b"b" * 4000)] * 200  # 800 KB once inflated, a few KB on the wire
        raw.h2.send_headers(stream_id, raw.headers("/echo") + bomb, end_stream=True)
        raw.flush()
        refused = False
        while not raw.closed and not refused:
            refused = any(isinstance(e, (StreamReset, ConnectionTerminated)) for e in raw.read())
        assert refused or raw.closed
    finally:
        raw.close()
    after = sum(backend.stats()["requests_total"] for backend in setup.backends)
    assert after == before
    with client(setup) as h2:
        assert h2.get(setup.proxy.url + "/").status_code == 200


def test_shutdown_finishes_streams_in_flight(tmp_path: Path) -> None:
    """SIGTERM with a stream in flight: GOAWAY, the stream's answer, exit 0. (curl, whose
    nghttp2 reads on past a GOAWAY as RFC 9113 §6.8 intends; the h2 package as a client stops
    at the GOAWAY.)"""
    curl = shutil.which("curl")
    assert curl is not None, "curl is needed (Debian package curl)"
    cert, key = make_self_signed(tmp_path, (LOCALHOST,))
    backend = start_backend("blue")
    try:
        config = _tls_config([backend], cert, key, timeouts={"shutdown_grace": "10s"})
        with start_tdproxy(config, tmp_path) as proxy:
            slow = subprocess.Popen(
                [
                    curl,
                    "--http2",
                    "--silent",
                    "--cacert",
                    str(cert),
                    "--write-out",
                    "\n%{http_version} %{http_code}",
                    f"{proxy.url}/slow?ms=1500",
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            wait_until(
                lambda: backend.stats()["requests_total"] >= 1,
                timeout=10,
                message="the slow request reached the backend",
            )
            proxy.send_signal(signal.SIGTERM)
            out, _ = slow.communicate(timeout=30)
            assert slow.returncode == 0
            assert out.endswith("\n2 200"), out
            assert proxy.wait(20) == 0
    finally:
        backend.stop()


def test_http2_is_off_unless_configured(tmp_path: Path) -> None:
    cert, key = make_self_signed(tmp_path, (LOCALHOST,))
    backend = start_backend("blue")
    try:
        config = proxy_config(
            [(backend.name, backend.url, 1)],
            entrypoint={"tls": {"certificate": str(cert), "key": str(key)}},
        )
        with start_tdproxy(config, tmp_path) as proxy:
            context = ssl.create_default_context(cafile=str(cert))
            context.set_alpn_protocols(["h2", "http/1.1"])
            with (
                socket.create_connection((proxy.host, proxy.port), timeout=10) as raw,
                context.wrap_socket(raw, server_hostname=proxy.host) as tls,
            ):
                assert tls.selected_alpn_protocol() == "http/1.1"
    finally:
        backend.stop()
