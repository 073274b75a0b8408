"""Fuzzing the request side: random and mutated request bytes through a real tdproxy process in
front of a real fake backend, checking what must hold whatever a client sends.

Theory of operation
-------------------
One tdproxy and one fake backend serve the whole module. Hypothesis draws batches of cases; a
case is a request (or a pipelined pair) from a small corpus of valid ones, each tagged with a
unique ``X-Request-Id`` line, then mutated: bit flips, inserted CR/LF/NUL/space/colon/tab bytes,
deletions, truncation, duplicated header lines, swapped framing tokens. Some cases are plain
random bytes. The cases of a batch are sent at once, each on a fresh connection that is
half-closed after the write, and read until the proxy closes or goes quiet for a moment.

Invariants, checked after every batch:

* no exception escapes: the proxy process is alive and its stderr has no ``Traceback`` and no
  ``internal error``; it never answers 500;
* a refusal is final: nothing follows a 4xx that tdproxy produced itself on that connection;
* nothing is mixed up: a response echoes an id of its own case, never another case's;
* liveness: every case is sent behind an intact request (``FRONT``) in the same write; that
  request is answered first, by the backend, whatever follows it, and once the batch's clients
  have left, ``tdproxy_connections_active`` returns to 0 (nothing is left half-open);
* no request reaches the backend that the proxy answered with a 4xx. Each refused id whose
  header line survived the mutation intact is looked up in the ids the backend recorded (after a
  sentinel request proves the backend has caught up).

That last invariant has one known exception, which an oracle (llhttp itself, run in this
process on the same bytes) recognises and which is counted rather than failed: a body that goes
wrong (or never ends) after its head was already streamed upstream. tdproxy does not buffer
bodies, so a bad chunk that arrives in a later read than the head is found only after the head
went out. (One in the same read is refused before anything is sent:
``test_a_bad_chunk_in_the_same_read_as_the_head_is_never_forwarded`` in
``tests/integration/test_hostile_requests.py``.) Cases here are sent in one write, so on loopback
they almost always arrive in one read; ``TDPROXY_FUZZ_STRICT=1`` fails on the exception too.

The bounded run here is part of the suite (derandomized, so CI sees the same cases every time);
``scripts/fuzz`` runs a long, random one with progress reports.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import select
import socket
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httptools
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

from tests.fakes.client import RawClient, metric
from tests.fakes.process import (
    BackendProcess,
    ProxyProcess,
    proxy_config,
    start_backend,
    start_tdproxy,
    wait_until,
)

# On a failure Hypothesis drafts a patch with libcst, whose import warns (a DeprecationWarning
# from mypy_extensions) on some installs; under -W error that would replace the failure report
# with an INTERNALERROR. Importing it quietly now makes the later import a no-op.
with warnings.catch_warnings(), contextlib.suppress(ImportError):
    warnings.simplefilter("ignore", DeprecationWarning)
    import hypothesis.extra._patching  # noqa: F401

CASES = int(os.environ.get("TDPROXY_FUZZ_EXAMPLES", "2000"))
LONG_RUN = "TDPROXY_FUZZ_EXAMPLES" in os.environ
STRICT = os.environ.get("TDPROXY_FUZZ_STRICT") == "1"
DATABASE = os.environ.get("TDPROXY_FUZZ_DB")  # a directory to keep failing examples in
BATCH = 8  # cases per Hypothesis example, sent concurrently
QUIET = 0.25  # a case is over once the proxy has said nothing for this long
CASE_LIMIT = 3.0  # and in any event after this long

MAX_HEADER_BYTES = 2048
MAX_HEADERS = 24
MAX_URL_BYTES = 256
MAX_BODY_BYTES = 4096

ID_HEADER = b"X-Request-Id: "
# The intact request every case is sent behind.
FRONT = b"GET /echo?front HTTP/1.1\r\nHost: h\r\nX-Request-Id: %s\r\n\r\n"
CONNECTIONS_GONE = 10.0  # seconds for the proxy to let go of a batch's connections


# ---------------------------------------------------------------------------------------------
# Processes


@dataclass
class Harness:
    proxy: ProxyProcess
    backend: BackendProcess
    pool: ThreadPoolExecutor
    # Ids are unique across runs too, so that nothing another test session sends can pass for
    # one of this run's requests.
    run: str = field(default_factory=lambda: os.urandom(4).hex())
    ids: itertools.count[int] = field(default_factory=itertools.count)
    issued: set[str] = field(default_factory=set)  # every id any case was tagged with
    stats: Counter[str] = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)
    paths: Counter[str] = field(default_factory=Counter)  # the backend's requests by path
    new_paths: Counter[str] = field(default_factory=Counter)  # ... added by the last batch

    def __repr__(self) -> str:
        return f"<Harness {self.proxy!r} {self.backend!r}>"

    def new_id(self) -> str:
        request_id = f"fz{self.run}{next(self.ids):07d}"
        self.issued.add(request_id)
        return request_id


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    with start_backend("fuzz-origin") as backend:
        config = proxy_config(
            [("origin", backend.url, 1)],
            limits={
                "max_header_bytes": MAX_HEADER_BYTES,
                "max_headers": MAX_HEADERS,
                "max_url_bytes": MAX_URL_BYTES,
                "max_body_bytes": MAX_BODY_BYTES,
            },
            timeouts={"client_header": "500ms", "client_body": "500ms", "response_header": "2s"},
        )
        with (
            start_tdproxy(config, tmp_path_factory.mktemp("fuzz"), wait_admin=True) as proxy,
            ThreadPoolExecutor(max_workers=BATCH) as pool,
        ):
            yield Harness(proxy, backend, pool)


# ---------------------------------------------------------------------------------------------
# The corpus: valid requests, each with its id line; ``{id}`` is filled in per case.


def _request(head: str, body: bytes = b"") -> bytes:
    return head.replace("\n", "\r\n").encode("latin-1") + body


CHUNKED_BODY = b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
CORPUS: list[list[bytes]] = [
    [_request("GET / HTTP/1.1\nHost: h\nX-Request-Id: {id}\n\n")],
    [
        _request(
            "GET /echo?a=1&b=%20 HTTP/1.1\nHost: example.test\nUser-Agent: fuzz/1.0\n"
            "Accept: */*\nCookie: a=b; c=d\nX-Request-Id: {id}\nX-Forwarded-For: 10.0.0.1\n\n"
        )
    ],
    [
        _request(
            "POST /upload HTTP/1.1\nHost: h\nX-Request-Id: {id}\nContent-Type: text/plain\n"
            "Content-Length: 11\n\n",
            b"hello world",
        )
    ],
    [
        _request(
            "POST /echo HTTP/1.1\nHost: h\nTransfer-Encoding: chunked\nX-Request-Id: {id}\n\n",
            CHUNKED_BODY,
        )
    ],
    [
        _request(
            "PUT /upload HTTP/1.1\nHost: h\nContent-Length: 3\nX-Request-Id: {id}\n\n", b"abc"
        ),
    ],
    [_request("GET http://h.example/echo?x HTTP/1.1\nHost: other\nX-Request-Id: {id}\n\n")],
    [_request("GET /echo HTTP/1.0\nConnection: keep-alive\nX-Request-Id: {id}\n\n")],
    [_request("OPTIONS * HTTP/1.1\nHost: h\nX-Request-Id: {id}\n\n")],
    [
        _request(
            "GET /echo HTTP/1.1\nHost: h\nConnection: Upgrade, HTTP2-Settings\nUpgrade: h2c\n"
            "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\nX-Request-Id: {id}\n\n"
        )
    ],
    [
        _request(
            "POST /continue HTTP/1.1\nHost: h\nExpect: 100-continue\nContent-Length: 4\n"
            "X-Request-Id: {id}\n\n",
            b"data",
        )
    ],
    # Just inside the limits, so that small mutations cross them (414, 431, 413).
    [
        _request(
            f"GET /echo?{'q' * (MAX_URL_BYTES - 7)} HTTP/1.1\nHost: h\nX-Request-Id: {{id}}\n\n"
        )
    ],
    [
        _request(
            "GET /echo HTTP/1.1\nHost: h\nX-Request-Id: {id}\n"
            + "".join(f"X-H{n}: v\n" for n in range(MAX_HEADERS - 3))
            + f"X-Pad: {'p' * (MAX_HEADER_BYTES - 400)}\n\n"
        )
    ],
    [
        _request(
            f"POST /upload HTTP/1.1\nHost: h\nContent-Length: {MAX_BODY_BYTES}\n"
            "X-Request-Id: {id}\n\n",
            b"b" * MAX_BODY_BYTES,
        )
    ],
    [
        _request(
            "POST /upload HTTP/1.1\nHost: h\nTransfer-Encoding: chunked\nX-Request-Id: {id}\n\n",
            b"800\r\n" + b"c" * 2048 + b"\r\n7ff\r\n" + b"c" * 2047 + b"\r\n0\r\n\r\n",
        )
    ],
    [_request("CONNECT h:443 HTTP/1.1\nHost: h:443\nX-Request-Id: {id}\n\n")],
    # Pipelined pairs.
    [
        _request("GET /echo?first HTTP/1.1\nHost: h\nX-Request-Id: {id}\n\n"),
        _request(
            "POST /upload HTTP/1.1\nHost: h\nContent-Length: 5\nX-Request-Id: {id}\n\n", b"12345"
        ),
    ],
    [
        _request(
            "POST /upload HTTP/1.1\nHost: h\nTransfer-Encoding: chunked\nX-Request-Id: {id}\n\n",
            CHUNKED_BODY,
        ),
        _request("GET /echo?second HTTP/1.1\nHost: h\nX-Request-Id: {id}\n\n"),
    ],
    [
        _request("GET / HTTP/1.1\nHost: h\nX-Request-Id: {id}\n\n"),
        _request("GET /echo HTTP/1.1\nHost: h\nConnection: close\nX-Request-Id: {id}\n\n"),
    ],
    [
        _request("GET /echo HTTP/1.1\nHost: h\nConnection: close\nX-Request-Id: {id}\n\n"),
        _request("GET / HTTP/1.1\nHost: h\nX-Request-Id: {id}\n\n"),
    ],
    [
        _request("GET /echo HTTP/1.0\nX-Request-Id: {id}\n\n"),
        _request(
            "POST /upload HTTP/1.1\nHost: h\nContent-Length: 2\nX-Request-Id: {id}\n\n", b"ok"
        ),
    ],
]

INSERTABLE = [b"\r", b"\n", b"\r\n", b"\x00", b" ", b"\t", b":", b",", b";", b"\x7f", b"\xff"]
TOKENS = [
    b"chunked",
    b"Content-Length",
    b"Transfer-Encoding",
    b"HTTP/1.1",
    b"Host",
    b"\r\n\r\n",
    b": ",
    b"11",
    b"5",
]
REPLACEMENTS = [
    b"",
    b"Chunked",
    b"chunked, identity",
    b"identity, chunked",
    b"xchunked",
    b"Content-Length: 5\r\nTransfer-Encoding",
    b"Transfer-Encoding: chunked\r\nContent-Length",
    b"HTTP/1.0",
    b"HTTP/2.0",
    b"HTTP/1.1\r\nHost: x",
    b"Host: y\r\nHost",
    b"\n\n",
    b" : ",
    b"-1",
    b"0x5",
    b"99999999999999999999",
    b"ffffffffffffffff",
    b"\r\n \r\n",
]


# ---------------------------------------------------------------------------------------------
# Cases and mutations


@dataclass
class Case:
    data: bytes
    ids: list[str]  # ids whose header line survived the mutation intact
    front: str = ""  # the id of the intact request sent ahead of ``data``

    @property
    def wire(self) -> bytes:
        return FRONT % self.front.encode() + self.data


def _position(data: bytes, where: int) -> int:
    return where % (len(data) + 1)


def mutate(data: bytes, mutation: tuple[Any, ...]) -> bytes:
    kind, where, arg = mutation
    if not data:
        return data
    at = _position(data, where)
    if kind == "flip":
        at = min(at, len(data) - 1)
        return data[:at] + bytes([data[at] ^ (1 << arg % 8)]) + data[at + 1 :]
    if kind == "insert":
        return data[:at] + arg + data[at:]
    if kind == "delete":
        return data[:at] + data[at + arg :]
    if kind == "truncate":
        return data[:at]
    if kind == "duplicate-line":
        lines = data.split(b"\r\n")
        index = where % len(lines)
        return b"\r\n".join([*lines[: index + 1], lines[index], *lines[index + 1 :]])
    if kind == "replace-token":
        token = TOKENS[where % len(TOKENS)]
        return data.replace(token, arg, 1)
    raise AssertionError(kind)


mutations = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 7)),
    st.tuples(
        st.just("insert"),
        st.integers(0, 10**6),
        st.one_of(st.sampled_from(INSERTABLE), st.binary(min_size=1, max_size=4)),
    ),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 8)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("duplicate-line"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("replace-token"), st.integers(0, 10**6), st.sampled_from(REPLACEMENTS)),
)

Blueprint = tuple[int, list[tuple[Any, ...]]] | bytes
blueprints = st.one_of(
    st.tuples(st.integers(0, len(CORPUS) - 1), st.lists(mutations, min_size=0, max_size=4)),
    st.tuples(st.integers(0, len(CORPUS) - 1), st.lists(mutations, min_size=1, max_size=12)),
    st.binary(min_size=1, max_size=300),
)


def build_case(harness: Harness, blueprint: Blueprint) -> Case:
    if isinstance(blueprint, bytes):
        return Case(blueprint, [], harness.new_id())
    index, steps = blueprint
    ids = []
    parts = []
    for template in CORPUS[index]:
        request_id = harness.new_id()
        ids.append(request_id)
        parts.append(template.replace(b"{id}", request_id.encode()))
    data = b"".join(parts)
    for step in steps:
        data = mutate(data, step)
    intact = [i for i in ids if b"\r\n" + ID_HEADER + i.encode() + b"\r\n" in data]
    return Case(data, intact, harness.new_id())


# ---------------------------------------------------------------------------------------------
# Sending a case and reading what came back


@dataclass
class Reply:
    status: int
    headers: dict[str, list[str]]

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None

    @property
    def from_backend(self) -> bool:
        return self.header("x-backend") is not None


def send_case(proxy: ProxyProcess, data: bytes) -> tuple[bytes, bool]:
    """Send ``data``, half-close, read until the proxy closes or goes quiet; (bytes, closed)."""
    received = bytearray()
    with socket.create_connection((proxy.host, proxy.port), timeout=CASE_LIMIT) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the proxy refused and closed before reading everything: read what it said
        deadline = time.monotonic() + CASE_LIMIT
        while time.monotonic() < deadline:
            if not select.select([sock], [], [], QUIET)[0]:
                return bytes(received), False
            try:
                chunk = sock.recv(65536)
            except OSError:
                return bytes(received), True
            if not chunk:
                return bytes(received), True
            received += chunk
    return bytes(received), False


def parse_replies(data: bytes) -> list[Reply]:
    """The complete responses at the start of ``data`` (1xx interim ones skipped)."""
    replies: list[Reply] = []
    rest = data
    while True:
        end = rest.find(b"\r\n\r\n")
        if end < 0:
            return replies
        lines = rest[:end].decode("latin-1").split("\r\n")
        rest = rest[end + 4 :]
        match = re.match(r"HTTP/1\.[01] (\d{3})", lines[0])
        if match is None:
            return replies
        status = int(match.group(1))
        headers: dict[str, list[str]] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        if 100 <= status < 200 and status != 101:
            continue
        reply = Reply(status, headers)
        if status in (101, 204, 304):
            replies.append(reply)
            if status == 101:
                return replies
            continue
        if "chunked" in ",".join(headers.get("transfer-encoding", [])).lower():
            body_end = _chunked_end(rest)
            if body_end is None:
                return replies
            rest = rest[body_end:]
        elif "content-length" in headers:
            length = int(headers["content-length"][0])
            if len(rest) < length:
                return replies
            rest = rest[length:]
        else:
            rest = b""
        replies.append(reply)


def _chunked_end(data: bytes) -> int | None:
    at = 0
    while True:
        line_end = data.find(b"\r\n", at)
        if line_end < 0:
            return None
        size = int(data[at:line_end].split(b";")[0], 16)
        at = line_end + 2
        if size == 0:
            end = data.find(b"\r\n\r\n", at - 2)
            return None if end < 0 else end + 4
        at += size + 2
        if at > len(data):
            return None


# ---------------------------------------------------------------------------------------------
# The oracle: what llhttp itself makes of a case's bytes


@dataclass
class OracleMessage:
    request_id: str | None = None
    head_done: bool = False
    done: bool = False
    chunked: bool = False
    body: int = 0
    failed: bool = False  # llhttp found an error while this message was being parsed


class Oracle:
    def __init__(self, data: bytes) -> None:
        self.messages: list[OracleMessage] = []
        self._parser = httptools.HttpRequestParser(self)
        with contextlib.suppress(httptools.HttpParserUpgrade):
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserError:
                if self.messages and not self.messages[-1].done:
                    self.messages[-1].failed = True

    def on_message_begin(self) -> None:
        self.messages.append(OracleMessage())

    def on_header(self, name: bytes, value: bytes) -> None:
        message = self.messages[-1]
        lowered = name.lower()
        if lowered == b"x-request-id" and message.request_id is None:
            message.request_id = value.decode("latin-1")
        elif lowered == b"transfer-encoding":
            message.chunked = True

    def on_headers_complete(self) -> None:
        self.messages[-1].head_done = True

    def on_body(self, body: bytes) -> None:
        self.messages[-1].body += len(body)

    def on_message_complete(self) -> None:
        self.messages[-1].done = True

    def known_exception(self, request_id: str) -> str | None:
        """Why the proxy may have sent this refused request's head upstream, if it may."""
        for message in self.messages:
            if message.request_id != request_id:
                continue
            if not message.head_done:
                return None
            if not message.done:
                return "body-after-head" if message.failed else "body-never-finished"
            if message.chunked and message.body > MAX_BODY_BYTES:
                return "body-after-head"
            return None
        return None


