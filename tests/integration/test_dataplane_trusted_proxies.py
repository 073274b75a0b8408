"""entrypoint.trusted_proxies, seen from the backend and the access log.

One tdproxy trusts 127.0.0.1 (and 10.0.0.0/8, standing for a balancer's hops). Clients connect
from 127.0.0.1 (a trusted proxy) or from 127.0.0.2 (anyone else: Linux answers on all of
127.0.0.0/8), so both sides of the rule run against the same process. The backend's ``/echo``
reports the request as it arrived.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

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

TRUSTED_PEER = "127.0.0.1"
OTHER_PEER = "127.0.0.2"
SPOOFED = [
    ("X-Forwarded-For", "198.51.100.1, 203.0.113.50"),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Host", "shop.example"),
    ("X-Real-IP", "6.6.6.6"),
]


@pytest.fixture(scope="module")
def proxy(blue: BackendProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    config = proxy_config(
        [("blue", blue.url, 1)],
        entrypoint={"trusted_proxies": ["127.0.0.1", "10.0.0.0/8"]},
        access_log={"format": "json"},
    )
    with start_tdproxy(config, tmp_path_factory.mktemp("trusted")) as running:
        yield running


def echo(
    proxy: ProxyProcess, source: str, headers: list[tuple[str, str]], request_id: str
) -> dict[str, str]:
    with RawClient(proxy.host, proxy.port, source=source) as raw:
        response = raw.request("GET", "/echo", headers=[*headers, ("X-Request-Id", request_id)])
    assert response.status == 200, response
    seen: dict[str, str] = {}
    for name, value in response.json()["headers"]:
        if name.lower().startswith("x-") and name.lower() != "x-request-id":
            assert name.lower() not in seen, f"{name} twice"
            seen[name.lower()] = value
    return seen


def logged_remote(proxy: ProxyProcess, request_id: str, target: str = "/echo") -> str:
    """The access log's client address of the request with ``request_id``'s line; the log has
    no request id, so each test sends one request with a target of its own."""

    def find() -> str | None:
        for line in proxy.stdout_text().splitlines():
            entry = json.loads(line)
            if entry["target"] == target:
                return str(entry["remote"])
        return None

    return wait_until(find, message=f"an access-log line for {target}")


def test_a_trusted_peer_keeps_proto_and_host_and_names_the_client(proxy: ProxyProcess) -> None:
    seen = echo(proxy, TRUSTED_PEER, SPOOFED, "trusted-1")
    assert seen == {
        "x-forwarded-for": "198.51.100.1, 203.0.113.50, 127.0.0.1",
        "x-forwarded-proto": "https",
        "x-forwarded-host": "shop.example",
        "x-real-ip": "203.0.113.50",  # right-most untrusted: the left one may be forged
    }


def test_trusted_hops_are_skipped_for_the_real_ip(proxy: ProxyProcess) -> None:
    seen = echo(proxy, TRUSTED_PEER, [("X-Forwarded-For", "203.0.113.60, 10.1.2.3")], "hops")
    assert seen["x-real-ip"] == "203.0.113.60"
    assert seen["x-forwarded-for"] == "203.0.113.60, 10.1.2.3, 127.0.0.1"


def test_a_trusted_peer_without_the_fields_gets_them_set(proxy: ProxyProcess) -> None:
    seen = echo(proxy, TRUSTED_PEER, [], "trusted-2")
    assert seen == {
        "x-forwarded-for": "127.0.0.1",
        "x-forwarded-proto": "http",
        "x-forwarded-host": f"{proxy.host}:{proxy.port}",
        "x-real-ip": "127.0.0.1",
    }


def test_an_untrusted_peer_cannot_spoof_anything(proxy: ProxyProcess) -> None:
    seen = echo(proxy, OTHER_PEER, SPOOFED, "untrusted")
    assert seen == {
        "x-forwarded-for": "198.51.100.1, 203.0.113.50, 127.0.0.2",
        "x-forwarded-proto": "http",
        "x-forwarded-host": f"{proxy.host}:{proxy.port}",
        "x-real-ip": "127.0.0.2",
    }


def test_the_access_log_shows_the_derived_client(proxy: ProxyProcess) -> None:
    for source, target in ((TRUSTED_PEER, "/echo?log=trusted"), (OTHER_PEER, "/echo?log=other")):
        with RawClient(proxy.host, proxy.port, source=source) as raw:
            assert raw.request("GET", target, headers=SPOOFED).status == 200
    assert logged_remote(proxy, "", "/echo?log=trusted") == "203.0.113.50"
    assert logged_remote(proxy, "", "/echo?log=other") == OTHER_PEER


def test_a_reload_applies_to_new_connections(
    blue: BackendProcess, proxy_factory: ProxyFactory
) -> None:
    config = proxy_config([("blue", blue.url, 1)], entrypoint={"trusted_proxies": ["127.0.0.1"]})
    proxy = proxy_factory(config, wait_admin=True)
    with RawClient(proxy.host, proxy.port) as before:
        assert before.request("GET", "/echo", headers=SPOOFED).status == 200
        proxy.write_config(
            proxy_config(
                [("blue", blue.url, 1)],
                entrypoint={
                    "address": proxy.host,
                    "port": proxy.port,
                    "trusted_proxies": ["10.0.0.0/8"],
                },
                admin={"address": proxy.admin_host, "port": proxy.admin_port},
            )
        )
        proxy.wait_for_output("entrypoint.trusted_proxies changed")
        # The connection accepted before the reload keeps the decision made for it...
        kept = before.request("GET", "/echo", headers=SPOOFED).json()["headers"]
        assert ["X-Real-IP", "203.0.113.50"] in kept
    # ...a new one is judged by the new list.
    with RawClient(proxy.host, proxy.port) as after:
        fresh = after.request("GET", "/echo", headers=SPOOFED).json()["headers"]
    assert ["X-Real-IP", "127.0.0.1"] in fresh
    assert ["X-Forwarded-Proto", "http"] in fresh


# -- the redirect port -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redirecting(
    blue: BackendProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ProxyProcess, int]]:
    directory = tmp_path_factory.mktemp("trusted-redirect")
    cert, key = make_self_signed(directory, ("127.0.0.1",))
    redirect_port = free_port()
    config = proxy_config(
        [("blue", blue.url, 1)],
        entrypoint={
            "tls": {"certificate": str(cert), "key": str(key)},
            "redirect_http_port": redirect_port,
            "trusted_proxies": ["127.0.0.1"],
        },
    )
    with start_tdproxy(config, directory) as running:
        # Ready means the entrypoint listens; the redirect port opens right after it.
        wait_for_port(LOCALHOST, redirect_port, alive=lambda: running.running)
        yield running, redirect_port


def redirect_port_request(
    setup: tuple[ProxyProcess, int], source: str, proto: str | None, method: str = "GET"
) -> Any:
    proxy, port = setup
    headers = [("Host", "shop.example"), ("X-Request-Id", "r")]
    if proto is not None:
        headers.append(("X-Forwarded-Proto", proto))
    with RawClient(proxy.host, port, source=source) as raw:
        raw.send(
            f"{method} /echo?q=1 HTTP/1.1\r\n".encode()
            + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers)
            + b"Content-Length: 0\r\n\r\n"
        )
        return raw.read_response(head_request=method == "HEAD")


def test_no_redirect_for_what_a_trusted_proxy_marks_https(
    redirecting: tuple[ProxyProcess, int],
) -> None:
    response = redirect_port_request(redirecting, TRUSTED_PEER, "https")
    assert response.status == 200, response
    headers = response.json()["headers"]
    assert ["X-Forwarded-Proto", "https"] in headers
    assert ["X-Forwarded-Host", "shop.example"] in headers  # set from Host: the proxy sent none
    assert response.json()["path"] == "/echo?q=1"


@pytest.mark.parametrize(
    ("source", "proto", "method", "status"),
    [
        (TRUSTED_PEER, "http", "GET", 301),  # the balancer says the client used plain HTTP
        (TRUSTED_PEER, None, "GET", 301),
        (TRUSTED_PEER, "http", "POST", 308),
        (OTHER_PEER, "https", "GET", 301),  # anyone else cannot talk their way past it
        (OTHER_PEER, "https", "HEAD", 301),
    ],
)
def test_everything_else_is_redirected(
    redirecting: tuple[ProxyProcess, int], source: str, proto: str | None, method: str, status: int
) -> None:
    response = redirect_port_request(redirecting, source, proto, method)
    assert response.status == status, response
    assert response.header("Location") == "https://shop.example/echo?q=1"
    if method == "HEAD":
        assert response.body == b""
    else:
        assert response.body == b"https://shop.example/echo?q=1\n"


def test_the_tls_entrypoint_still_serves(
    redirecting: tuple[ProxyProcess, int], tmp_path: Path
) -> None:
    proxy, _ = redirecting
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with RawClient(proxy.host, proxy.port) as raw:
        raw.sock = context.wrap_socket(raw.sock)
        response = raw.request("GET", "/echo")
    assert response.status == 200
    assert ["X-Forwarded-Proto", "https"] in response.json()["headers"]


def test_with_worker_processes(
    blue: BackendProcess, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    """Each worker serves the entrypoint and the redirect port with the same trust rules, and
    takes a reloaded list for its new connections."""
    cert, key = make_self_signed(tmp_path, ("127.0.0.1",))
    redirect_port = free_port()

    def config(trusted: list[str]) -> dict[str, Any]:
        return proxy_config(
            [("blue", blue.url, 1)],
            workers=2,
            entrypoint={
                "port": port,
                "tls": {"certificate": str(cert), "key": str(key)},
                "redirect_http_port": redirect_port,
                "trusted_proxies": trusted,
            },
            admin={"port": admin_port},
        )

    port, admin_port = free_port(), free_port()
    proxy = proxy_factory(config(["127.0.0.1"]), wait_admin=True)
    setup = (proxy, redirect_port)
    for _ in range(6):
        assert redirect_port_request(setup, TRUSTED_PEER, "https").status == 200
        assert redirect_port_request(setup, OTHER_PEER, "https").status == 301
    proxy.write_config(config(["10.0.0.0/8"]))
    proxy.wait_for_output("entrypoint.trusted_proxies changed")

    def redirected_now() -> bool:
        return all(
            redirect_port_request(setup, TRUSTED_PEER, "https").status == 301 for _ in range(6)
        )

    assert wait_until(redirected_now, message="every worker applies the new list")
