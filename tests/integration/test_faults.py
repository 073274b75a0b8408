"""Backend faults, each with a test: every way a backend can fail gives the client the documented
status (502 broken or unreachable, 504 too slow), or, once part of a response is out, a closed
connection that never looks complete; the proxy keeps serving everyone else meanwhile, marks
health where issue 3 says (connect errors and timeouts on live traffic), and never reuses an
upstream connection that carried a broken response.

Two kinds of misbehaving backend are used: the fake backend process (its ``/reset-headers``,
``/reset-body``, ``/garbage``, ``/slow``... paths and ``--accept-then-close``), and
``tests.fakes.scripted.ScriptedBackend``, a raw asyncio server in a thread of this test process
that answers each request path with scripted bytes (responses no real HTTP library would
produce) and records, per connection, what it was asked and whether the proxy closed it.

Most fault requests are POSTs with the override header naming the faulty backend: a POST is never
replayed, so the fault reaches the client instead of being retried on the healthy backend. The
retry itself (idempotent requests, and requests whose connection never got up) is shown too.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.fakes import client as http
from tests.fakes.client import IncompleteResponse, RawClient, Response
from tests.fakes.process import (
    BackendProcess,
    ProxyProcess,
    free_port,
    proxy_config,
    start_backend,
    start_tdproxy,
    wait_until,
)
from tests.fakes.scripted import CLOSE, HANG, OK, RESET, Gate, ScriptedBackend, Step
from tests.fakes.tls import make_self_signed, server_context

RESPONSE_HEADER = 1.0
OVERRIDE = "X-TD-Backend"
SLACK = 1.5  # the deadline sweeper runs every 0.25 s; process scheduling adds a little

_ACCEPT_THEN_CLOSE = """
import socket
listener = socket.create_server(("127.0.0.1", 0), backlog=128)
print(listener.getsockname()[1], flush=True)
while True:
    connection, _ = listener.accept()
    connection.close()
"""


class AcceptThenClose:
    """A process that accepts each connection and closes it at once, in a blocking loop with
    nothing else to do: its FIN follows the handshake within microseconds (the fake backend's
    ``--accept-then-close`` goes through an event loop first and is much slower)."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _ACCEPT_THEN_CLOSE],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
        )
        assert self._proc.stdout is not None
        try:
            self.port = int(self._proc.stdout.readline())
        except ValueError:
            self.close()
            raise

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._proc.kill()
        self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()


