"""HTTP/2 without sockets: a real ``h2`` client against H2ClientConnection on fake transports.

The client side is the ``h2`` package itself (as a browser's stack would frame things), the server
side is tdproxy's real HTTP/2 connection and streams over a real routing context and fake
upstream connections (``tests.fakes.sansio``), on a fake clock. Each test reads what the client
received (as h2 events) and what each backend received (as bytes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    ResponseReceived,
    StreamEnded,
    StreamReset,
)
from h2.settings import SettingCodes, Settings

from tdproxy.dataplane.exchange import PeerFields
from tdproxy.dataplane.h2_server import (
    CONTROL_FRAME_LIMIT,
    MAX_CONCURRENT_STREAMS,
    RESET_ALLOWANCE,
    H2ClientConnection,
)
from tdproxy.dataplane.upstream import UpstreamConnection
from tests.fakes.sansio import FakeTransport, Rig

GET = [
    (b":method", b"GET"),
    (b":scheme", b"https"),
    (b":authority", b"app.example"),
    (b":path", b"/"),
]
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


class H2Rig:
    """One HTTP/2 client connection in front of the fake upstreams of a :class:`Rig`."""

    def __init__(self, client_settings: dict[int, int] | None = None, **overrides: Any) -> None:
        self.rig = Rig(**overrides)
        self.ctx = self.rig.ctx
        self.transport = FakeTransport()
        self.conn = H2ClientConnection(self.ctx, b"192.0.2.7", PeerFields(b"192.0.2.7", b"https"))
        self.conn.connection_made(self.transport)  # type: ignore[arg-type]
        self.client = H2Connection(
            H2Configuration(
                client_side=True,
                header_encoding=None,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        self.client.initiate_connection()
        if client_settings:
            self.client.update_settings(client_settings)
        self.events: list[Event] = []
        self.reading = True
        self.pump()

    def pump(self) -> list[Event]:
        """Exchange bytes both ways until neither side has anything to send. While
        ``reading``, the client takes the data it gets (reopening the window, as a reading
        client does)."""
        new: list[Event] = []
        for _ in range(200):
            out = self.client.data_to_send()
            if out and not self.transport.ended:
                self.conn.data_received(out)
            back = self.transport.take()
            if back:
                events = self.client.receive_data(back)
                new.extend(events)
                if self.reading:
                    for event in events:
                        if isinstance(event, DataReceived) and event.stream_id:
                            length = event.flow_controlled_length or 0
                            self.client.acknowledge_received_data(length, event.stream_id)
            if not out and not back:
                break
        self.events.extend(new)
        return new

    def request(
        self, headers: list[tuple[bytes, bytes]] = GET, body: bytes | None = None, end: bool = True
    ) -> int:
        stream_id = self.client.get_next_available_stream_id()
        self.client.send_headers(stream_id, headers, end_stream=body is None and end)
        if body is not None:
            self.client.send_data(stream_id, body, end_stream=end)
        self.pump()
        return stream_id

    def upstreams(self) -> list[tuple[UpstreamConnection, FakeTransport]]:
        """Upstream connections carrying a stream now."""
        return [
            (up, transport)
            for up, transport in self.rig.upstreams
            if up.client is not None and not transport.ended
        ]

    def upstream(self) -> tuple[UpstreamConnection, FakeTransport]:
        busy = self.upstreams()
        assert len(busy) == 1, busy
        return busy[0]

    def respond(self, data: bytes, up: UpstreamConnection | None = None) -> list[Event]:
        (up or self.upstream()[0]).data_received(data)
        return self.pump()

    def advance(self, seconds: float) -> None:
        step = 0.25
        while seconds > 1e-9:
            delta = min(step, seconds)
            self.rig.clock.advance(delta)
            seconds -= delta
            self.conn.check_deadline(self.rig.clock.now)
        self.pump()

    def of(self, kind: type[Event], stream_id: int | None = None) -> list[Any]:
        return [
            e
            for e in self.events
            if isinstance(e, kind)
            and (stream_id is None or getattr(e, "stream_id", None) == stream_id)
        ]

    def body(self, stream_id: int) -> bytes:
        return b"".join(e.data for e in self.of(DataReceived, stream_id))

    def status(self, stream_id: int) -> int:
        [response] = self.of(ResponseReceived, stream_id)
        return int(dict(response.headers)[b":status"])


@pytest.fixture
def make() -> Iterator[Callable[..., H2Rig]]:
    made: list[H2Rig] = []

    def build(**overrides: Any) -> H2Rig:
        made.append(H2Rig(**overrides))
        return made[-1]

    yield build
    for rig in made:
        rig.rig.close()


@pytest.fixture
def h2rig(make: Callable[..., H2Rig]) -> H2Rig:
    return make()


TWO_BACKENDS = [
    {"name": "a", "url": "http://127.0.0.1:18091", "weight": 1},
    {"name": "b", "url": "http://127.0.0.1:18092", "weight": 1},
]


# -- requests and answers ---------------------------------------------------------------------


def test_a_get_is_sent_upstream_as_http11_and_answered_on_its_stream(h2rig: H2Rig) -> None:
    stream_id = h2rig.request()
    _, upstream = h2rig.upstream()
    head = upstream.take()
    assert head.startswith(b"GET / HTTP/1.1\r\nHost: app.example\r\n"), head
    assert b"X-Forwarded-Proto: https\r\n" in head
    assert b"X-Forwarded-For: 192.0.2.7\r\n" in head
    assert b"Transfer-Encoding" not in head and b"Content-Length" not in head
    h2rig.respond(OK)
    assert h2rig.status(stream_id) == 200
    assert h2rig.body(stream_id) == b"hello"
    assert h2rig.of(StreamEnded, stream_id)
    assert not h2rig.conn.streams
    assert h2rig.rig.upstreams[0][0] in h2rig.rig.endpoints.pools[0]._idle  # pooled again


def test_connection_specific_response_fields_are_dropped(h2rig: H2Rig) -> None:
    stream_id = h2rig.request()
    h2rig.respond(
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: 5\r\n"
        b"Transfer-Encoding: chunked\r\nX-Kept: yes\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    )
    [response] = h2rig.of(ResponseReceived, stream_id)
    names = {name for name, _ in response.headers}
    assert b"x-kept" in names
    assert not names & {b"connection", b"keep-alive", b"transfer-encoding", b"x-secret"}
    assert h2rig.body(stream_id) == b"abc"


def test_a_body_without_length_goes_upstream_chunked(h2rig: H2Rig) -> None:
    post = [(b":method", b"POST"), *GET[1:]]
    stream_id = h2rig.request(post, body=b"part one", end=False)
    _, upstream = h2rig.upstream()
    assert b"Transfer-Encoding: chunked\r\n" in upstream.written
    h2rig.client.send_data(stream_id, b"two", end_stream=True)
    h2rig.pump()
    assert upstream.take().endswith(b"\r\n\r\n8\r\npart one\r\n3\r\ntwo\r\n0\r\n\r\n")


def test_a_body_with_length_goes_upstream_as_is(h2rig: H2Rig) -> None:
    post = [(b":method", b"POST"), *GET[1:], (b"content-length", b"5")]
    h2rig.request(post, body=b"12345")
    _, upstream = h2rig.upstream()
    sent = upstream.take()
    assert b"Content-Length: 5\r\n" in sent and sent.endswith(b"\r\n\r\n12345")


def test_split_cookie_fields_are_joined_for_the_backend(h2rig: H2Rig) -> None:
    h2rig.request([*GET, (b"cookie", b"a=1"), (b"cookie", b"b=2")])
    _, upstream = h2rig.upstream()
    assert b"Cookie: a=1; b=2\r\n" in upstream.take()


@pytest.mark.parametrize(
    "field",
    [
        (b"x-evil", b"a\r\nX-Injected: 1"),
        (b"x-evil", b"a\nb"),
        (b"x-evil", b"a\x00b"),
    ],
)
def test_a_field_that_would_break_the_http11_head_never_reaches_a_backend(
    h2rig: H2Rig, field: tuple[bytes, bytes]
) -> None:
    stream_id = h2rig.request([*GET, field])
    assert not h2rig.upstreams()
    assert all(b"X-Injected" not in t.written for _, t in h2rig.rig.upstreams)
    refused = h2rig.of(ResponseReceived, stream_id)
    reset = h2rig.of(StreamReset, stream_id) or h2rig.of(ConnectionTerminated)
    assert reset or (refused and h2rig.status(stream_id) == 400)


@pytest.mark.parametrize("path", [b"/a b", b"/a\r\nX: y", b"/\x7f"])
def test_a_path_with_spaces_or_controls_is_refused(h2rig: H2Rig, path: bytes) -> None:
    headers = [*GET[:3], (b":path", path)]
    stream_id = h2rig.request(headers)
    assert not h2rig.upstreams()
    assert all(not t.written for _, t in h2rig.rig.upstreams)
    refused = h2rig.of(ResponseReceived, stream_id)
    reset = h2rig.of(StreamReset, stream_id) or h2rig.of(ConnectionTerminated)
    assert reset or (refused and h2rig.status(stream_id) == 400)


def test_limits_apply_as_on_http11(make: Callable[..., H2Rig]) -> None:
    rig = make(limits={"max_url_bytes": 64, "max_headers": 5, "max_body_bytes": 10})
    long_path = rig.request([*GET[:3], (b":path", b"/" + b"x" * 100)])
    assert rig.status(long_path) == 414
    many = rig.request([*GET, *[(b"x-%d" % i, b"v") for i in range(10)]])
    assert rig.status(many) == 431
    post = [(b":method", b"POST"), *GET[1:]]
    big = rig.request(post, body=b"x" * 20, end=False)
    assert rig.status(big) == 413
    assert not rig.upstreams()


def test_connect_is_refused(h2rig: H2Rig) -> None:
    rig = h2rig
    stream_id = rig.request([(b":method", b"CONNECT"), (b":authority", b"example.com:443")])
    assert rig.status(stream_id) == 405


# -- flow control -----------------------------------------------------------------------------


def test_a_slow_client_window_holds_the_backend_back_and_nothing_piles_up(
    make: Callable[..., H2Rig],
) -> None:
    rig = make(client_settings={SettingCodes.INITIAL_WINDOW_SIZE: 1000})
    rig.reading = False  # a client that reads nothing for now
    stream_id = rig.request()
    up, upstream = rig.upstream()
    body = bytes(range(256)) * 400  # 102,400 bytes, in two backend reads
    half = len(body) // 2
    rig.respond(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:half])
    assert len(rig.body(stream_id)) == 1000
    assert not upstream.reading  # the backend is held back while the client's window is shut
    [stream] = rig.conn.streams.values()
    assert len(stream._out) == half - 1000  # one backend read, nothing more
    rig.reading = True
    rig.client.acknowledge_received_data(1000, stream_id)  # it reads what it got, and on
    rig.pump()
    assert len(rig.body(stream_id)) == half
    assert upstream.reading  # all of it went out: the backend may send more
    rig.respond(body[half:], up)
    assert rig.of(StreamEnded, stream_id)
    assert rig.body(stream_id) == body


def test_client_send_resets_a_stream_whose_window_never_opens(
    make: Callable[..., H2Rig],
) -> None:
    rig = make(client_settings={SettingCodes.INITIAL_WINDOW_SIZE: 10})
    rig.reading = False
    stream_id = rig.request()
    _up, upstream = rig.upstream()
    rig.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100)
    rig.advance(5.5)  # past response_header (5s): the slow party is the client, not the backend
    assert not rig.of(StreamReset, stream_id)
    rig.advance(1.0)  # client_send is 6s
    [reset] = rig.of(StreamReset, stream_id)
    assert reset.error_code == ErrorCodes.CANCEL
    assert upstream.aborted
    assert not rig.conn.streams


def test_request_body_is_acknowledged_only_as_the_backend_takes_it(h2rig: H2Rig) -> None:
    post = [(b":method", b"POST"), *GET[1:]]
    stream_id = h2rig.request(post, body=b"a" * 1000, end=False)
    up, _ = h2rig.upstream()
    up.pause_writing()  # the backend's write buffer is full
    for _ in range(12):
        h2rig.client.send_data(stream_id, b"b" * 16384)
    h2rig.pump()
    window = h2rig.client.local_flow_control_window(stream_id)
    [stream] = h2rig.conn.streams.values()
    assert stream.unacked == 12 * 16384  # held: the client may not send more meanwhile
    h2rig.advance(4.5)  # past client_body: the backend holds the client back, no 408
    assert not h2rig.of(ResponseReceived, stream_id)
    up.resume_writing()
    h2rig.pump()
    assert stream.unacked == 0
    assert h2rig.client.local_flow_control_window(stream_id) > window  # reopened


# -- failures and deadlines -------------------------------------------------------------------


def test_a_backend_that_breaks_before_answering_gives_502(h2rig: H2Rig) -> None:
    post = [(b":method", b"POST"), *GET[1:]]  # not replayable: no retry
    stream_id = h2rig.request(post, body=b"x")
    up, _ = h2rig.upstream()
    up.connection_lost(ConnectionResetError())
    h2rig.pump()
    assert h2rig.status(stream_id) == 502


def test_an_idempotent_request_is_retried_on_the_other_backend(
    make: Callable[..., H2Rig],
) -> None:
    rig = make(backends=TWO_BACKENDS)
    stream_id = rig.request()
    up, _ = rig.upstream()
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Le")  # then reset: a broken response
    up.connection_lost(ConnectionResetError())
    rig.pump()
    retry, _ = rig.upstream()
    assert retry is not up
    rig.respond(OK, retry)
    assert rig.status(stream_id) == 200 and rig.body(stream_id) == b"hello"


def test_a_response_cut_after_data_left_resets_the_stream(h2rig: H2Rig) -> None:
    stream_id = h2rig.request()
    h2rig.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
    up, _ = h2rig.upstream()
    up.connection_lost(ConnectionResetError())
    h2rig.pump()
    assert h2rig.status(stream_id) == 200
    [reset] = h2rig.of(StreamReset, stream_id)
    assert reset.error_code == ErrorCodes.INTERNAL_ERROR
    assert not h2rig.of(StreamEnded, stream_id)  # never presented as complete


def test_response_header_deadline_gives_504(h2rig: H2Rig) -> None:
    stream_id = h2rig.request()
    h2rig.advance(4.5)
    assert not h2rig.of(ResponseReceived, stream_id)
    h2rig.advance(1.0)
    assert h2rig.status(stream_id) == 504


def test_a_request_body_that_stops_gets_408(h2rig: H2Rig) -> None:
    post = [(b":method", b"POST"), *GET[1:]]
    stream_id = h2rig.request(post, body=b"x", end=False)
    _up, upstream = h2rig.upstream()
    h2rig.advance(4.5)  # client_body is 4s, measured from the last DATA
    assert h2rig.status(stream_id) == 408
    assert upstream.aborted


def test_idle_closes_a_connection_with_no_stream(h2rig: H2Rig) -> None:
    h2rig.advance(9.5)
    assert not h2rig.transport.ended
    h2rig.advance(1.0)
    assert h2rig.transport.ended


def test_the_client_resetting_a_stream_aborts_its_backend_request(h2rig: H2Rig) -> None:
    stream_id = h2rig.request()
    _up, upstream = h2rig.upstream()
    h2rig.client.reset_stream(stream_id, ErrorCodes.CANCEL)
    h2rig.pump()
    assert upstream.aborted
    assert not h2rig.conn.streams


def frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """Raw frames (type, flags, stream id, payload): read past a GOAWAY, which the h2
    client package stops at."""
    found = []
    while data:
        length = int.from_bytes(data[:3], "big")
        kind, flags = data[3], data[4]
        stream_id = int.from_bytes(data[5:9], "big") & 0x7FFFFFFF
        found.append((kind, flags, stream_id, data[9 : 9 + length]))
        data = data[9 + length :]
    return found


def test_shutdown_sends_goaway_finishes_streams_in_flight_then_closes(h2rig: H2Rig) -> None:
    stream_id = h2rig.request()
    h2rig.ctx.shutting_down = True
    h2rig.conn.shutdown()
    [(kind, _, _, payload)] = frames(h2rig.transport.take())
    assert kind == 7  # GOAWAY
    assert int.from_bytes(payload[:4], "big") == stream_id  # the last stream it will answer
    assert int.from_bytes(payload[4:8], "big") == ErrorCodes.NO_ERROR
    assert not h2rig.transport.ended
    h2rig.upstream()[0].data_received(OK)
    sent = frames(h2rig.transport.take())
    assert [(kind, sid) for kind, _, sid, _ in sent] == [(1, stream_id), (0, stream_id)]
    assert sent[-1][3] == b"hello" and sent[-1][1] & 0x1  # DATA with END_STREAM
    assert h2rig.transport.ended


# -- hostile input ----------------------------------------------------------------------------


def test_rapid_reset_is_cut_off(h2rig: H2Rig) -> None:
    for _ in range(RESET_ALLOWANCE + 10):
        stream_id = h2rig.client.get_next_available_stream_id()
        h2rig.client.send_headers(stream_id, GET, end_stream=True)
        h2rig.client.reset_stream(stream_id, ErrorCodes.CANCEL)
        h2rig.pump()
        if h2rig.transport.ended:
            break
    [goaway] = h2rig.of(ConnectionTerminated)
    assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert h2rig.transport.ended


def test_a_ping_flood_is_cut_off(h2rig: H2Rig) -> None:
    for i in range(CONTROL_FRAME_LIMIT + 10):
        h2rig.client.ping(b"%08d" % i)
    h2rig.conn.data_received(h2rig.client.data_to_send())
    h2rig.client.receive_data(h2rig.transport.take())
    assert h2rig.transport.ended


def test_more_streams_than_advertised_end_the_connection(h2rig: H2Rig) -> None:
    # Pretend the client missed the limit (the h2 client itself would keep to it).
    h2rig.client.remote_settings = Settings(
        client=False, initial_values={SettingCodes.MAX_CONCURRENT_STREAMS: 1000}
    )
    for _ in range(MAX_CONCURRENT_STREAMS + 1):
        stream_id = h2rig.client.get_next_available_stream_id()
        h2rig.client.send_headers(stream_id, GET, end_stream=True)
    h2rig.conn.data_received(h2rig.client.data_to_send())
    assert h2rig.transport.ended


def test_a_header_list_that_inflates_past_the_limit_is_refused(h2rig: H2Rig) -> None:
    # HPACK bomb: one large field in the dynamic table, then referenced again and again.
    big = (b"x-bomb", b"b" * 4000)
    stream_id = h2rig.request([*GET, *[big] * 40])
    assert not h2rig.upstreams()
    assert h2rig.transport.ended or h2rig.of(StreamReset, stream_id)
