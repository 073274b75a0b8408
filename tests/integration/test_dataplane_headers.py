"""DESIGN.md's request handling rules, seen from the backend: hop-by-hop fields removed, the
X-Forwarded-* family, Host per ``host_header``, and absolute-form request targets.

One fake backend sits behind three backend entries that differ only in ``host_header``; the
``X-TD-Backend`` override header picks the entry, so each test says which rule it exercises.
The backend's ``/echo`` reports the request exactly as it arrived.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.fakes.client import RawClient
from tests.fakes.process import (
    BackendProcess,
    ProxyProcess,
    proxy_config,
    start_backend,
    start_tdproxy,
)

OVERRIDE = "X-TD-Backend"
EXPLICIT_HOST = "app.example.com"


@pytest.fixture(scope="module")
def backend() -> Iterator[BackendProcess]:
    with start_backend("blue") as running:
        yield running


@pytest.fixture(scope="module")
def proxy(
    backend: BackendProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    # "localhost" (not the 127.0.0.1 the proxy connects to) shows that `backend` sends the url's
    # authority as written, not the address it resolved to.
    written = f"http://localhost:{backend.port}"
    config = proxy_config(
        [
            {"name": "preserve", "url": backend.url, "weight": 1},
            {"name": "as-url", "url": written, "weight": 0, "host_header": "backend"},
            {"name": "explicit", "url": backend.url, "weight": 0, "host_header": EXPLICIT_HOST},
        ],
        routing={"override_header": OVERRIDE},
    )
    with start_tdproxy(config, tmp_path_factory.mktemp("headers")) as running:
        yield running


def echo(
    client: RawClient,
    headers: list[tuple[str, str]],
    *,
    target: str = "/echo",
    entry: str = "preserve",
    method: str = "GET",
    body: bytes | None = None,
) -> dict[str, Any]:
    response = client.request(method, target, headers=[*headers, (OVERRIDE, entry)], body=body)
    assert response.status == 200, response
    result: dict[str, Any] = response.json()
    return result


def values(result: dict[str, Any], name: str) -> list[str]:
    lowered = name.lower()
    return [value for key, value in result["headers"] if key.lower() == lowered]


def names(result: dict[str, Any]) -> set[str]:
    return {key.lower() for key, _ in result["headers"]}


# -- hop-by-hop --------------------------------------------------------------------------------


def test_hop_by_hop_request_fields_are_removed(client: RawClient) -> None:
    result = echo(
        client,
        [
            ("Connection", "keep-alive, X-Hop-One"),
            ("Connection", "x-hop-two"),
            ("X-Hop-One", "1"),
            ("X-Hop-Two", "2"),
            ("Keep-Alive", "timeout=5, max=100"),
            ("Proxy-Connection", "keep-alive"),
            ("TE", "trailers"),
            ("Trailer", "X-Checksum"),
            ("X-End-To-End", "kept"),
        ],
    )
    seen = names(result)
    for hop in (
        "connection",
        "x-hop-one",
        "x-hop-two",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
    ):
        assert hop not in seen, (hop, result["headers"])
    assert values(result, "X-End-To-End") == ["kept"]


def test_upgrade_without_a_websocket_is_removed(client: RawClient) -> None:
    result = echo(client, [("Upgrade", "foo/2")])
    assert "upgrade" not in names(result)


def test_transfer_encoding_is_reframed(client: RawClient) -> None:
    """The client's chunked body reaches the backend chunked, under tdproxy's own single
    Transfer-Encoding field, and intact."""
    body = b"4\r\nwiki\r\n5\r\npedia\r\n0\r\n\r\n"
    result = echo(client, [("Transfer-Encoding", "chunked")], method="POST", body=body)
    assert values(result, "Transfer-Encoding") == ["chunked"]
    assert "content-length" not in names(result)
    assert result["body_len"] == len(b"wikipedia")


def test_hop_by_hop_response_fields_are_removed(client: RawClient) -> None:
    """The backend's ``Connection: close`` (it closes after /echo?close=1) is not passed on."""
    response = client.request("GET", "/echo?close=1", headers=[(OVERRIDE, "preserve")])
    assert response.status == 200
    assert response.header("Connection") is None
    assert response.header("X-Backend") == "blue"  # end-to-end response fields are kept