def head_with(*lines: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n"


# Broken responses, each sent whole in one write and followed by nothing: the connection stays
# open on the backend's side, so a proxy that pooled it would send its next request there.
BROKEN_RESPONSES: dict[str, bytes] = {
    "/cl-and-te": head_with(b"Content-Length: 5", b"Transfer-Encoding: chunked")
    + b"5\r\nhello\r\n0\r\n\r\n",
    "/te-and-cl": head_with(b"Transfer-Encoding: chunked", b"Content-Length: 5")
    + b"5\r\nhello\r\n0\r\n\r\n",
    "/differing-content-lengths": head_with(b"Content-Length: 5", b"Content-Length: 6") + b"hello!",
    "/negative-content-length": head_with(b"Content-Length: -5") + b"hello",
    "/te-gzip": head_with(b"Transfer-Encoding: gzip") + b"\x1f\x8b\x08\x00 not really gzip",
    "/te-identity": head_with(b"Transfer-Encoding: identity") + b"hello",
    # Valid HTTP, but tdproxy re-frames chunked bodies and would drop the gzip coding silently.
    "/te-gzip-chunked": head_with(b"Transfer-Encoding: gzip, chunked")
    + b"4\r\n\x1f\x8b\x08\x00\r\n0\r\n\r\n",
    "/oversized-head": head_with(b"Content-Length: 2", b"X-Big: " + b"b" * (70 * 1024)) + b"ok",
    "/many-headers-over-64k": head_with(
        b"Content-Length: 2", *(b"X-H%d: %s" % (n, b"v" * 60) for n in range(1200))
    )
    + b"ok",
    "/space-before-colon": head_with(b"Content-Length: 2", b"X-Bad : v") + b"ok",
    "/nul-in-header": head_with(b"Content-Length: 2", b"X-Bad: a\x00b") + b"ok",
    "/bad-status-line": b"HTTP/1.1 2OO OK\r\nContent-Length: 2\r\n\r\nok",
}
# Bad chunk framing that arrives in the same write as the head: nothing has reached the client
# yet, so a 502 is still possible.
BAD_CHUNKS: dict[str, bytes] = {
    "/chunk-size-not-hex": head_with(b"Transfer-Encoding: chunked") + b"zz\r\nhello\r\n0\r\n\r\n",
    "/chunk-without-crlf": head_with(b"Transfer-Encoding: chunked") + b"5\r\nhelloXX0\r\n\r\n",
}
GOOD_CHUNK = b"5\r\nhello\r\n"
UNASKED = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nX-Scripted: unasked\r\n\r\nsmuggled"
SCRIPTS: dict[str, Sequence[Step]] = {
    **{path: [data] for path, data in BROKEN_RESPONSES.items()},
    **{path: [data] for path, data in BAD_CHUNKS.items()},
    "/partial-head-then-hang": [b"HTTP/1.1 200 OK\r\nContent-Type: text/pl", HANG],
    # A head that never ends, in many writes: refused as broken (502), not left to time out (504).
    "/endless-head": [
        b"HTTP/1.1 200 OK\r\n",
        *(
            b"".join(b"X-More-%d: %s\r\n" % (n, b"m" * 100) for n in range(k, k + 100))
            for k in range(0, 4000, 100)
        ),
        HANG,
    ],
    # Under the limit (64 KiB of names and values), over it with the ": " and CRLF framing, and
    # in many writes: served.
    "/big-head-in-pieces": [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n",
        *(
            b"".join(b"X-F%04d: %s\r\n" % (n, b"f" * 50) for n in range(k, k + 50))
            for k in range(0, 1100, 50)
        ),
        b"\r\nok",
    ],
    "/bad-chunk-later": [
        head_with(b"Transfer-Encoding: chunked") + GOOD_CHUNK,
        Gate("bad-chunk-later"),
        b"zz\r\n",
    ],
    "/reset-mid-chunked-body": [
        head_with(b"Transfer-Encoding: chunked") + GOOD_CHUNK,
        Gate("reset-mid-chunked-body"),
        RESET,
    ],
    "/garbage-once": [b"\x00\x01\x02 not HTTP at all\r\n\r\n", CLOSE],
    # A complete response and, in the same write or later on the idle connection, another one
    # nobody asked for: it must never become some other client's answer.
    "/extra-after-response": [OK + UNASKED],
    "/talks-when-idle": [OK, Gate("talks-when-idle"), UNASKED],
}


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def good() -> Iterator[BackendProcess]:
    with start_backend("good") as running:
        yield running


@pytest.fixture(scope="module")
def flaky() -> Iterator[BackendProcess]:
    with start_backend("flaky") as running:
        yield running


@pytest.fixture(scope="module")
def closer() -> Iterator[BackendProcess]:
    with start_backend("closer", accept_then_close=True) as running:
        yield running


@pytest.fixture(scope="module")
def scripted() -> Iterator[ScriptedBackend]:
    backend = ScriptedBackend(SCRIPTS)
    try:
        yield backend
    finally:
        backend.close()


@pytest.fixture(scope="module")
def snappy_closer() -> Iterator[AcceptThenClose]:
    listener = AcceptThenClose()
    try:
        yield listener
    finally:
        listener.close()


@pytest.fixture(scope="module")
def proxy(
    good: BackendProcess,
    flaky: BackendProcess,
    closer: BackendProcess,
    scripted: ScriptedBackend,
    snappy_closer: AcceptThenClose,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ProxyProcess]:
    """good takes all routed traffic; the others are reached through the override header."""
    config = proxy_config(
        [
            ("good", good.url, 1),
            ("flaky", flaky.url, 0),
            ("closer", closer.url, 0),
            ("scripted", scripted.url(), 0),
            ("snappy-closer", snappy_closer.url, 0),
        ],
        routing={"override_header": OVERRIDE},
        timeouts={"response_header": f"{RESPONSE_HEADER}s", "connect": "2s"},
    )
    with start_tdproxy(config, tmp_path_factory.mktemp("faults"), wait_admin=True) as running:
        yield running


# ---------------------------------------------------------------------------------------------
# Helpers


def backend_status(proxy: ProxyProcess, name: str) -> dict[str, Any]:
    status = http.request(proxy.admin_url + "/api/v1/status").json()
    found: dict[str, Any] = next(b for b in status["backends"] if b["name"] == name)
    return found


def upstream_errors(proxy: ProxyProcess, name: str) -> dict[str, int]:
    errors: dict[str, int] = backend_status(proxy, name)["upstream_errors"]
    return errors


class Bystander:
    """Another client, on its own keep-alive connection, making normal requests for as long as
    the ``with`` block lasts (and at least until one request completed after it began). Every
    one of its requests must succeed."""

    def __init__(self, proxy: ProxyProcess) -> None:
        self.proxy = proxy
        self.served = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Bystander:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            wait_until(lambda: self.served or self.failures, timeout=10, message="a bystander")
        finally:
            self._stop.set()
            self._thread.join(10)
        if exc_info[0] is None:
            assert not self.failures, self.failures
            assert self.served > 0

    def _run(self) -> None:
        try:
            with RawClient(self.proxy.host, self.proxy.port, timeout=5) as client:
                while not self._stop.is_set():
                    response = client.request("GET", "/echo", headers=[(OVERRIDE, "good")])
                    if response.status != 200 or response.header("X-Backend") != "good":
                        self.failures.append(f"{response.status} {response.body[:100]!r}")
                    self.served += 1
        except Exception as exc:  # reported by __exit__
            self.failures.append(repr(exc))


def faulty_request(
    proxy: ProxyProcess, backend: str, path: str, method: str = "POST", timeout: float = 10.0
) -> Response:
    """One request routed to ``backend`` on a fresh connection (a POST: never replayed)."""
    with RawClient(proxy.host, proxy.port, timeout=timeout) as client:
        body = b"" if method == "POST" else None
        return client.request(method, path, headers=[(OVERRIDE, backend)], body=body)


def assert_generated(response: Response, status: int) -> None:
    """A status the proxy produced itself (not one relayed from a backend)."""
    assert response.status == status, (response.status, response.headers, response.body[:200])
    assert response.header("X-Backend") is None
    assert response.header("X-Scripted") is None
    assert response.body.startswith(str(status).encode())


def read_truncated(client: RawClient) -> tuple[Response, bytes, str]:
    """A response head, then everything until the close: the body is cut short."""
    response = client.read_head()
    rest, closed_by = client.read_until_closed(timeout=10)
    return response, rest, closed_by


# ---------------------------------------------------------------------------------------------
# Faults before any response byte: 502 / 504


@pytest.mark.parametrize(
    ("backend", "path", "kind"),
    [("flaky", "/reset-headers", "reset"), ("flaky", "/garbage", "protocol")],
    ids=["reset-mid-headers", "garbage-instead-of-http"],
)
def test_a_backend_that_breaks_before_answering_gives_502(
    proxy: ProxyProcess, backend: str, path: str, kind: str
) -> None:
    before = upstream_errors(proxy, backend).get(kind, 0)
    with Bystander(proxy):
        response = faulty_request(proxy, backend, path)
    assert_generated(response, 502)
    assert upstream_errors(proxy, backend).get(kind, 0) == before + 1


def test_a_backend_that_accepts_then_closes_is_retried_or_gives_502(proxy: ProxyProcess) -> None:
    """With another backend to go to: a request that never got written is retried there (200
    from good); one the backend took before closing is a POST, so it gets a 502. Either way at
    once, not after response_header."""
    with Bystander(proxy):
        for backend in ("closer", "snappy-closer"):
            for _ in range(10):
                start = time.monotonic()
                response = faulty_request(proxy, backend, "/")
                assert time.monotonic() - start < RESPONSE_HEADER / 2
                if response.status == 200:
                    assert response.header("X-Backend") == "good"
                else:
                    assert_generated(response, 502)


@pytest.mark.parametrize(
    ("backend", "path"),
    [
        ("scripted", "/partial-head-then-hang"),
        ("flaky", "/slow?ms=4000"),
        ("flaky", "/hang"),
    ],
    ids=["headers-never-finish", "slower-than-response-header", "never-answers"],
)
def test_a_backend_slower_than_response_header_gives_504(
    proxy: ProxyProcess, backend: str, path: str
) -> None:
    before = upstream_errors(proxy, backend).get("timeout", 0)
    with Bystander(proxy) as bystander:
        start = time.monotonic()
        response = faulty_request(proxy, backend, path)
        waited = time.monotonic() - start
    assert_generated(response, 504)
    assert RESPONSE_HEADER - 0.3 <= waited <= RESPONSE_HEADER + SLACK
    assert bystander.served > 1  # others were served while this one waited
    assert upstream_errors(proxy, backend).get("timeout", 0) == before + 1


def test_a_get_that_breaks_before_answering_is_retried_on_another_backend(
    proxy: ProxyProcess, scripted: ScriptedBackend
) -> None:
    before = len(scripted.connections_serving("/garbage-once"))
    response = faulty_request(proxy, "scripted", "/garbage-once", method="GET")
    assert response.status == 200
    assert response.header("X-Backend") == "good"
    assert len(scripted.connections_serving("/garbage-once")) == before + 1


# ---------------------------------------------------------------------------------------------
# Broken responses: 502, and the upstream connection is discarded


def assert_discarded(scripted: ScriptedBackend, proxy: ProxyProcess, path: str) -> None:
    """The connection that carried ``path`` was closed by the proxy, and the next request to the
    scripted backend arrives on a different connection."""
    carried = scripted.connections_serving(path)[-1]
    wait_until(lambda: carried.closed, timeout=5, message=f"the proxy closed {path}'s conn")
    response = faulty_request(proxy, "scripted", "/ok")
    assert response.status == 200 and response.body == b"ok"
    assert carried.paths[-1] == path, "the connection was reused after a broken response"


@pytest.mark.parametrize("path", sorted(BROKEN_RESPONSES))
def test_a_broken_response_gives_502_and_its_connection_is_not_reused(
    proxy: ProxyProcess, scripted: ScriptedBackend, path: str
) -> None:
    # Warm the pool first, so a pooled connection carries the broken response.
    assert faulty_request(proxy, "scripted", "/ok").status == 200
    with Bystander(proxy):
        response = faulty_request(proxy, "scripted", path)
    assert_generated(response, 502)
    assert_discarded(scripted, proxy, path)


def test_an_endless_response_head_is_refused_as_broken(proxy: ProxyProcess) -> None:
    before = upstream_errors(proxy, "scripted").get("protocol", 0)
    response = faulty_request(proxy, "scripted", "/endless-head")
    assert_generated(response, 502)  # the size bound, not the response timeout (504)
    assert upstream_errors(proxy, "scripted").get("protocol", 0) == before + 1


def test_a_large_head_under_the_limit_arriving_in_pieces_is_served(proxy: ProxyProcess) -> None:
    response = faulty_request(proxy, "scripted", "/big-head-in-pieces")
    assert response.status == 200, (response.status, response.body[:200])
    assert response.body == b"ok"
    assert response.header("X-F1099") == "f" * 50
    assert len([name for name, _ in response.headers if name.startswith("X-F")]) == 1100


@pytest.mark.parametrize("path", sorted(BAD_CHUNKS))
def test_bad_chunk_framing_before_any_byte_went_out_gives_502(
    proxy: ProxyProcess, scripted: ScriptedBackend, path: str
) -> None:
    try:
        response = faulty_request(proxy, "scripted", path)
    except (IncompleteResponse, ConnectionResetError) as exc:
        pytest.fail(f"no response, the connection was cut: {exc!r}")
    assert_generated(response, 502)


@pytest.mark.parametrize("path", sorted(BAD_CHUNKS))
def test_bad_chunk_framing_is_never_presented_as_complete(
    proxy: ProxyProcess, scripted: ScriptedBackend, path: str
) -> None:
    with RawClient(proxy.host, proxy.port) as client:
        client.send_request("POST", path, headers=[(OVERRIDE, "scripted")], body=b"")
        try:
            response = client.read_response()
        except (IncompleteResponse, ConnectionResetError):
            pass  # cut off: acceptable, it does not look complete
        else:
            assert_generated(response, 502)  # the only complete answer allowed
    assert_discarded(scripted, proxy, path)


def test_bytes_after_a_complete_response_never_reach_another_client(
    proxy: ProxyProcess, scripted: ScriptedBackend
) -> None:
    response = faulty_request(proxy, "scripted", "/extra-after-response")
    assert response.status == 200 and response.body == b"ok"
    assert_discarded(scripted, proxy, "/extra-after-response")


def test_a_backend_talking_on_an_idle_connection_is_dropped(
    proxy: ProxyProcess, scripted: ScriptedBackend
) -> None:
    response = faulty_request(proxy, "scripted", "/talks-when-idle")
    assert response.status == 200 and response.body == b"ok"
    scripted.open_gate("talks-when-idle")  # the unasked response goes to the pooled connection
    assert_discarded(scripted, proxy, "/talks-when-idle")
    for _ in range(3):
        assert faulty_request(proxy, "scripted", "/ok").header("X-Scripted") == "ok"


@pytest.mark.parametrize("path", ["/bad-chunk-later", "/reset-mid-chunked-body"])
def test_a_chunked_response_broken_after_it_started_is_cut_off(
    proxy: ProxyProcess, scripted: ScriptedBackend, path: str
) -> None:
    with RawClient(proxy.host, proxy.port) as client:
        client.send_request("POST", path, headers=[(OVERRIDE, "scripted")], body=b"")
        response = client.read_head()
        assert response.status == 200
        assert client.read_until(b"hello\r\n")  # the good chunk is through
        scripted.open_gate(path.strip("/"))
        rest, _ = client.read_until_closed(timeout=10)
    # Whatever came after the good chunk, the terminating chunk never did.
    assert b"0\r\n\r\n" not in rest
    assert_discarded(scripted, proxy, path)


def test_a_response_cut_mid_body_closes_the_client_connection(
    proxy: ProxyProcess,
) -> None:
    before = upstream_errors(proxy, "flaky").get("reset", 0)
    with Bystander(proxy), RawClient(proxy.host, proxy.port) as client:
        client.send_request(
            "POST", "/reset-body?bytes=5000", headers=[(OVERRIDE, "flaky")], body=b""
        )
        response, rest, _ = read_truncated(client)
    assert response.status == 200
    assert len(rest) < int(response.header("Content-Length") or 0)
    assert upstream_errors(proxy, "flaky").get("reset", 0) == before + 1


def test_a_backend_closing_after_its_headers_closes_the_client_connection(
    proxy: ProxyProcess,
) -> None:
    with RawClient(proxy.host, proxy.port) as client:
        client.send_request("POST", "/close-after-headers", headers=[(OVERRIDE, "flaky")], body=b"")
        response, rest, _ = read_truncated(client)
    assert response.status == 200
    assert response.header("Content-Length") == "100"
    assert len(rest) < 100


# ---------------------------------------------------------------------------------------------
# Backends that cannot be reached at all: 502 alone, retried elsewhere when possible


@pytest.fixture(scope="module")
def tls_backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ScriptedBackend, Path]]:
    """An HTTPS backend whose certificate is for ``localhost`` only, and that certificate."""
    paths = make_self_signed(tmp_path_factory.mktemp("tls"), ("localhost",))
    backend = ScriptedBackend({}, ssl_context=server_context(paths))
    try:
        yield backend, paths.cert
    finally:
        backend.close()


