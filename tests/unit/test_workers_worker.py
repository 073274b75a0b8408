"""A worker's side of the protocol, driven over a real socketpair without a process: generations
in two phases (a stale build is never installed), health states, passive failures reported."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tdproxy.config import parse_config
from tdproxy.config.model import Config
from tdproxy.workers.channel import Channel
from tdproxy.workers.messages import (
    BackendHealth,
    Commit,
    Committed,
    Init,
    Message,
    PassiveFailure,
    Prepare,
    Prepared,
    States,
)
from tdproxy.workers.worker import Worker
from tests.fakes.process import async_wait_until


def config(blue: int, green: int) -> Config:
    return parse_config(
        {
            "backends": [
                {"name": "blue", "url": "http://127.0.0.1:9001", "weight": blue},
                {"name": "green", "url": "http://127.0.0.1:9002", "weight": green},
            ]
        }
    )


def up(name: str) -> BackendHealth:
    return BackendHealth(True, "initial", time.time(), None)


class Supervisor:
    """The supervisor's end of the channel: what the worker said, and a way to talk to it."""

    def __init__(self) -> None:
        self.heard: list[Message] = []
        self.channel: Channel | None = None

    def send(self, message: Message) -> None:
        assert self.channel is not None
        self.channel.send(message)

    async def hear(self, kind: type[Any]) -> Any:
        found = await async_wait_until(
            lambda: [m for m in self.heard if isinstance(m, kind)], timeout=5
        )
        self.heard[:] = [m for m in self.heard if not isinstance(m, kind)]
        return found[-1]


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Worker, Supervisor]]:
    ours, theirs = socket.socketpair()
    init = Init(0, config(1, 0), 3, {"blue": up("blue"), "green": up("green")}, 0, 2)
    worker = Worker(init, theirs)
    worker._channel = await Channel.open(theirs, worker._on_message, lambda: None, "worker")
    supervisor = Supervisor()
    supervisor.channel = await Channel.open(ours, supervisor.heard.append, lambda: None, "sup")
    yield worker, supervisor
    supervisor.channel.close()
    worker._channel.close()
    await asyncio.gather(*worker._tasks, return_exceptions=True)


async def test_the_worker_numbers_its_table_as_the_supervisor_does(
    pair: tuple[Worker, Supervisor],
) -> None:
    worker, _ = pair
    assert worker.router.generation == worker.router.table.generation == 3


async def test_a_prepared_generation_is_installed_on_commit(
    pair: tuple[Worker, Supervisor],
) -> None:
    worker, supervisor = pair
    new = config(0, 1)
    supervisor.send(Prepare(4, new))
    assert await supervisor.hear(Prepared) == Prepared(4, None)
    assert worker.router.generation == 3  # nothing changes before the Commit
    prepared = worker._prepared
    assert prepared is not None
    supervisor.send(Commit(4, new, {}))
    assert await supervisor.hear(Committed) == Committed(4)
    assert worker.router.table is prepared[2]
    assert worker.router.table.pick().name == "green"


async def test_a_stale_build_is_never_installed(pair: tuple[Worker, Supervisor]) -> None:
    """A reload that failed elsewhere left a build of generation 4; the next reload is also
    generation 4 with another config, and its Commit overtakes its Prepare."""
    worker, supervisor = pair
    supervisor.send(Prepare(4, config(1, 1)))
    await supervisor.hear(Prepared)
    supervisor.send(Commit(4, config(0, 1), {}))
    await supervisor.hear(Committed)
    assert [t.weight for t in worker.router.table.targets] == [0, 1]


async def test_a_commit_without_a_prepare_builds_the_generation(
    pair: tuple[Worker, Supervisor],
) -> None:
    worker, supervisor = pair
    supervisor.send(Commit(5, config(0, 1), {}))
    assert await supervisor.hear(Committed) == Committed(5)
    assert worker.router.generation == 5
    supervisor.send(Commit(5, config(1, 0), {}))  # the same generation again: nothing to do
    await supervisor.hear(Committed)
    assert [t.weight for t in worker.router.table.targets] == [0, 1]


async def test_health_states_rebuild_the_selector(pair: tuple[Worker, Supervisor]) -> None:
    worker, supervisor = pair
    supervisor.send(Commit(4, config(1, 1), {}))
    await supervisor.hear(Committed)
    down = BackendHealth(False, "3 consecutive failures", time.time(), None)
    supervisor.send(States({"blue": down, "gone": down}))
    await async_wait_until(lambda: not worker.router.states["blue"].healthy, timeout=5)
    assert {worker.router.table.pick().name for _ in range(4)} == {"green"}
    assert worker.router.states["blue"].health_reason == "3 consecutive failures"


async def test_passive_failures_are_reported_with_the_run(
    pair: tuple[Worker, Supervisor],
) -> None:
    worker, supervisor = pair
    target = worker.router.table.by_name["blue"]
    worker._passive_failure(target, "connect")
    worker._passive_failure(target, "timeout")
    assert await supervisor.hear(PassiveFailure) == PassiveFailure("blue", "timeout", 2)
    assert target.state.healthy  # only the supervisor decides