# -- X-Forwarded-* -----------------------------------------------------------------------------


def test_forwarded_fields_are_set(client: RawClient) -> None:
    result = echo(client, [])
    assert values(result, "X-Forwarded-For") == ["127.0.0.1"]
    assert values(result, "X-Forwarded-Proto") == ["http"]
    assert values(result, "X-Forwarded-Host") == [client.authority]
    assert values(result, "X-Real-IP") == ["127.0.0.1"]


def test_x_forwarded_for_is_appended_to(client: RawClient) -> None:
    result = echo(client, [("X-Forwarded-For", "203.0.113.7")])
    assert values(result, "X-Forwarded-For") == ["203.0.113.7, 127.0.0.1"]


def test_several_x_forwarded_for_fields_are_merged_in_order(client: RawClient) -> None:
    result = echo(
        client, [("X-Forwarded-For", "203.0.113.7, 10.0.0.1"), ("X-Forwarded-For", "10.0.0.2")]
    )
    assert values(result, "X-Forwarded-For") == ["203.0.113.7, 10.0.0.1, 10.0.0.2, 127.0.0.1"]


def test_client_supplied_forwarded_fields_are_replaced(client: RawClient) -> None:
    result = echo(
        client,
        [
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "evil.example"),
            ("X-Real-IP", "198.51.100.1"),
            ("x-real-ip", "198.51.100.2"),
        ],
    )
    assert values(result, "X-Forwarded-Proto") == ["http"]
    assert values(result, "X-Forwarded-Host") == [client.authority]
    assert values(result, "X-Real-IP") == ["127.0.0.1"]


# -- Host --------------------------------------------------------------------------------------


def test_host_preserve_sends_the_clients_host(client: RawClient) -> None:
    result = echo(client, [("Host", "shop.example.org")], entry="preserve")
    assert values(result, "Host") == ["shop.example.org"]
    assert values(result, "X-Forwarded-Host") == ["shop.example.org"]


def test_host_backend_sends_the_url_authority_as_written(
    client: RawClient, backend: BackendProcess
) -> None:
    result = echo(client, [("Host", "shop.example.org")], entry="as-url")
    assert values(result, "Host") == [f"localhost:{backend.port}"]
    # The original host is still told, in X-Forwarded-Host.
    assert values(result, "X-Forwarded-Host") == ["shop.example.org"]


def test_host_explicit_is_sent_literally(client: RawClient) -> None:
    result = echo(client, [("Host", "shop.example.org")], entry="explicit")
    assert values(result, "Host") == [EXPLICIT_HOST]
    assert values(result, "X-Forwarded-Host") == ["shop.example.org"]


# -- request targets ---------------------------------------------------------------------------


def test_absolute_form_target_replaces_host_and_is_sent_in_origin_form(
    client: RawClient,
) -> None:
    result = echo(
        client,
        [("Host", "ignored.example")],
        target="http://abs.example:8443/echo?q=1&r=two",
    )
    assert result["path"] == "/echo?q=1&r=two"
    assert values(result, "Host") == ["abs.example:8443"]
    assert values(result, "X-Forwarded-Host") == ["abs.example:8443"]


def test_absolute_form_without_a_path(client: RawClient) -> None:
    response = client.request(
        "GET", "http://abs.example", headers=[("Host", "abs.example"), (OVERRIDE, "preserve")]
    )
    assert response.status == 200
    assert response.body == b"hello from blue\n"


def test_origin_form_target_is_forwarded_byte_for_byte(client: RawClient) -> None:
    target = "/echo?a=%20b&c=d%2Fe&path=../../etc&empty="
    result = echo(client, [], target=target)
    assert result["path"] == target


def test_the_request_line_is_http11_to_the_backend_and_the_method_kept(
    client: RawClient,
) -> None:
    result = echo(client, [], method="DELETE")
    assert (result["method"], result["version"]) == ("DELETE", "HTTP/1.1")