UNREACHABLE = ["refused", "unresolvable", "tls-to-a-closing-server", "tls-wrong-name"]


def unreachable_url(kind: str, closer: BackendProcess, tls_backend: ScriptedBackend) -> str:
    return {
        "refused": f"http://127.0.0.1:{free_port()}",
        "unresolvable": "http://nonexistent.invalid:80",
        "tls-to-a-closing-server": f"https://127.0.0.1:{closer.port}",
        # The certificate names localhost; the url names the address: verification fails.
        "tls-wrong-name": tls_backend.url("https", "127.0.0.1"),
    }[kind]


@pytest.mark.parametrize("kind", UNREACHABLE)
def test_an_unreachable_backend_gives_502(
    kind: str,
    closer: BackendProcess,
    tls_backend: tuple[ScriptedBackend, Path],
    tmp_path: Path,
) -> None:
    backend, cert = tls_backend
    config = proxy_config(
        [{"name": "lost", "url": unreachable_url(kind, closer, backend), "tls_verify": True}],
        timeouts={"connect": "3s"},
    )
    env = {"SSL_CERT_FILE": str(cert)}  # the proxy trusts the test certificate
    with start_tdproxy(config, tmp_path, env=env, wait_admin=True) as proxy:
        for method in ("GET", "POST"):
            with RawClient(proxy.host, proxy.port) as client:
                response = client.request(method, "/", body=b"" if method == "POST" else None)
                assert_generated(response, 502)
                assert client.request("GET", "/").status == 502  # the client connection lives on
        assert upstream_errors(proxy, "lost").get("connect", 0) == 4
        assert "Traceback" not in proxy.stderr_text()


