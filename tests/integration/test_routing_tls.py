"""TLS at the entrypoint, and the plain-HTTP port that redirects to it.

issue 3: ``entrypoint.tls.certificate``/``key`` terminate HTTPS for the custom domain; the sticky
cookie then carries ``Secure``; ``entrypoint.redirect_http_port`` answers every plain-HTTP request
with a redirect to the same target on the HTTPS entrypoint (README: 301 for GET/HEAD, 308 for
other methods, which keeps the method and body).

The certificate is a throwaway self-signed one for 127.0.0.1 (``tests.fakes.tls``); clients
verify it against itself as the only trusted CA.
"""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from tests.fakes import client
from tests.fakes.client import RawClient
from tests.fakes.process import (
    BackendProcess,
    ProxyProcess,
    free_port,
    proxy_config,
    start_backend,
    start_tdproxy,
)
from tests.fakes.tls import make_self_signed

HOST = "127.0.0.1"


@dataclass
class TlsSetup:
    proxy: ProxyProcess
    redirect_port: int
    trust: ssl.SSLContext


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsSetup]:
    """One sticky tdproxy with a TLS entrypoint and a redirect port, over blue and green."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = make_self_signed(directory, (HOST,))
    trust = ssl.create_default_context(cafile=str(cert))
    backends: list[BackendProcess] = []
    try:
        for name in ("blue", "green"):
            backends.append(start_backend(name))
        redirect_port = free_port()
        config = proxy_config(
            [(backend.name, backend.url, 1) for backend in backends],
            entrypoint={
                "tls": {"certificate": str(cert), "key": str(key)},
                "redirect_http_port": redirect_port,
            },
            routing={"method": "sticky"},
        )
        with start_tdproxy(config, directory, wait_admin=True) as proxy:
            yield TlsSetup(proxy, redirect_port, trust)
    finally:
        for backend in backends:
            backend.stop()


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def header_values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


def https(
    setup: TlsSetup,
    path: str = "/",
    method: str = "GET",
    headers: Sequence[tuple[str, str]] = (),
    body: bytes | None = None,
) -> Answer:
    """One request over a fresh, verified TLS connection to the entrypoint."""
    proxy = setup.proxy
    connection = http.client.HTTPSConnection(
        proxy.host, proxy.port, context=setup.trust, timeout=10
    )
    try:
        connection.request(method, path, body=body, headers=dict(headers))
        response = connection.getresponse()
        return Answer(response.status, response.getheaders(), response.read())
    finally:
        connection.close()


# ---------------------------------------------------------------------------------------------
# HTTPS


def test_https_requests_are_served(tls: TlsSetup) -> None:
    assert tls.proxy.url.startswith("https://")
    seen = set()
    for _ in range(4):
        answer = https(tls)
        assert answer.status == 200, answer
        seen.add(answer.header("X-Backend"))
        assert answer.body == f"hello from {answer.header('X-Backend')}\n".encode()
    assert seen == {"blue", "green"}


def test_backends_are_told_the_request_came_over_https(tls: TlsSetup) -> None:
    answer = https(tls, "/echo")
    assert answer.status == 200
    echoed: dict[str, Any] = json.loads(answer.body)
    headers = {name.lower(): value for name, value in echoed["headers"]}
    assert headers.get("x-forwarded-proto") == "https", headers


def test_https_post_with_a_body(tls: TlsSetup) -> None:
    body = b"0123456789abcdef" * 4096
    answer = https(tls, "/upload", "POST", body=body)
    assert answer.status == 200
    assert json.loads(answer.body)["body_len"] == len(body)


def test_sticky_cookie_is_secure_over_https(tls: TlsSetup) -> None:
    answer = https(tls)
    cookies = [v for v in answer.header_values("Set-Cookie") if v.startswith("TDSESSION=")]
    assert len(cookies) == 1, answer.headers
    attributes = {part.strip().split("=", 1)[0].lower() for part in cookies[0].split(";")[1:]}
    assert attributes == {"path", "httponly", "samesite", "secure"}, cookies[0]
    # And the cookie pins over TLS as it does in plain HTTP.
    pin = cookies[0].split(";", 1)[0]
    for _ in range(6):
        assert https(tls, headers=[("Cookie", pin)]).header("X-Backend") == answer.header(
            "X-Backend"
        )


def test_plain_http_to_the_tls_port_gets_no_response(tls: TlsSetup) -> None:
    with RawClient(tls.proxy.host, tls.proxy.port, timeout=5) as connection:
        connection.send_request("GET", "/")
        data, _ = connection.read_until_closed(timeout=5)
    assert not data.startswith(b"HTTP/1.1 200"), data[:100]


# ---------------------------------------------------------------------------------------------
# The redirect port


@pytest.mark.parametrize(
    ("method", "status"),
    [("GET", 301), ("HEAD", 301), ("POST", 308), ("PUT", 308), ("DELETE", 308)],
)
def test_redirect_port_sends_clients_to_https(tls: TlsSetup, method: str, status: int) -> None:
    target = "/some/page?q=1&r=two"
    response = client.request(
        f"http://{HOST}:{tls.redirect_port}{target}",
        method,
        body=b"form=data" if method in ("POST", "PUT") else None,
    )
    assert response.status == status, (response.status, response.text)
    assert response.header("Location") == f"https://{HOST}:{tls.proxy.port}{target}"


@pytest.mark.parametrize(
    ("host", "location"),
    [
        # No port (or :80): the client came in on the default port, so it goes to 443, also
        # when tdproxy itself listens elsewhere behind a port mapping.
        ("www.example.com", "https://www.example.com/p?q=1"),
        ("www.example.com:80", "https://www.example.com/p?q=1"),
        ("[2001:db8::1]", "https://[2001:db8::1]/p?q=1"),
        # Another port: tdproxy's ports are reached as they are, so the entrypoint's own.
        ("www.example.com:8080", "https://www.example.com:{port}/p?q=1"),
        ("[2001:db8::1]:8080", "https://[2001:db8::1]:{port}/p?q=1"),
    ],
)
def test_the_redirect_port_follows_the_port_the_client_used(
    tls: TlsSetup, host: str, location: str
) -> None:
    with RawClient(HOST, tls.redirect_port) as raw:
        response = raw.request("GET", "/p?q=1", headers=[("Host", host)])
    assert response.status == 301
    assert response.header("Location") == location.format(port=tls.proxy.port)


def test_the_redirect_leads_to_a_working_https_page(tls: TlsSetup) -> None:
    response = client.request(f"http://{HOST}:{tls.redirect_port}/echo?from=redirect")
    location = response.header("Location")
    assert location is not None and location.startswith("https://")
    path = location.split(str(tls.proxy.port), 1)[1]
    answer = https(tls, path)
    assert answer.status == 200
    assert json.loads(answer.body)["path"] == "/echo?from=redirect"
