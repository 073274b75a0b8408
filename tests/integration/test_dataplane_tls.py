"""HTTPS backends: certificate verification on by default, ``tls_verify: false`` as the opt-out,
and SNI sent.

The fake backend speaks plain HTTP only, so these tests run a small TLS server of their own: a
threaded ``http.server`` on a socket wrapped with a self-signed certificate for ``localhost``,
which records the SNI name of every handshake and answers with what it saw.
"""

from __future__ import annotations

import http.server
import json
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.client import RawClient
from tests.fakes.process import ProxyFactory, ProxyProcess, proxy_config
from tests.fakes.tls import CertPaths, make_self_signed, server_context

StartProxy = Callable[..., ProxyProcess]


class TLSBackend:
    """A threaded HTTPS server on 127.0.0.1 that answers every GET with JSON describing it."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.sni_names: list[str | None] = []
        self.requests = 0
        context = server_context(CertPaths(cert, key))
        context.sni_callback = self._on_sni
        backend = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                backend.requests += 1
                body = json.dumps(
                    {
                        "path": self.path,
                        "host": self.headers.get("Host"),
                        "sni": backend.sni_names[-1] if backend.sni_names else None,
                        "tls": isinstance(self.connection, ssl.SSLSocket),
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _on_sni(self, sock: ssl.SSLObject, name: str | None, context: ssl.SSLContext) -> None:
        self.sni_names.append(name)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    # For DNS:localhost only, not for the IP 127.0.0.1.
    return make_self_signed(tmp_path_factory.mktemp("tls"), ("localhost",))


@pytest.fixture(scope="module")
def tls_backend(certificate: CertPaths) -> Iterator[TLSBackend]:
    backend = TLSBackend(*certificate)
    try:
        yield backend
    finally:
        backend.close()


@pytest.fixture
def start_proxy(proxy_factory: ProxyFactory) -> StartProxy:
    """``start_proxy(url, tls_verify=None, env=None)``: a tdproxy with that one backend."""

    def start(
        url: str, tls_verify: bool | None = None, env: dict[str, str] | None = None
    ) -> ProxyProcess:
        backend: dict[str, Any] = {"name": "secure", "url": url, "weight": 1}
        if tls_verify is not None:
            backend["tls_verify"] = tls_verify
        return proxy_factory(proxy_config([backend]), env=env)

    return start


def get(proxy: ProxyProcess, count: int = 1) -> list[tuple[int, bytes]]:
    with RawClient(proxy.host, proxy.port) as client:
        results = []
        for _ in range(count):
            response = client.request("GET", "/hello", headers=[("Host", "shop.example")])
            results.append((response.status, response.body))
        return results


def test_a_self_signed_backend_is_refused_by_default(
    start_proxy: StartProxy, tls_backend: TLSBackend
) -> None:
    tls_backend.requests = 0
    proxy = start_proxy(f"https://localhost:{tls_backend.port}")
    for status, body in get(proxy, 2):
        assert status == 502
        assert body.startswith(b"502 ")
    assert tls_backend.requests == 0  # no request crossed the unverified connection
    assert proxy.running


def test_tls_verify_false_accepts_it_and_sends_sni(
    start_proxy: StartProxy, tls_backend: TLSBackend
) -> None:
    tls_backend.sni_names.clear()
    proxy = start_proxy(f"https://localhost:{tls_backend.port}", tls_verify=False)
    results = get(proxy, 5)
    for status, body in results:
        assert status == 200
        seen = json.loads(body)
        assert seen == {"path": "/hello", "host": "shop.example", "sni": "localhost", "tls": True}
    # The TLS connection is pooled and reused, not redone per request.
    assert 1 <= len(tls_backend.sni_names) <= 2, tls_backend.sni_names
    assert set(tls_backend.sni_names) == {"localhost"}


def test_verification_passes_with_a_trusted_certificate(
    start_proxy: StartProxy, tls_backend: TLSBackend, certificate: tuple[Path, Path]
) -> None:
    """Trusting the certificate (SSL_CERT_FILE for the proxy's process) makes the default,
    verifying configuration work: the refusal above is verification, not a broken client."""
    proxy = start_proxy(
        f"https://localhost:{tls_backend.port}", env={"SSL_CERT_FILE": str(certificate[0])}
    )
    [(status, body)] = get(proxy)
    assert status == 200
    assert json.loads(body)["sni"] == "localhost"


def test_verification_checks_the_host_name(
    start_proxy: StartProxy, tls_backend: TLSBackend, certificate: tuple[Path, Path]
) -> None:
    """A trusted certificate for ``localhost`` does not vouch for ``127.0.0.1``."""
    tls_backend.requests = 0
    proxy = start_proxy(
        f"https://127.0.0.1:{tls_backend.port}", env={"SSL_CERT_FILE": str(certificate[0])}
    )
    [(status, _)] = get(proxy)
    assert status == 502
    assert tls_backend.requests == 0