@pytest.mark.parametrize("which", ["closer", "snappy-closer"])
def test_a_backend_that_accepts_then_closes_gives_502_at_once(
    which: str, closer: BackendProcess, snappy_closer: AcceptThenClose, tmp_path: Path
) -> None:
    """Alone, with nowhere to retry: a 502 every time, never a wait for response_header (the
    snappy closer's FIN often arrives before the request is even written)."""
    url = closer.url if which == "closer" else snappy_closer.url
    config = proxy_config([("lost", url, 1)], timeouts={"response_header": "5s"})
    with start_tdproxy(config, tmp_path) as proxy, RawClient(proxy.host, proxy.port) as client:
        for number in range(30):
            method = "POST" if number % 2 else "GET"
            start = time.monotonic()
            response = client.request(method, "/", body=b"" if method == "POST" else None)
            assert_generated(response, 502)
            assert time.monotonic() - start < 2.5, f"attempt {number} waited for a timeout"


def test_the_tls_backend_with_the_right_name_is_reachable(
    tls_backend: tuple[ScriptedBackend, Path], tmp_path: Path
) -> None:
    """The control for ``tls-wrong-name``: the same server, named as its certificate says."""
    backend, cert = tls_backend
    config = proxy_config([{"name": "tls", "url": backend.url("https", "localhost")}])
    with start_tdproxy(config, tmp_path, env={"SSL_CERT_FILE": str(cert)}) as proxy:
        response = http.request(proxy.url + "/")
    assert response.status == 200 and response.body == b"ok"


