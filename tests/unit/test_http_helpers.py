"""Byte-level HTTP helpers of the data plane: absolute-form targets, status lines, errors."""

from __future__ import annotations

from http import HTTPStatus

import pytest

from tdproxy.dataplane.http import (
    HOP_BY_HOP,
    connection_tokens,
    error_body_length,
    error_response,
    split_absolute_form,
    status_line,
)

# -- split_absolute_form ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "authority", "path"),
    [
        (b"http://example.com/x", b"example.com", b"/x"),
        (b"http://example.com/x/y?q=1&r=2", b"example.com", b"/x/y?q=1&r=2"),
        (b"http://example.com", b"example.com", b"/"),
        (b"http://example.com/", b"example.com", b"/"),
        (b"http://example.com?q=1", b"example.com", b"/?q=1"),
        (b"http://example.com:8080/x", b"example.com:8080", b"/x"),
        (b"https://example.com/secure", b"example.com", b"/secure"),
        (b"HTTP://Example.COM/Path", b"Example.COM", b"/Path"),
        (b"HtTpS://example.com", b"example.com", b"/"),
        (b"http://[::1]:8080/x", b"[::1]:8080", b"/x"),
        (b"http://10.0.0.1/a?b=http://c/d", b"10.0.0.1", b"/a?b=http://c/d"),
        (b"http://example.com/a?next=/b", b"example.com", b"/a?next=/b"),
    ],
)
def test_split_absolute_form(target: bytes, authority: bytes, path: bytes) -> None:
    assert split_absolute_form(target) == (authority, path)


@pytest.mark.parametrize(
    "target",
    [
        b"/x",
        b"/",
        b"*",
        b"example.com:443",  # authority-form (CONNECT)
        b"ftp://example.com/x",
        b"ws://example.com/x",
        b"http:/example.com/x",
        b"http//example.com",
        b"http://",
        b"https://",
        b"http:///x",
        b"http://?q",
        b"http://user@example.com/x",
        b"http://user:pw@example.com/",
        b"",
    ],
)
def test_split_absolute_form_rejects(target: bytes) -> None:
    assert split_absolute_form(target) is None


def test_origin_form_path_is_never_rewritten() -> None:
    assert split_absolute_form(b"/http://example.com/x") is None


# -- status_line -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "line"),
    [
        (200, b"HTTP/1.1 200 OK\r\n"),
        (101, b"HTTP/1.1 101 Switching Protocols\r\n"),
        (404, b"HTTP/1.1 404 Not Found\r\n"),
        (502, b"HTTP/1.1 502 Bad Gateway\r\n"),
    ],
)
def test_status_line_fills_in_known_reasons(code: int, line: bytes) -> None:
    assert status_line(code) == line


@pytest.mark.parametrize("code", [299, 599, 799, 999])
def test_status_line_unknown_code_has_empty_reason(code: int) -> None:
    # RFC 9112 §4: status-line = HTTP-version SP status-code SP [ reason-phrase ]
    assert status_line(code) == b"HTTP/1.1 %d \r\n" % code


def test_status_line_is_cached() -> None:
    assert status_line(201) is status_line(201)


# -- error_response --------------------------------------------------------------------------

OWN_STATUSES = [400, 403, 405, 408, 413, 414, 421, 431, 501, 502, 503, 504]


def split_response(response: bytes) -> tuple[bytes, dict[bytes, bytes], bytes]:
    head, separator, body = response.partition(b"\r\n\r\n")
    assert separator
    status, *lines = head.split(b"\r\n")
    headers: dict[bytes, bytes] = {}
    for line in lines:
        name, colon, value = line.partition(b":")
        assert colon, line
        assert name.lower() not in headers, f"duplicate {name!r}"
        headers[name.lower()] = value.strip()
    return status, headers, body


@pytest.mark.parametrize("code", [*OWN_STATUSES, 500, 429])
@pytest.mark.parametrize("close", [True, False])
def test_error_response_is_well_formed(code: int, close: bool) -> None:
    status, headers, body = split_response(error_response(code, close))
    phrase = HTTPStatus(code).phrase
    assert status == f"HTTP/1.1 {code} {phrase}".encode()
    assert headers[b"content-length"] == str(len(body)).encode()
    assert headers[b"content-type"] == b"text/plain; charset=utf-8"
    assert headers[b"cache-control"] == b"no-store"
    assert body.startswith(f"{code} {phrase}".encode())
    assert body.endswith(b"\n")
    if close:
        assert headers[b"connection"] == b"close"
    else:
        assert b"connection" not in headers
    assert error_body_length(code) == len(body)


def test_error_response_closes_by_default() -> None:
    assert b"\r\nConnection: close\r\n" in error_response(400)
    assert error_response(503) == error_response(503, close=True)


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (400, b"malformed"),
        (413, b"larger than allowed"),
        (414, b"longer than allowed"),
        (431, b"larger than allowed"),
        (502, b"unreachable"),
        (503, b"no backend"),
        (504, b"did not answer"),
    ],
)
def test_error_bodies_say_why(code: int, words: bytes) -> None:
    _, _, body = split_response(error_response(code))
    assert words in body


def test_error_responses_are_precomputed() -> None:
    assert error_response(502) is error_response(502)
    assert error_response(502, close=False) is error_response(502, close=False)


def test_error_response_is_ascii() -> None:
    for code in OWN_STATUSES:
        error_response(code).decode("ascii")


# -- connection_tokens -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "tokens"),
    [
        (b"close", [b"close"]),
        (b"Keep-Alive", [b"keep-alive"]),
        (b"keep-alive, Upgrade", [b"keep-alive", b"upgrade"]),
        (b"  X-Custom ,\tTE  ", [b"x-custom", b"te"]),
        (b"a,,b, ,", [b"a", b"b"]),
        (b"", []),
        (b" , ", []),
    ],
)
def test_connection_tokens(value: bytes, tokens: list[bytes]) -> None:
    assert connection_tokens(value) == tokens


def test_hop_by_hop_set_follows_rfc_9110() -> None:
    assert {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    } == HOP_BY_HOP
    assert all(name == name.lower() for name in HOP_BY_HOP)
