"""Hostile and malformed requests (RFC 9112 strictness): each is refused with the documented
status, the connection is closed cleanly, and nothing of it reaches the backend.

How "nothing reached the backend" is observed: every case carries a unique ``X-Request-Id`` that
the fake backend records as soon as it has read a request head. After each case a sentinel
request goes through the proxy, and the check waits until the backend has seen the sentinel. The
proxy sends a request head upstream before it answers anything about that request, so whatever
the case had sent upstream was already on its way when the refusal reached the client; once the
sentinel has arrived, the backend's request count must have grown by exactly one (the sentinel).

Errors in a request *body* are found only after the head has been streamed upstream (tdproxy does
not buffer bodies), so for those the checks are that the client gets its 400, the connection
closes cleanly, and the backend never sees anything beyond that one request's head; when the
bad chunk comes in the same read as the head, nothing at all reaches the backend.

The request-smuggling classics (CL.TE, TE.CL, TE.TE and friends) are each sent as one byte
stream with a complete second request (``/smuggled``) hidden where a confused parser would find
it: the backend must see at most the one front request and never ``/smuggled``.
"""

from __future__ import annotations

import contextlib
import itertools
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.fakes.client import ClosedBy, IncompleteResponse, RawClient, Response
from tests.fakes.process import (
    BackendProcess,
    ProxyProcess,
    proxy_config,
    start_backend,
    start_tdproxy,
    wait_until,
)

RID = b"@RID@"  # replaced by a unique request id in every case
# The hidden request has no Host: tdproxy refuses that (400) when it parses the request itself,
# the fake backend accepts it. So it can only reach the backend as bytes tdproxy did not parse
# as a request of its own: the desync that smuggling is.
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nX-Request-Id: smuggled\r\n\r\n"


@pytest.fixture(scope="module")
def backend() -> Iterator[BackendProcess]:
    with start_backend("origin") as running:
        yield running