def test_unreachable_backends_are_skipped_while_a_healthy_one_exists(
    good: BackendProcess,
    closer: BackendProcess,
    tls_backend: tuple[ScriptedBackend, Path],
    tmp_path: Path,
) -> None:
    backend, cert = tls_backend
    lost = [
        {"name": kind, "url": unreachable_url(kind, closer, backend), "weight": 1}
        for kind in UNREACHABLE
    ]
    config = proxy_config([*lost, ("good", good.url, 1)], timeouts={"connect": "3s"})
    env = {"SSL_CERT_FILE": str(cert)}
    with (
        start_tdproxy(config, tmp_path, env=env) as proxy,
        RawClient(proxy.host, proxy.port) as client,
    ):
        for number in range(20):
            method = "POST" if number % 2 else "GET"
            response = client.request(method, "/echo", body=b"x" if method == "POST" else None)
            assert response.status == 200
            assert response.header("X-Backend") == "good"


# ---------------------------------------------------------------------------------------------
# Health: connect errors and timeouts on live traffic mark a backend down


def health_config(backends: list[tuple[str, str, int]], **overrides: Any) -> dict[str, Any]:
    """Active checks that cannot act within a test (a minute apart, ten failures to fall), so
    any change of health seen here is the passive one."""
    health = {
        "enabled": True,
        "interval": "60s",
        "fall": 10,
        "rise": 1,
        "passive": {"max_failures": 3},
    }
    return proxy_config(
        backends,
        health_check=health,
        routing={"override_header": OVERRIDE},
        timeouts={"response_header": "500ms"},
        **overrides,
    )


