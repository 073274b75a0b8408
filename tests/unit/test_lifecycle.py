"""The hot path's lifecycle, driven without sockets: fake transports and a fake clock.

Each case drives a real ``ClientConnection`` (with real ``UpstreamConnection``s behind a real
router) through one combination of pipelining, refusals, 1xx answers, backpressure, deadlines and
a client or backend that leaves at some phase, then checks what must hold in every combination:

* the connection reaches a terminal state (its transport is closed or aborted, and after
  ``connection_lost`` it is CLOSED and counted nowhere), within the bound its deadlines give;
* every complete request before a refusal is answered, in order, before the refusal;
* a deadline fires when its state's timeout has passed on the fake clock, and not before;
* nothing is left in flight on any backend.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

import httptools
import pytest

from tdproxy.dataplane.lifecycle import (
    CONNECTION_TRANSITIONS,
    EXCHANGE_STATES,
    EXCHANGE_TRANSITIONS,
)
from tests.fakes.sansio import FakeTransport, Rig

GET = b"GET /%d HTTP/1.1\r\nHost: app\r\n\r\n"
POST = b"POST /%d HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\n\r\nhello"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

# Requests tdproxy refuses, and the status it answers with.
REFUSED = {
    "space in a field name": (b"GET /r HTTP/1.1\r\nHost: app\r\nBad Header: x\r\n\r\n", 400),
    "long target": (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: app\r\n\r\n", 414),
    "CL and TE": (
        b"POST /r HTTP/1.1\r\nHost: app\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "bad chunk size": (
        b"POST /r HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        400,
    ),
    "bare LF": (b"GET /r HTTP/1.1\nHost: app\n\n", 400),
    "no Host": (b"GET /r HTTP/1.1\r\n\r\n", 400),
    "CONNECT": (b"CONNECT app:443 HTTP/1.1\r\nHost: app:443\r\n\r\n", 405),
}


# -- reading what the client got -----------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    complete: bool = False

    def header(self, name: bytes) -> bytes | None:
        return next((v for n, v in self.headers if n.lower() == name.lower()), None)


@dataclass
class _Replies:
    replies: list[Reply] = field(default_factory=list)
    _headers: list[tuple[bytes, bytes]] = field(default_factory=list)

    def on_message_begin(self) -> None:
        self._headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.replies.append(Reply(self.parser.get_status_code(), self._headers))

    def on_body(self, body: bytes) -> None:
        self.replies[-1].body += body

    def on_message_complete(self) -> None:
        self.replies[-1].complete = True

    parser: httptools.HttpResponseParser = None  # type: ignore[assignment]


def replies(data: bytes) -> list[Reply]:
    """The responses in ``data``, in order; the last may be incomplete."""
    sink = _Replies()
    sink.parser = httptools.HttpResponseParser(sink)
    sink.parser.feed_data(data)
    return sink.replies


def statuses(data: bytes) -> list[int]:
    return [r.status for r in replies(data) if r.complete]


# -- driving a rig to its end ----------------------------------------------------------------------


def settle(rig: Rig, seconds: float = 120.0) -> float:
    """Advance the clock until the client transport ends (then report ``connection_lost``, as
    asyncio would) and every upstream transport has ended; returns the seconds it took.
    Fails when the connection is still open after ``seconds``."""
    waited = 0.0
    while waited < seconds:
        if rig.transport.ended:
            break
        rig.advance(0.25)
        waited += 0.25
    else:
        pytest.fail(f"the connection never ended: {rig.client!r} after {seconds}s")
    rig.lose()
    assert_terminal(rig)
    return waited


def assert_terminal(rig: Rig) -> None:
    assert rig.state == "CLOSED", rig.client
    assert rig.client not in rig.ctx.connections
    for up, transport in rig.upstreams:
        if up.client is rig.client:
            pytest.fail(f"{up!r} still serves the closed connection")
        if transport.ended:
            up.connection_lost(None)
    for target in rig.router.table.targets:
        assert target.state.in_flight == 0, target


def answer_all(rig: Rig, limit: int = 20) -> None:
    """Answer every request that reaches a backend with ``OK``, one after another."""
    for _ in range(limit):
        try:
            up, transport = rig.busy_upstream()
        except AssertionError:
            return
        transport.take()
        up.data_received(OK)


@pytest.fixture
def rig() -> Iterator[Rig]:
    made = Rig()
    yield made
    made.close()


# -- the transition tables -----------------------------------------------------------------------


def test_terminal_states_have_no_way_out_and_every_state_has_an_entry() -> None:
    for table in (CONNECTION_TRANSITIONS, EXCHANGE_TRANSITIONS):
        reachable = set().union(*table.values()) | {0}
        assert reachable == set(table), "a state nothing leads to"
    assert EXCHANGE_TRANSITIONS[EXCHANGE_STATES.index("DONE")] == frozenset()
    assert EXCHANGE_TRANSITIONS[EXCHANGE_STATES.index("ABORTED")] == frozenset()


def test_a_transition_the_table_forbids_is_a_bug_that_closes_the_connection(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    rig.client.move(7)  # CLOSING: allowed from IDLE
    rig.client.move(0)  # CLOSING -> IDLE: not allowed
    assert rig.transport.aborted
    assert "bug: connection state CLOSING -> IDLE" in caplog.text


def test_an_upstream_event_in_the_wrong_state_is_a_bug(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    rig.send(GET % 1)
    rig.client.upstream_body(b"body before any head")
    assert rig.transport.aborted
    assert "bug: upstream body outside RELAYING" in caplog.text
    settle(rig)


# -- pipelining x refusal position x refusal kind ------------------------------------------------


@pytest.mark.parametrize("kind", sorted(REFUSED))
@pytest.mark.parametrize("ahead", [0, 1, 3])
def test_a_refusal_is_answered_after_every_complete_request_ahead_of_it(
    rig: Rig, kind: str, ahead: int
) -> None:
    refused, code = REFUSED[kind]
    rig.send(b"".join(GET % i for i in range(ahead)) + refused)  # one read
    answer_all(rig)
    got = replies(bytes(rig.transport.written))
    assert [r.status for r in got] == [200] * ahead + [code]
    assert all(r.complete for r in got)
    assert got[-1].header(b"Connection") == b"close"
    assert all(r.header(b"Connection") is None for r in got[:-1])
    assert rig.state == "LINGER"  # the refusal is out; the write side is shut
    assert rig.transport.eof_written
    waited = settle(rig)
    assert waited <= 2.5  # LINGER_SECONDS, on the sweeper's quarter-second steps


@pytest.mark.parametrize("kind", ["space in a field name", "bad chunk size", "bare LF"])
def test_a_refusal_behind_a_request_in_another_read_waits_for_its_answer(
    rig: Rig, kind: str
) -> None:
    rig.send(GET % 1)
    up, _ = rig.busy_upstream()
    rig.send(REFUSED[kind][0])
    assert rig.transport.written == b""  # nothing before the first answer
    assert rig.state == "ENDING"
    up.data_received(OK)
    assert statuses(bytes(rig.transport.written)) == [200, REFUSED[kind][1]]
    settle(rig)


@pytest.mark.parametrize("leaves", ["eof", "reset"])
def test_a_client_that_leaves_right_after_a_refused_pipeline_is_let_go(
    rig: Rig, leaves: str
) -> None:
    """The remote denial of service: GET + refused request in one write, then the client goes."""
    rig.send(GET % 1 + REFUSED["space in a field name"][0])
    if leaves == "eof":
        assert rig.client.eof_received() is True  # the answers owed still go out
        answer_all(rig)
        assert statuses(bytes(rig.transport.written)) == [200, 400]
        assert rig.transport.closed  # no lingering: nothing more can arrive
        settle(rig)
    else:
        rig.lose(ConnectionResetError())
        assert_terminal(rig)


def test_eof_in_a_queued_body_still_answers_the_requests_ahead(rig: Rig) -> None:
    rig.send(GET % 1 + b"POST /2 HTTP/1.1\r\nHost: app\r\nContent-Length: 10\r\n\r\nab")
    assert rig.client.eof_received() is True
    answer_all(rig)
    assert statuses(bytes(rig.transport.written)) == [200]
    settle(rig)


def test_refused_in_the_same_read_as_its_own_head_nothing_reaches_a_backend(rig: Rig) -> None:
    rig.send(REFUSED["bad chunk size"][0])
    assert all(transport.written == b"" for _, transport in rig.upstreams)
    assert statuses(bytes(rig.transport.written)) == [400]
    settle(rig)


def test_garbage_before_any_request_is_refused_and_closed(rig: Rig) -> None:
    rig.send(b"\x00\x01\x02 nothing like HTTP\r\n\r\n")
    assert statuses(bytes(rig.transport.written)) == [400]
    settle(rig)


# -- deadlines, each on its own ------------------------------------------------------------------


def test_idle_deadline(rig: Rig) -> None:
    rig.advance(9.75)
    assert not rig.transport.ended
    rig.advance(0.5)
    assert rig.transport.closed
    settle(rig)


def test_client_header_is_a_deadline_for_the_whole_head(rig: Rig) -> None:
    rig.send(b"GET / HTTP/1.1\r\n")
    for _ in range(5):  # trickling in does not extend it
        rig.advance(0.5)
        rig.send(b"X-A: b\r\n")
    rig.advance(0.75)
    assert statuses(bytes(rig.transport.written)) == [408]
    settle(rig)


def test_client_body_is_idle_time_while_a_body_arrives(rig: Rig) -> None:
    rig.send(b"POST / HTTP/1.1\r\nHost: app\r\nContent-Length: 10\r\n\r\nab")
    for _ in range(3):  # bytes keep coming: never too slow
        rig.advance(3.5)
        rig.send(b"c")
    assert rig.transport.written == b""
    rig.advance(4.25)
    assert statuses(bytes(rig.transport.written)) == [408]
    settle(rig)


def test_response_header_deadline_gives_504(rig: Rig) -> None:
    rig.send(GET % 1)
    rig.advance(4.75)
    assert rig.transport.written == b""
    rig.advance(0.5)
    assert statuses(bytes(rig.transport.written)) == [504]


def test_a_timed_out_idempotent_request_is_tried_once_on_another_backend() -> None:
    two = Rig(
        backends=[
            {"name": "a", "url": "http://127.0.0.1:18091", "weight": 1},
            {"name": "b", "url": "http://127.0.0.1:18092", "weight": 1},
        ]
    )
    try:
        two.send(GET % 1)
        first, _ = two.busy_upstream()
        two.advance(5.25)
        second, _ = two.busy_upstream()
        assert second.pool is not first.pool and two.transport.written == b""
        two.advance(5.0)
        assert statuses(bytes(two.transport.written)) == [504]
    finally:
        two.close()


@pytest.mark.parametrize("interim", [b"100 Continue", b"103 Early Hints", b"102 Processing"])
def test_response_header_deadline_is_re_armed_after_each_1xx(rig: Rig, interim: bytes) -> None:
    rig.send(GET % 1)
    up, _ = rig.busy_upstream()
    rig.advance(4.0)
    up.data_received(b"HTTP/1.1 " + interim + b"\r\n\r\n")
    rig.advance(4.0)  # 8 s after the request, 4 s after the 1xx: still waiting
    assert replies(bytes(rig.transport.written))[-1].status < 200
    rig.advance(1.25)  # now 5 s after the 1xx with nothing more
    got = replies(bytes(rig.transport.written))
    assert got[-1].status == 504 and got[-1].complete


def test_a_response_body_that_stalls_is_cut_and_never_looks_complete(rig: Rig) -> None:
    rig.send(GET % 1)
    up, _ = rig.busy_upstream()
    up.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    rig.advance(4.75)
    assert not rig.transport.ended
    rig.advance(0.5)
    assert rig.transport.aborted
    assert not rig.transport.written.endswith(b"0\r\n\r\n")
    settle(rig)


def test_client_send_cuts_a_client_that_reads_nothing_and_the_backend_with_it(rig: Rig) -> None:
    rig.send(GET % 1)
    up, upstream = rig.busy_upstream()
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n" + b"x" * 65536)
    rig.client.pause_writing()  # the client's buffer is full
    assert not upstream.reading  # the backend is held back meanwhile
    rig.advance(5.75)
    assert not rig.transport.ended  # neither the body deadline nor client_send yet
    rig.advance(0.5)
    assert rig.transport.aborted
    rig.lose()
    assert upstream.aborted
    assert_terminal(rig)


def test_a_backend_held_back_by_a_slow_client_is_not_timed_out(rig: Rig) -> None:
    rig.send(GET % 1 + GET % 2)
    up, first = rig.busy_upstream()
    first.take()
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    rig.client.pause_writing()  # the first answer sits in a full buffer; the second is sent
    second, upstream = rig.busy_upstream()
    assert upstream.written.startswith(b"GET /2 ") and not upstream.reading
    rig.advance(5.5)  # past response_header: not the backend's fault, no 504
    assert statuses(bytes(rig.transport.written)) == [200]
    rig.client.resume_writing()
    rig.advance(4.75)  # the backend has its full response_header again
    second.data_received(OK)
    assert statuses(bytes(rig.transport.written)) == [200, 200]


def test_a_slow_but_reading_client_is_not_cut(rig: Rig) -> None:
    rig.send(GET % 1)
    up, _ = rig.busy_upstream()
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 300\r\n\r\n" + b"x" * 100)
    for _ in range(4):
        rig.client.pause_writing()
        rig.advance(5.0)
        rig.client.resume_writing()
        up.data_received(b"x" * 50)
    assert not rig.transport.ended
    assert replies(bytes(rig.transport.written))[0].complete


def test_closing_is_bounded_when_the_last_bytes_never_leave(rig: Rig) -> None:
    rig.send(b"GET / HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
    answer_all(rig)
    assert rig.transport.closed and rig.state == "CLOSING"
    # asyncio has not reported connection_lost: the client reads nothing, the bytes stay.
    rig.transport.closed = False  # the fake transport stays open as a stuck one would
    rig.advance(6.25)
    assert rig.transport.aborted


def test_tunnel_idle_closes_a_silent_websocket(rig: Rig) -> None:
    rig_with = Rig(timeouts={"tunnel_idle": "30s"})
    try:
        rig_with.send(
            b"GET /ws HTTP/1.1\r\nHost: app\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        up, upstream = rig_with.busy_upstream()
        up.data_received(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        )
        assert rig_with.state == "TUNNEL"
        rig_with.advance(20)
        rig_with.send(b"\x81\x00")  # traffic resets the clock
        rig_with.advance(20)
        assert not rig_with.transport.ended
        rig_with.advance(10.5)
        assert rig_with.transport.ended and upstream.ended
    finally:
        rig_with.close()


def test_a_websocket_without_tunnel_idle_stays_open(rig: Rig) -> None:
    rig.send(
        b"GET /ws HTTP/1.1\r\nHost: app\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    up, _ = rig.busy_upstream()
    up.data_received(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    rig.advance(600)
    assert not rig.transport.ended and rig.state == "TUNNEL"


# -- deadlines of one request never leak into the next -------------------------------------------


def test_a_streaming_response_is_not_cut_by_the_body_deadline_of_a_request_behind_it(
    rig: Rig,
) -> None:
    rig.send(GET % 1 + POST % 2)  # the second request is complete on arrival
    up, _ = rig.busy_upstream()
    up.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(6):  # 12 s of a healthy stream: three times client_body
        rig.advance(2.0)
        up.data_received(b"2\r\nok\r\n")
    up.data_received(b"0\r\n\r\n")
    answer_all(rig)
    got = replies(bytes(rig.transport.written))
    assert [(r.status, r.complete) for r in got] == [(200, True), (200, True)]
    assert got[0].body == b"ok" * 6


def test_a_slow_first_answer_does_not_turn_the_next_request_into_a_408(rig: Rig) -> None:
    rig.send(GET % 1 + POST % 2)
    rig.advance(4.5)  # past client_body, within response_header
    answer_all(rig)
    assert statuses(bytes(rig.transport.written)) == [200, 200]


def test_a_backend_that_does_not_take_the_body_is_not_the_clients_fault(rig: Rig) -> None:
    rig.send(b"POST / HTTP/1.1\r\nHost: app\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
    up, _ = rig.busy_upstream()
    up.pause_writing()  # the backend stops reading the body
    assert not rig.transport.reading
    rig.advance(4.75)  # past client_body: the client is held back by us, no 408
    assert rig.transport.written == b""
    rig.advance(0.5)  # response_header: the backend had its chance
    assert statuses(bytes(rig.transport.written)) == [504]
    settle(rig)


# -- truncated bodies of every framing -----------------------------------------------------------

TRUNCATED = {
    "close-delimited": b"HTTP/1.1 200 OK\r\n\r\npartial",
    "content-length": b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial",
    "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7\r\npartial\r\n",
}


@pytest.mark.parametrize("framing", sorted(TRUNCATED))
def test_a_body_cut_by_a_reset_is_never_presented_as_complete(rig: Rig, framing: str) -> None:
    rig.send(GET % 1)
    up, _ = rig.busy_upstream()
    up.data_received(TRUNCATED[framing])
    up.connection_lost(ConnectionResetError())
    assert rig.transport.aborted
    got = replies(bytes(rig.transport.written))
    assert not got[0].complete and got[0].body == b"partial"
    assert rig.router.table.by_name["a"].state.errors.get("reset") == 1
    settle(rig)


def test_a_close_delimited_body_ended_by_fin_is_complete(rig: Rig) -> None:
    rig.send(GET % 1)
    up, _ = rig.busy_upstream()
    up.data_received(b"HTTP/1.1 200 OK\r\n\r\nall of it")
    up.eof_received()
    up.connection_lost(None)
    got = replies(bytes(rig.transport.written))
    assert got[0].complete and got[0].body == b"all of it"
    assert rig.state == "IDLE"


# -- HEAD answered with a body ---------------------------------------------------------------------


def test_a_connection_that_answered_head_is_not_pooled(rig: Rig) -> None:
    rig.send(b"HEAD / HTTP/1.1\r\nHost: app\r\n\r\n")
    up, upstream = rig.busy_upstream()
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
    assert bytes(rig.transport.written).startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"hello" not in rig.transport.written
    assert upstream.closed
    assert up not in up.pool._idle


# -- the client leaves at every phase ----------------------------------------------------------

PHASES = ["idle", "head", "body", "waiting", "relaying", "queued", "linger"]


def _drive_to(rig: Rig, phase: str) -> None:
    if phase == "head":
        rig.send(b"GET / HTTP/1.1\r\nHost")
    elif phase == "body":
        rig.send(b"POST / HTTP/1.1\r\nHost: app\r\nContent-Length: 10\r\n\r\nab")
    elif phase == "waiting":
        rig.send(GET % 1)
    elif phase == "relaying":
        rig.send(GET % 1)
        rig.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab")
    elif phase == "queued":
        rig.send(GET % 1 + GET % 2 + b"GET /3 HTTP/1.1\r\nHo")
    elif phase == "linger":
        rig.send(REFUSED["bare LF"][0])


def test_a_101_without_a_tunnel_after_it_aborts_the_client(rig: Rig) -> None:
    rig.send(
        b"GET /ws HTTP/1.1\r\nHost: app\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    up, _ = rig.busy_upstream()
    up.data_received(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\r\n")
    assert rig.transport.aborted
    assert b"502" not in rig.transport.written  # no answer after a 101
    settle(rig)


@pytest.mark.parametrize(
    ("phase", "leaves"), list(itertools.product(PHASES, ["eof", "reset", "nothing"]))
)
def test_the_connection_ends_whenever_and_however_the_client_leaves(
    rig: Rig, phase: str, leaves: str
) -> None:
    _drive_to(rig, phase)
    if leaves == "reset":
        rig.lose(ConnectionResetError())
        assert_terminal(rig)
        return
    if leaves == "eof":
        keep = rig.client.eof_received()
        if not keep and not rig.transport.ended:
            rig.transport.close()  # what asyncio does when eof_received returns a false value
    # The backend answers whatever reached it, then time passes: every state ends by itself.
    answer_all(rig)
    settle(rig, seconds=rig.ctx.settings.backstop + 5)


@pytest.mark.parametrize("depth", [1, 2, 5, 16, 40])
@pytest.mark.parametrize("backpressure", ["none", "client", "upstream"])
def test_pipelines_are_answered_in_order_under_backpressure(
    rig: Rig, depth: int, backpressure: str
) -> None:
    rig.send(b"".join(GET % i for i in range(depth)))
    if backpressure == "client":
        rig.client.pause_writing()
    for answered in range(depth):
        up, transport = rig.busy_upstream()
        assert transport.take().startswith(b"GET /%d " % answered)
        if backpressure == "upstream":
            up.pause_writing()
            up.resume_writing()
        up.data_received(OK)
        if backpressure == "client" and answered + 1 == depth // 2:
            rig.client.resume_writing()
    assert statuses(bytes(rig.transport.written)) == [200] * depth
    assert rig.state == "IDLE"
    assert rig.transport.reading


def test_the_pipeline_queue_is_capped_within_one_large_read(rig: Rig) -> None:
    rig.send(GET % 0)  # in flight: what follows queues behind it
    rig.send(b"".join(GET % i for i in range(1, 2001)))  # one read of 2,000 requests
    assert len(rig.client._queue) <= 16 + 4096 // len(GET % 1)
    assert not rig.transport.reading
    for _ in range(200):
        answer_all(rig, limit=3000)
        assert len(rig.client._queue) <= 16 + 4096 // len(GET % 1)
        rig.loop.run_until_complete(_yield())  # the kept bytes are parsed on the next turn
        if rig.state == "IDLE" and not rig.client._unparsed:
            break
    assert statuses(bytes(rig.transport.written)) == [200] * 2001


def test_requests_read_before_an_eof_are_all_answered_when_the_queue_was_full(rig: Rig) -> None:
    rig.send(GET % 0)
    rig.send(b"".join(GET % i for i in range(1, 201)))  # more than the queue holds
    assert rig.client._unparsed
    assert rig.client.eof_received() is True  # the kept requests still count
    for _ in range(100):
        answer_all(rig, limit=300)
        rig.loop.run_until_complete(_yield())
        if rig.transport.ended:
            break
    assert statuses(bytes(rig.transport.written)) == [200] * 201
    assert rig.transport.closed
    settle(rig)


async def _yield() -> None:
    pass


def test_fake_transport_refuses_writes_after_close() -> None:
    transport = FakeTransport()
    transport.close()
    with pytest.raises(AssertionError):
        transport.write(b"x")