# ---------------------------------------------------------------------------------------------
# The invariants


@dataclass
class Verdict:
    refused: list[str] = field(default_factory=list)  # intact ids the proxy answered with 4xx
    problems: list[str] = field(default_factory=list)


def judge(harness: Harness, case: Case, data: bytes, closed: bool) -> Verdict:
    verdict = Verdict()
    replies = parse_replies(data)
    if not replies or replies[0].header("x-request-id") != case.front:
        first = replies[0].status if replies else None
        verdict.problems.append(f"the intact request ahead was not answered first (got {first})")
    replies = replies[1:]
    echoed = set()
    for number, reply in enumerate(replies):
        harness.stats[f"status {reply.status}"] += 1
        if reply.status == 500:
            verdict.problems.append("500 internal error")
        if reply.from_backend:
            request_id = reply.header("x-request-id")
            if request_id is not None:
                echoed.add(request_id)
                if request_id in harness.issued and request_id not in ids_in(case.wire):
                    verdict.problems.append(f"response for another case: {request_id}")
            elif reply.status == 400:
                # The backend's own strict parser refused what the proxy sent it: the proxy
                # forwarded something that is not HTTP/1.1.
                verdict.problems.append("the backend refused a request the proxy forwarded")
        elif 400 <= reply.status < 500:
            if number != len(replies) - 1:
                verdict.problems.append(f"a response followed the proxy's {reply.status}")
            if "close" not in (reply.header("connection") or "").lower():
                verdict.problems.append(f"the proxy's {reply.status} without Connection: close")
            if closed:
                verdict.refused = [i for i in case.ids if i not in echoed]
    return verdict