def test_connect_errors_on_live_traffic_mark_a_backend_down(
    good: BackendProcess, tmp_path: Path
) -> None:
    with start_backend("victim") as victim:
        config = health_config([("good", good.url, 1), ("victim", victim.url, 1)])
        with start_tdproxy(config, tmp_path, wait_admin=True) as proxy:
            assert backend_status(proxy, "victim")["healthy"]
            victim.kill()
            with RawClient(proxy.host, proxy.port) as client:
                for _ in range(3):  # retried on good: the client never notices
                    response = client.request(
                        "POST", "/echo", headers=[(OVERRIDE, "victim")], body=b""
                    )
                    assert response.status == 200 and response.header("X-Backend") == "good"
            status = backend_status(proxy, "victim")
            assert not status["healthy"]
            assert "connect" in status["health_reason"]


def test_timeouts_on_live_traffic_mark_a_backend_down(good: BackendProcess, tmp_path: Path) -> None:
    with start_backend("sluggish") as sluggish:
        config = health_config([("good", good.url, 1), ("sluggish", sluggish.url, 1)])
        with start_tdproxy(config, tmp_path, wait_admin=True) as proxy:
            for number in range(3):
                assert backend_status(proxy, "sluggish")["healthy"], f"down after {number}"
                response = faulty_request(proxy, "sluggish", "/slow?ms=3000")
                assert_generated(response, 504)
            status = backend_status(proxy, "sluggish")
            assert not status["healthy"]
            assert "timeout" in status["health_reason"]


