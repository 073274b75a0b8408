"""Counters across workers: snapshots, sums, a dead worker's counts kept, gauges dropped;
and the message framing between supervisor and workers."""

from __future__ import annotations

import pickle

import pytest

from tdproxy.routing.state import SHARE_WINDOW_SECONDS, BackendState
from tdproxy.workers.counters import Totals, WorkerCounters, take
from tdproxy.workers.messages import (
    HEADER,
    MAX_FRAME,
    Counters,
    FrameDecoder,
    FrameError,
    PassiveFailure,
    Stop,
    encode,
)
from tdproxy.workers.pool import MAX_BACKOFF, backoff
from tdproxy.workers.worker import connection_share

SECOND = 1_700_000_000


def worker_state(name: str, answers: dict[int, int], *, second: int = SECOND) -> BackendState:
    state = BackendState(name)
    for status, count in answers.items():
        for _ in range(count):
            state.record_response(status, second, 0.003)
    return state


def snapshot(*states: BackendState, connections: int = 0) -> WorkerCounters:
    return take({s.name: s for s in states}, SECOND, connections, {400: 1}, 0)


def test_totals_sum_every_live_worker() -> None:
    totals = Totals()
    one = worker_state("blue", {200: 3, 502: 1})
    one.errors["connect"] = 1
    one.in_flight = 2
    two = worker_state("blue", {200: 5})
    two.retries = 1
    totals.update(0, snapshot(one, connections=4))
    totals.update(1, snapshot(two, connections=1))
    blue = totals.backend("blue")
    assert blue.requests == {200: 8, 502: 1}
    assert blue.errors == {"connect": 1}
    assert blue.retries == 1
    assert blue.in_flight == 2
    assert sum(blue.durations) == 9
    assert blue.recent == {SECOND: 9}
    assert totals.connections() == 5
    assert totals.unrouted() == {400: 2}


def test_a_later_snapshot_replaces_the_earlier_one() -> None:
    totals = Totals()
    state = worker_state("blue", {200: 1})
    totals.update(0, snapshot(state))
    state.record_response(200, SECOND)
    totals.update(0, snapshot(state))
    assert totals.backend("blue").requests == {200: 2}


def test_a_dead_workers_counts_stay_but_its_gauges_go() -> None:
    totals = Totals()
    state = worker_state("blue", {200: 4})
    state.in_flight = 3
    state.consecutive_failures = 2
    totals.update(0, snapshot(state, connections=7))
    totals.retire(0)
    totals.update(0, snapshot(worker_state("blue", {200: 1})))  # its replacement
    blue = totals.backend("blue")
    assert blue.requests == {200: 5}
    assert blue.in_flight == 0
    assert blue.consecutive_failures == 0
    assert totals.connections() == 0
    assert totals.unrouted() == {400: 2}
    totals.retire(5)  # a worker that never reported: nothing to keep


def test_loaded_into_the_supervisors_state_for_the_collector() -> None:
    totals = Totals()
    totals.update(0, snapshot(worker_state("blue", {200: 2})))
    totals.update(1, snapshot(worker_state("blue", {200: 1}, second=SECOND - 1)))
    supervisor = BackendState("blue")
    supervisor.checks["success"] = 7  # the supervisor's own: kept
    totals.load({"blue": supervisor, "green": BackendState("green")})
    assert supervisor.requests == {200: 3}
    assert supervisor.recent_requests(SECOND) == 3
    assert supervisor.recent_requests(SECOND + SHARE_WINDOW_SECONDS) == 0
    assert supervisor.duration_sum == pytest.approx(0.009)
    assert supervisor.checks["success"] == 7


def test_passive_runs_add_up_across_workers() -> None:
    totals = Totals()
    totals.update(0, snapshot(worker_state("blue", {})))
    totals.passive(0, "blue", 1)
    totals.passive(1, "blue", 2)  # a worker that has not reported yet
    assert totals.backend("blue").consecutive_failures == 3
    totals.update(0, snapshot(worker_state("blue", {200: 1})))  # answered since: run reset
    assert totals.backend("blue").consecutive_failures == 2


def test_removed_backends_lose_their_retired_counts() -> None:
    totals = Totals()
    totals.update(0, snapshot(worker_state("blue", {200: 1}), worker_state("old", {200: 1})))
    totals.retire(0)
    totals.forget_except(["blue"])
    assert totals.backend("old").requests == {}
    assert totals.backend("blue").requests == {200: 1}


def test_a_ring_keeps_the_newest_second_per_slot() -> None:
    state = BackendState("blue")
    state.load_recent({SECOND: 2, SECOND + SHARE_WINDOW_SECONDS: 5})  # same slot
    assert state.recent_by_second(SECOND + SHARE_WINDOW_SECONDS) == {
        SECOND + SHARE_WINDOW_SECONDS: 5
    }


# -- framing ----------------------------------------------------------------------------------


def test_frames_survive_any_cut() -> None:
    messages = [Stop(1.5), PassiveFailure("blue", "connect", 2), Counters(snapshot())]
    stream = b"".join(encode(m) for m in messages)
    for cut in range(1, len(stream)):
        decoder = FrameDecoder()
        got = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
        assert got == messages
        assert decoder.pending == 0


def test_an_oversized_frame_is_refused() -> None:
    with pytest.raises(FrameError):
        FrameDecoder().feed(HEADER.pack(MAX_FRAME + 1))


def test_a_frame_that_is_not_a_message_is_refused() -> None:
    body = pickle.dumps({"not": "a message"})
    with pytest.raises(FrameError):
        FrameDecoder().feed(HEADER.pack(len(body)) + body)


# -- restarts ---------------------------------------------------------------------------------


def test_restart_backoff_doubles_up_to_the_cap() -> None:
    assert backoff(0) == 0.0  # a worker that had served a while: at once
    assert backoff(1) == 0.0  # the first early death too
    delays = [backoff(n) for n in range(2, 13)]
    assert delays[:3] == [0.25, 0.5, 1.0]
    assert delays == sorted(delays)
    assert max(delays) == MAX_BACKOFF


def test_max_connections_is_shared_out_among_the_workers() -> None:
    assert connection_share(10000, 1) == 10000
    assert connection_share(10000, 3) == 3334
    assert connection_share(1, 4) == 1