def ids_in(data: bytes) -> set[str]:
    """Every id-shaped string in a case's bytes: its own ids, intact or mutated into another."""
    return {match.decode() for match in re.findall(rb"fz[0-9a-f]{8}\d{7}", data)}


def settle(harness: Harness) -> set[str]:
    """Send a sentinel; once the backend has seen it, return every id it has recorded."""
    sentinel = harness.new_id()
    with RawClient(harness.proxy.host, harness.proxy.port) as client:
        response = client.request("GET", "/", headers=[("X-Request-Id", sentinel)])
    assert response.status == 200, "the proxy stopped serving normal requests"
    wait_until(lambda: harness.backend.saw_request_id(sentinel), timeout=10, message="sentinel")
    stats = harness.backend.stats()
    paths = Counter(stats["requests_by_path"])
    harness.new_paths = paths - harness.paths
    harness.paths = paths
    seen = set(stats["request_ids"])
    if len(seen) > 5000:
        harness.backend.reset_stats()
        harness.paths = Counter()
    return seen


def check_process(harness: Harness) -> None:
    proxy = harness.proxy
    assert proxy.running, f"tdproxy exited with {proxy.returncode}"
    stderr = proxy.stderr_text()
    for marker in ("Traceback", "internal error"):
        assert marker not in stderr, stderr[-4000:]