def test_broken_responses_alone_do_not_mark_a_backend_down(
    good: BackendProcess, tmp_path: Path
) -> None:
    """Issue 3 counts connect errors and timeouts; a backend that answers (badly) is up."""
    with start_backend("rude") as rude:
        config = health_config([("good", good.url, 1), ("rude", rude.url, 1)])
        with start_tdproxy(config, tmp_path, wait_admin=True) as proxy:
            for path in ["/garbage", "/reset-headers", "/garbage", "/reset-headers"]:
                assert_generated(faulty_request(proxy, "rude", path), 502)
            assert backend_status(proxy, "rude")["healthy"]


# ---------------------------------------------------------------------------------------------
# A backend killed under load


def test_a_backend_killed_under_a_steady_get_load_causes_no_client_visible_error(
    good: BackendProcess, tmp_path: Path
) -> None:
    with start_backend("doomed") as doomed:
        config = proxy_config(
            [("good", good.url, 1), ("doomed", doomed.url, 1)],
            health_check={"enabled": True, "interval": "500ms", "timeout": "300ms", "fall": 2},
            access_log={"enabled": False},
        )
        with start_tdproxy(config, tmp_path) as proxy:
            results: list[tuple[int, str | None]] = []
            errors: list[str] = []
            stop = threading.Event()

            def load() -> None:
                try:
                    with RawClient(proxy.host, proxy.port, timeout=10) as client:
                        while not stop.is_set():
                            response = client.request("GET", "/echo")
                            results.append((response.status, response.header("X-Backend")))
                except Exception as exc:
                    errors.append(repr(exc))

            threads = [threading.Thread(target=load) for _ in range(6)]
            for thread in threads:
                thread.start()
            try:
                wait_until(lambda: len(results) >= 300 or errors, timeout=20, message="warm-up")
                doomed.kill()
                killed_at = len(results)
                wait_until(
                    lambda: len(results) >= killed_at + 600 or errors,
                    timeout=30,
                    message="requests after the kill",
                )
            finally:
                stop.set()
                for thread in threads:
                    thread.join(15)
    assert not errors
    assert {status for status, _ in results} == {200}
    assert {name for _, name in results[:killed_at]} == {"good", "doomed"}
    assert {name for _, name in results[-100:]} == {"good"}