@pytest.fixture(scope="module")
def proxy(
    backend: BackendProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    config = proxy_config([("origin", backend.url, 1)])
    with start_tdproxy(config, tmp_path_factory.mktemp("hostile")) as running:
        yield running


# -- helpers ---------------------------------------------------------------------------------

_sequence = itertools.count()


def new_id(prefix: str = "hostile") -> str:
    return f"{prefix}-{next(_sequence)}-{uuid.uuid4().hex[:12]}"


@dataclass
class Outcome:
    """What the client saw: the first response (if one arrived whole), the bytes after it, and
    how the proxy closed the connection."""

    response: Response | None
    trailing: bytes
    closed_by: ClosedBy
    send_error: OSError | None


def send_and_read(proxy: ProxyProcess, data: bytes, timeout: float = 5.0) -> Outcome:
    """Send ``data`` in one write and read one response, then everything until the close."""
    with RawClient(proxy.host, proxy.port, timeout=timeout) as client:
        send_error = None
        try:
            client.send(data)
        except OSError as exc:  # the proxy may refuse and close before reading all of it
            send_error = exc
        try:
            response: Response | None = client.read_response()
        except (IncompleteResponse, ConnectionResetError):
            response = None
        if response is not None and response.header("X-Backend") is not None:
            pytest.fail(
                f"forwarded: the backend answered {response.status} {response.body[:200]!r}"
            )
        try:
            trailing, closed_by = client.read_until_closed(timeout=timeout)
        except TimeoutError:
            pytest.fail(f"the proxy left the connection open after {response!r}")
        return Outcome(response, trailing, closed_by, send_error)


def connection_tokens(response: Response) -> set[str]:
    return {
        token.strip().lower()
        for value in response.header_values("Connection")
        for token in value.split(",")
    }


def assert_refused(outcome: Outcome, status: int, *, clean_close: bool = True) -> None:
    """The proxy itself answered ``status`` with ``Connection: close`` and then closed."""
    response = outcome.response
    assert response is not None, f"no complete response; closed by {outcome.closed_by}"
    assert response.status == status, (response.status, response.body)
    assert response.header("X-Backend") is None, "the backend answered this request"
    assert "close" in connection_tokens(response)
    assert response.body.startswith(str(status).encode())
    assert outcome.trailing == b"", "more bytes followed the refusal"
    if clean_close:
        assert outcome.closed_by == "eof", "the refusal was followed by a reset, not a clean close"


class BackendLedger:
    """The backend's request count before a case, and the check that settles it afterwards."""

    def __init__(self, proxy: ProxyProcess, backend: BackendProcess) -> None:
        self.proxy = proxy
        self.backend = backend
        self.before = backend.stats()

    def settle(self) -> dict[str, Any]:
        """Send a sentinel through the proxy (it must still serve) and wait until the backend
        has seen it; returns the backend's stats from then."""
        sentinel = new_id("sentinel")
        with RawClient(self.proxy.host, self.proxy.port) as client:
            response = client.request("GET", "/", headers=[("X-Request-Id", sentinel)])
        assert response.status == 200
        assert response.header("X-Request-Id") == sentinel
        wait_until(
            lambda: self.backend.saw_request_id(sentinel),
            timeout=5,
            message="the backend saw the sentinel request",
        )
        return self.backend.stats()

    def requests_since(self, stats: dict[str, Any]) -> int:
        return int(stats["requests_total"] - self.before["requests_total"])

    def path_count_since(self, stats: dict[str, Any], path: str) -> int:
        return int(
            stats["requests_by_path"].get(path, 0) - self.before["requests_by_path"].get(path, 0)
        )

    def assert_nothing_reached(self, *request_ids: str) -> None:
        stats = self.settle()
        assert self.requests_since(stats) == 1, "something besides the sentinel reached the backend"
        seen = set(stats["request_ids"])
        for request_id in request_ids:
            assert request_id not in seen


def run_refused(
    proxy: ProxyProcess, backend: BackendProcess, template: bytes
) -> tuple[Outcome, BackendLedger, str]:
    request_id = new_id()
    ledger = BackendLedger(proxy, backend)
    outcome = send_and_read(proxy, template.replace(RID, request_id.encode()))
    return outcome, ledger, request_id


def post(headers: bytes, body: bytes = b"", *, target: bytes = b"/upload") -> bytes:
    """A POST whose header lines are ``headers`` (each ending in CRLF), with Host and the id."""
    return (
        b"POST " + target + b" HTTP/1.1\r\nHost: h\r\nX-Request-Id: @RID@\r\n" + headers + b"\r\n"
    ) + body


def get(headers: bytes = b"", *, request_line: bytes = b"GET / HTTP/1.1") -> bytes:
    return request_line + b"\r\nHost: h\r\nX-Request-Id: @RID@\r\n" + headers + b"\r\n"


# -- refused in the head: 400 (405 for CONNECT), nothing forwarded ---------------------------

CHUNKED_EMPTY = b"0\r\n\r\n"

HEAD_CASES = [
    # Content-Length and Transfer-Encoding
    pytest.param(
        post(b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", CHUNKED_EMPTY),
        id="content-length-and-transfer-encoding",
    ),
    pytest.param(
        post(b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", CHUNKED_EMPTY),
        id="transfer-encoding-and-content-length",
    ),
    pytest.param(
        post(b"Content-Length: 5\r\nContent-Length: 6\r\n", b"hello!"),
        id="differing-content-lengths",
    ),
    pytest.param(post(b"Content-Length: 5, 6\r\n", b"hello!"), id="content-length-list"),
    pytest.param(post(b"Content-Length: abc\r\n", b"hello"), id="content-length-non-numeric"),
    pytest.param(post(b"Content-Length: 5a\r\n", b"hello"), id="content-length-trailing-junk"),
    pytest.param(post(b"Content-Length: 0x5\r\n", b"hello"), id="content-length-hex"),
    pytest.param(post(b"Content-Length: -5\r\n", b"hello"), id="content-length-negative"),
    pytest.param(post(b"Content-Length: +5\r\n", b"hello"), id="content-length-plus-sign"),
    pytest.param(post(b"Content-Length: 1 2\r\n", b"hello"), id="content-length-inner-space"),
    pytest.param(post(b"Content-Length: \r\n", b"hello"), id="content-length-empty"),
    pytest.param(
        post(b"Content-Length: 99999999999999999999999\r\n", b"hello"),
        id="content-length-oversized",
    ),
    # Transfer-Encoding whose final coding is not exactly "chunked"
    pytest.param(post(b"Transfer-Encoding: xchunked\r\n", CHUNKED_EMPTY), id="te-xchunked"),
    pytest.param(
        post(b"Transfer-Encoding: chunked, identity\r\n", CHUNKED_EMPTY), id="te-chunked-identity"
    ),
    pytest.param(
        post(b"Transfer-Encoding: identity, chunked\r\n", CHUNKED_EMPTY), id="te-identity-chunked"
    ),
    pytest.param(post(b"Transfer-Encoding: Chunked\r\n", CHUNKED_EMPTY), id="te-odd-case"),
    pytest.param(post(b"Transfer-Encoding: CHUNKED\r\n", CHUNKED_EMPTY), id="te-upper-case"),
    pytest.param(
        post(b"Transfer-Encoding: chunked, chunked\r\n", CHUNKED_EMPTY), id="te-chunked-twice"
    ),
    pytest.param(
        post(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n", CHUNKED_EMPTY),
        id="te-two-fields",
    ),
    pytest.param(post(b"Transfer-Encoding: identity\r\n", b""), id="te-identity"),
    pytest.param(post(b"Transfer-Encoding: gzip\r\n", b"x"), id="te-gzip-without-chunked"),
    pytest.param(post(b"Transfer-Encoding: \r\n", b""), id="te-empty"),
    pytest.param(post(b"Transfer-Encoding: chunked \r\n", CHUNKED_EMPTY), id="te-trailing-space"),
    pytest.param(post(b"Transfer-Encoding: chunked\t\r\n", CHUNKED_EMPTY), id="te-trailing-tab"),
    pytest.param(post(b"Transfer-Encoding:\x0bchunked\r\n", CHUNKED_EMPTY), id="te-vertical-tab"),
    pytest.param(post(b"Transfer-Encoding: \x0cchunked\r\n", CHUNKED_EMPTY), id="te-form-feed"),
    pytest.param(post(b"Transfer-Encoding: ch unked\r\n", CHUNKED_EMPTY), id="te-inner-space"),
    pytest.param(
        post(b"Transfer-Encoding : chunked\r\n", CHUNKED_EMPTY), id="te-space-before-colon"
    ),
    pytest.param(
        post(b"Transfer-Encoding\t: chunked\r\n", CHUNKED_EMPTY), id="te-tab-before-colon"
    ),
    pytest.param(
        b"POST /upload HTTP/1.0\r\nX-Request-Id: @RID@\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + CHUNKED_EMPTY,
        id="http10-te-and-content-length",
    ),
    # header syntax
    pytest.param(get(b"Foo : bar\r\n"), id="space-before-colon"),
    pytest.param(get(b"Foo\t: bar\r\n"), id="tab-before-colon"),
    pytest.param(get(b"Foo: bar\r\n baz\r\n"), id="obs-fold-space"),
    pytest.param(get(b"Foo: bar\r\n\tbaz\r\n"), id="obs-fold-tab"),
    pytest.param(b"GET / HTTP/1.1\nHost: h\nX-Request-Id: @RID@\n\n", id="bare-lf-everywhere"),
    pytest.param(get(b"Foo: bar\nBaz: qux\r\n"), id="bare-lf-in-header-section"),
    pytest.param(
        b"GET / HTTP/1.1\rHost: h\r\nX-Request-Id: @RID@\r\n\r\n", id="bare-cr-after-request-line"
    ),
    pytest.param(get(b"Foo: a\rb\r\n"), id="bare-cr-in-value"),
    pytest.param(get(b"Foo: a\x00b\r\n"), id="nul-in-value"),
    pytest.param(get(b"F\x00oo: ab\r\n"), id="nul-in-name"),
    pytest.param(get(b"Foo: a\x01b\r\n"), id="control-byte-in-value"),
    pytest.param(get(b"Foo: a\x1bb\r\n"), id="escape-in-value"),
    pytest.param(get(b"Foo: a\x7fb\r\n"), id="del-in-value"),
    pytest.param(get(b"F\x7foo: ab\r\n"), id="del-in-name"),
    pytest.param(get(b"F(o)o: ab\r\n"), id="separator-in-name"),
    pytest.param(get(b"Foo\r\n"), id="header-without-colon"),
    pytest.param(get(b": bar\r\n"), id="empty-header-name"),
    # request line: method, target, version
    pytest.param(get(request_line=b"G(ET / HTTP/1.1"), id="method-with-separator"),
    pytest.param(get(request_line=b"GE\x00T / HTTP/1.1"), id="method-with-nul"),
    pytest.param(get(request_line=b" / HTTP/1.1"), id="method-empty"),
    pytest.param(get(request_line=b"GET /a b HTTP/1.1"), id="target-with-space"),
    pytest.param(get(request_line=b"GET /a\x00b HTTP/1.1"), id="target-with-nul"),
    pytest.param(get(request_line=b"GET /a\x01b HTTP/1.1"), id="target-with-control-byte"),
    pytest.param(get(request_line=b"GET /a\xffb HTTP/1.1"), id="target-with-8-bit-byte"),
    pytest.param(get(request_line=b"GET a HTTP/1.1"), id="target-without-slash"),
    pytest.param(get(request_line=b"GET * HTTP/1.1"), id="asterisk-form-for-get"),
    pytest.param(get(request_line=b"GET ftp://h/x HTTP/1.1"), id="absolute-form-ftp"),
    pytest.param(get(request_line=b"GET http://user@h/x HTTP/1.1"), id="absolute-form-userinfo"),
    pytest.param(get(request_line=b"GET http:///x HTTP/1.1"), id="absolute-form-no-host"),
    pytest.param(b"GET /\r\n\r\n", id="http09-request-line"),
    pytest.param(get(request_line=b"GET / HTTP/0.9"), id="http09-version"),
    pytest.param(get(request_line=b"GET / HTTP/1.2"), id="http12"),
    pytest.param(get(request_line=b"GET / HTTP/2.0"), id="http20"),
    pytest.param(get(request_line=b"GET / HTTP/2"), id="http2"),
    pytest.param(get(request_line=b"GET / HTTP/1.10"), id="http1-10"),
    pytest.param(get(request_line=b"GET / http/1.1"), id="version-lower-case"),
    pytest.param(get(request_line=b"GET / HTTP/1.1 "), id="version-trailing-space"),
    pytest.param(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", id="http2-prior-knowledge-preface"),
    # Host
    pytest.param(b"GET / HTTP/1.1\r\nX-Request-Id: @RID@\r\n\r\n", id="http11-without-host"),
    pytest.param(get(b"Host: other\r\n"), id="two-different-hosts"),
    pytest.param(get(b"Host: h\r\n"), id="two-equal-hosts"),
]


@pytest.mark.parametrize("template", HEAD_CASES)
def test_malformed_head_is_refused_with_400_and_never_forwarded(
    proxy: ProxyProcess, backend: BackendProcess, template: bytes
) -> None:
    outcome, ledger, request_id = run_refused(proxy, backend, template)
    assert_refused(outcome, 400)
    ledger.assert_nothing_reached(request_id)


def test_connect_is_refused_with_405(proxy: ProxyProcess, backend: BackendProcess) -> None:
    template = b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\nX-Request-Id: @RID@\r\n\r\n"
    outcome, ledger, request_id = run_refused(proxy, backend, template)
    assert_refused(outcome, 405)
    ledger.assert_nothing_reached(request_id)


INVALID_HOSTS = [
    pytest.param(b"a b", id="space"),
    pytest.param(b"a/b", id="slash"),
    pytest.param(b"user@h", id="at"),
    pytest.param(b"h\x80", id="8-bit-byte"),
    pytest.param(
        b"h:port",
        id="non-numeric-port",
    ),
    pytest.param(
        b"[::1",
        id="unbalanced-ip-literal",
    ),
]


@pytest.mark.parametrize("host", INVALID_HOSTS)
def test_invalid_host_value_is_refused(
    proxy: ProxyProcess, backend: BackendProcess, host: bytes
) -> None:
    """RFC 9112 §3.2: a Host field with an invalid value MUST get 400."""
    template = b"GET / HTTP/1.1\r\nHost: " + host + b"\r\nX-Request-Id: @RID@\r\n\r\n"
    outcome, ledger, request_id = run_refused(proxy, backend, template)
    assert_refused(outcome, 400)
    ledger.assert_nothing_reached(request_id)


# -- refused in the body: 400, connection closed, never more than the one head upstream ------

CHUNKED = b"Transfer-Encoding: chunked\r\n"

BODY_CASES = [
    pytest.param(post(CHUNKED, b"zz\r\nhello\r\n0\r\n\r\n"), id="chunk-size-not-hex"),
    pytest.param(post(CHUNKED, b"-5\r\nhello\r\n0\r\n\r\n"), id="chunk-size-negative"),
    pytest.param(post(CHUNKED, b"0x5\r\nhello\r\n0\r\n\r\n"), id="chunk-size-0x-prefix"),
    pytest.param(post(CHUNKED, b"5 \r\nhello\r\n0\r\n\r\n"), id="chunk-size-trailing-space"),
    pytest.param(
        post(CHUNKED, b"10000000000000000000000000000005\r\nhello\r\n0\r\n\r\n"),
        id="chunk-size-overflow",
    ),
    pytest.param(post(CHUNKED, b"5\nhello\r\n0\r\n\r\n"), id="chunk-size-bare-lf"),
    pytest.param(post(CHUNKED, b"5\rhello\r\n0\r\n\r\n"), id="chunk-size-bare-cr"),
    pytest.param(post(CHUNKED, b"5;\nxx\r\nhello\r\n0\r\n\r\n"), id="chunk-extension-bare-lf"),
    pytest.param(post(CHUNKED, b"5\r\nhelloXX0\r\n\r\n"), id="chunk-data-not-followed-by-crlf"),
    pytest.param(post(CHUNKED, b"5\r\nhello\n0\r\n\r\n"), id="chunk-data-then-bare-lf"),
    pytest.param(post(CHUNKED, b"5\r\nhello\r\n0\r\nX: y\n\r\n"), id="trailer-bare-lf"),
    pytest.param(
        post(CHUNKED, b"5;" + b"e" * 200_000 + b"\r\nhello\r\n0\r\n\r\n"),
        id="chunk-extension-200kb",
    ),
]


@pytest.mark.parametrize("template", BODY_CASES)
def test_malformed_chunked_body_is_refused_and_never_completes_upstream(
    proxy: ProxyProcess, backend: BackendProcess, template: bytes
) -> None:
    outcome, ledger, _ = run_refused(proxy, backend, template)
    assert_refused(outcome, 400)
    stats = ledger.settle()
    # The head may have been streamed upstream before the body went wrong, but nothing else.
    assert ledger.requests_since(stats) <= 2
    assert ledger.path_count_since(stats, "/upload") <= 1


@pytest.mark.parametrize(
    "body",
    [b"zz\r\nhello\r\n0\r\n\r\n", b"5\r\nhelloXX0\r\n\r\n"],
    ids=["chunk-size-not-hex", "chunk-data-not-followed-by-crlf"],
)
def test_a_bad_chunk_in_the_same_read_as_the_head_is_never_forwarded(
    proxy: ProxyProcess, backend: BackendProcess, body: bytes
) -> None:
    # Warm the pool: after this exchange an idle upstream connection is waiting.
    with RawClient(proxy.host, proxy.port) as client:
        assert client.request("GET", "/").status == 200
    outcome, ledger, request_id = run_refused(proxy, backend, post(CHUNKED, body))
    assert_refused(outcome, 400, clean_close=False)
    ledger.assert_nothing_reached(request_id)


def test_a_refusal_mid_body_closes_cleanly(proxy: ProxyProcess, backend: BackendProcess) -> None:
    """Closing with unread request bytes would make the kernel reset the connection, and a
    client still sending could lose the 400 before reading it: the close lingers instead."""
    template = post(CHUNKED, b"5;" + b"e" * 200_000 + b"\r\nhello\r\n0\r\n\r\n")
    outcome, ledger, _ = run_refused(proxy, backend, template)
    ledger.settle()
    assert_refused(outcome, 400, clean_close=True)


# -- request smuggling: one byte stream, never a second request upstream ---------------------


def smuggle_body_chunked() -> bytes:
    return b"%x\r\n" % len(SMUGGLED) + SMUGGLED + b"\r\n0\r\n\r\n"


SMUGGLING_CASES = [
    # (bytes, the front request's status, the body length the backend reports for a 200)
    pytest.param(
        post(b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\nG" + SMUGGLED),
        400,
        None,
        id="CL.TE",
    ),
    pytest.param(
        post(b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n", smuggle_body_chunked()),
        400,
        None,
        id="TE.CL",
    ),
    pytest.param(
        post(
            b"Transfer-Encoding: chunked\r\nTransfer-Encoding: x\r\nContent-Length: 4\r\n",
            smuggle_body_chunked(),
        ),
        400,
        None,
        id="TE.TE-second-field",
    ),
    pytest.param(
        post(b"Transfer-Encoding: xchunked\r\nContent-Length: 4\r\n", smuggle_body_chunked()),
        400,
        None,
        id="TE.TE-xchunked",
    ),
    pytest.param(
        post(b"Transfer-Encoding : chunked\r\nContent-Length: 4\r\n", smuggle_body_chunked()),
        400,
        None,
        id="TE.TE-space-before-colon",
    ),
    pytest.param(
        post(b"Transfer-Encoding:\x0bchunked\r\nContent-Length: 4\r\n", smuggle_body_chunked()),
        400,
        None,
        id="TE.TE-vertical-tab",
    ),
    pytest.param(
        post(b"Content-Length: 4\r\n Transfer-Encoding: chunked\r\n", smuggle_body_chunked()),
        400,
        None,
        id="TE.TE-folded-line",
    ),
    pytest.param(
        post(b"X: y\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n", smuggle_body_chunked()),
        400,
        None,
        id="TE.TE-bare-lf-before",
    ),
    pytest.param(
        post(b"Transfer-Encoding\r\n : chunked\r\nContent-Length: 4\r\n", smuggle_body_chunked()),
        400,
        None,
        id="TE.TE-name-then-fold",
    ),
    pytest.param(
        post(b"Transfer-Encoding: chunked, identity\r\n", smuggle_body_chunked()),
        400,
        None,
        id="TE.TE-identity-last",
    ),
    pytest.param(
        post(b"Content-Length: 0\r\nContent-Length: %d\r\n" % len(SMUGGLED), SMUGGLED),
        400,
        None,
        id="CL.CL",
    ),
    pytest.param(
        b"POST /upload HTTP/1.0\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        + smuggle_body_chunked(),
        400,
        None,
        id="http10-TE.CL",
    ),
    pytest.param(
        post(CHUNKED, b"10000000000000000000000000000005\r\n" + SMUGGLED + b"\r\n0\r\n\r\n"),
        400,
        None,
        id="chunk-size-overflow",
    ),
    pytest.param(
        post(CHUNKED, b"5;\n" + SMUGGLED + b"\r\nhello\r\n0\r\n\r\n"),
        400,
        None,
        id="bare-lf-in-chunk-extension",
    ),
    # Framing that is valid: the hidden request is body, delivered as body.
    pytest.param(
        post(b"Content-Length: %d\r\n" % len(SMUGGLED), SMUGGLED),
        200,
        len(SMUGGLED),
        id="request-as-cl-body",
    ),
    pytest.param(
        post(CHUNKED, smuggle_body_chunked()), 200, len(SMUGGLED), id="request-as-chunked-body"
    ),
    pytest.param(
        post(b"Content-Length: %d\r\nConnection: Content-Length\r\n" % len(SMUGGLED), SMUGGLED),
        200,
        len(SMUGGLED),
        id="connection-names-content-length",
    ),
    pytest.param(
        post(CHUNKED + b"Connection: Transfer-Encoding\r\n", smuggle_body_chunked()),
        200,
        len(SMUGGLED),
        id="connection-names-transfer-encoding",
    ),
    pytest.param(
        b"GET /upload HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % len(SMUGGLED) + SMUGGLED,
        200,
        len(SMUGGLED),
        id="get-with-body",
    ),
    pytest.param(
        b"GET /upload HTTP/1.1\r\nHost: h\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings"
        b"\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n" + SMUGGLED,
        200,
        0,
        id="h2c-upgrade-then-request",
    ),
    pytest.param(
        b"GET /upload HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        + SMUGGLED,
        200,
        0,
        id="refused-websocket-upgrade-then-request",
    ),
]


@pytest.mark.parametrize(("template", "status", "body_len"), SMUGGLING_CASES)
def test_no_request_is_smuggled_past_the_proxy(
    proxy: ProxyProcess,
    backend: BackendProcess,
    template: bytes,
    status: int,
    body_len: int | None,
) -> None:
    request_id = new_id("smuggle")
    ledger = BackendLedger(proxy, backend)
    with RawClient(proxy.host, proxy.port) as client:
        with contextlib.suppress(OSError):
            client.send(template.replace(RID, request_id.encode()))
        response = client.read_response()
        assert response.status == status
        if body_len is not None:
            # The hidden request arrived as the body of the front request, byte for byte.
            assert response.json()["body_len"] == body_len
        else:
            assert response.header("X-Backend") is None
    stats = ledger.settle()
    assert ledger.path_count_since(stats, "/smuggled") == 0
    assert "smuggled" not in stats["request_ids"]
    assert ledger.requests_since(stats) <= 2  # the front request (at most) and the sentinel