def report_progress(harness: Harness, cases: int) -> None:
    every = 1000
    if LONG_RUN and cases // every != (cases - BATCH) // every:
        elapsed = time.monotonic() - harness.started
        summary = ", ".join(f"{key}: {value}" for key, value in sorted(harness.stats.items()))
        print(f"[fuzz] {cases} cases in {elapsed:.0f}s; {summary}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The fuzz target


@settings(
    max_examples=max(1, -(-CASES // BATCH)),
    deadline=None,
    derandomize=not LONG_RUN,
    database=DirectoryBasedExampleDatabase(DATABASE) if DATABASE else None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
)
@given(batch=st.lists(blueprints, min_size=BATCH, max_size=BATCH))
def test_fuzzed_requests_keep_every_invariant(harness: Harness, batch: list[Blueprint]) -> None:
    cases = [build_case(harness, blueprint) for blueprint in batch]
    outcomes = list(harness.pool.map(lambda case: send_case(harness.proxy, case.wire), cases))
    harness.stats["cases"] += len(cases)
    problems: list[str] = []
    refused: dict[str, tuple[Case, bytes]] = {}
    for case, (data, closed) in zip(cases, outcomes, strict=True):
        verdict = judge(harness, case, data, closed)
        problems += [f"{problem} in case {case.data!r}" for problem in verdict.problems]
        refused.update({request_id: (case, data) for request_id in verdict.refused})
    harness.stats["refused ids"] += len(refused)
    check_process(harness)
    # Every case's client has left: the proxy must let go of every connection by itself.
    wait_until(
        lambda: metric(harness.proxy.admin_url, "tdproxy_connections_active") == 0,
        timeout=CONNECTIONS_GONE,
        message=f"no connection left open after the batch {[c.wire for c in cases]!r}",
    )
    seen = settle(harness)
    for request_id, (case, answer) in refused.items():
        if request_id not in seen:
            continue
        reason = Oracle(case.data).known_exception(request_id)
        if reason is not None and not STRICT:
            harness.stats[f"known: {reason}"] += 1
            continue
        problems.append(
            f"{request_id} was refused but reached the backend ({reason}): sent {case.data!r}, "
            f"got {answer[:300]!r}; the backend's new requests by path: {dict(harness.new_paths)}"
        )
    report_progress(harness, harness.stats["cases"])
    assert not problems, "\n".join(problems)


def test_the_proxy_still_serves_after_the_fuzzing(harness: Harness) -> None:
    check_process(harness)
    with RawClient(harness.proxy.host, harness.proxy.port) as client:
        for _ in range(3):
            response = client.request("POST", "/upload", body=b"after the storm")
            assert response.status == 200
            assert response.json()["body_len"] == len(b"after the storm")
    print(f"[fuzz] totals: {dict(sorted(harness.stats.items()))}", file=sys.stderr)


def test_the_oracle_tells_head_errors_from_body_errors() -> None:
    """The exceptions above must not swallow what they should not: the oracle's verdicts."""
    head_error = Oracle(b"GET / HTTP/1.1\r\nHost: h\r\nX-Request-Id: a\r\nBad Name: x\r\n\r\n")
    assert head_error.known_exception("a") is None
    body_error = Oracle(
        b"POST / HTTP/1.1\r\nHost: h\r\nX-Request-Id: b\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
    )
    assert body_error.known_exception("b") == "body-after-head"
    complete = Oracle(b"GET / HTTP/1.1\r\nX-Request-Id: c\r\n\r\n")  # no Host: a proxy check
    assert complete.known_exception("c") is None
    after_close = Oracle(
        b"GET / HTTP/1.0\r\nX-Request-Id: d\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n"
    )
    assert after_close.known_exception("d") is None
    unfinished = Oracle(
        b"POST / HTTP/1.1\r\nHost: h\r\nX-Request-Id: e\r\nContent-Length: 9\r\n\r\nab"
    )
    assert unfinished.known_exception("e") == "body-never-finished"


def test_the_reply_parser_reads_what_the_proxy_sends() -> None:
    data = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nX-Backend: b\r\nX-Request-Id: fz0000001\r\nContent-Length: 2\r\n\r\nok"
        b"HTTP/1.1 200 OK\r\nX-Backend: b\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
        b"HTTP/1.1 400 Bad Request\r\nContent-Length: 3\r\nConnection: close\r\n\r\nbad"
    )
    replies = parse_replies(data)
    assert [reply.status for reply in replies] == [200, 200, 400]
    assert [reply.from_backend for reply in replies] == [True, True, False]
    assert parse_replies(data[:-1])[-1].status == 200  # an incomplete one is not counted
