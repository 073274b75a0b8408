"""The supervisor's worker processes: start, watch, restart with back-off, broadcast, stop.

Each worker has a *slot* (0..N-1) that outlives its processes: a worker that dies is replaced
in the same slot. The replacement starts at once (so a crash costs well under a second of that
worker's share of capacity); one that dies again soon after starting, or never gets to listen
(its port taken), is restarted after a delay that doubles up to ``MAX_BACKOFF``, with the
reason logged each time, never in a tight loop.

Before any worker starts, the supervisor binds the entrypoint port itself (``SO_REUSEPORT``,
never ``listen()``, so the kernel hands it no connection): a port already in use is a clear
start-up error from the supervisor, port 0 becomes one port that every worker shares, and no
other program can take the port while every worker happens to be restarting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import socket
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess

from tdproxy.config.model import Config
from tdproxy.workers.channel import Channel
from tdproxy.workers.counters import Totals
from tdproxy.workers.messages import (
    Commit,
    Committed,
    Counters,
    Failed,
    HealthStates,
    Init,
    Message,
    PassiveFailure,
    Prepare,
    Prepared,
    Ready,
    States,
    Stop,
    ToWorker,
)
from tdproxy.workers.report import WorkerPhase, WorkersReport, WorkerStatus
from tdproxy.workers.worker import run_worker

log = logging.getLogger("tdproxy.workers")

START_TIMEOUT = 30.0  # seconds a worker may take to listen
PREPARE_TIMEOUT = 10.0  # seconds the workers may take to build a new generation
STOP_MARGIN = 5.0  # seconds past shutdown_grace before a worker that has not exited is killed
STABLE_SECONDS = 10.0  # a worker that served this long is restarted without delay
FIRST_BACKOFF = 0.25
MAX_BACKOFF = 10.0

# (config, generation, health) now: what a worker starting now must be told.
Current = Callable[[], tuple[Config, int, HealthStates]]


class WorkerSlot:
    __slots__ = (
        "channel",
        "failure",
        "generation",
        "index",
        "phase",
        "pid",
        "process",
        "quick_deaths",
        "ready",
        "restarts",
        "started_at",
        "watcher",
    )

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: BaseProcess | None = None
        self.channel: Channel | None = None
        self.pid: int | None = None
        self.phase: WorkerPhase = "starting"
        self.started_at: float | None = None  # epoch seconds
        self.generation = 0
        self.restarts = 0
        self.quick_deaths = 0  # in a row: each doubles the delay before the next start
        self.failure = ""  # why the last process could not start
        self.ready: asyncio.Future[None] | None = None
        self.watcher: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<WorkerSlot {self.index} pid={self.pid} {self.phase} gen={self.generation}>"


class WorkerPool:
    def __init__(
        self,
        count: int,
        current: Current,
        on_counters: Callable[[], None],
        on_passive: Callable[[str, str], None],
    ) -> None:
        self.count = count
        self.totals = Totals()
        self.slots = [WorkerSlot(index) for index in range(count)]
        self.restarts = 0
        self.port = 0
        self.stopping = False
        self.started = False  # every worker listened once: from then on, deaths are restarted
        self._current = current
        self._on_counters = on_counters  # new counts arrived: load them into the states
        self._on_passive = on_passive  # (backend, kind): a worker saw a passive failure
        self._reservation: socket.socket | None = None
        self._prepares: dict[tuple[int, int], asyncio.Future[str | None]] = {}

    # -- start ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the port, start every worker and wait until each listens; OSError (with the
        first worker's reason) when one cannot, after stopping the others."""
        config, _, _ = self._current()
        self._reservation, self.port = reserve_port(
            config.entrypoint.address, config.entrypoint.port
        )
        for slot in self.slots:
            await self._spawn(slot)
        waits = [slot.ready for slot in self.slots if slot.ready is not None]
        await asyncio.wait(waits, timeout=START_TIMEOUT)
        failed = [slot for slot in self.slots if slot.phase != "running"]
        if failed:
            slot = failed[0]
            reason = slot.failure or f"not listening after {START_TIMEOUT:g}s"
            await self.stop(0.0)
            raise OSError(f"worker {slot.index} could not start: {reason}")
        self.started = True
        pids = ", ".join(str(slot.pid) for slot in self.slots)
        log.info("%d workers serving (pids %s)", self.count, pids)

    async def _spawn(self, slot: WorkerSlot) -> None:
        parent, child = socket.socketpair()
        try:
            # In a thread: the very first start launches the fork server (imports: ~0.5 s).
            process = await asyncio.to_thread(_start_process, child, slot.index)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        slot.process = process
        slot.pid = process.pid
        slot.phase = "starting"
        slot.started_at = time.time()
        slot.failure = ""
        slot.ready = asyncio.get_running_loop().create_future()
        slot.channel = await Channel.open(
            parent,
            lambda message: self._on_message(slot, message),
            lambda: None,  # the process's exit is what counts: see _watch
            f"worker {slot.index}",
        )
        # From here on every broadcast reaches this worker too, after its Init: what Init says
        # is read now, so that no generation or health change made meanwhile is missed.
        config, generation, states = self._current()
        slot.generation = generation
        slot.channel.send(Init(slot.index, config, generation, states, self.port, self.count))
        slot.watcher = asyncio.get_running_loop().create_task(
            self._watch(slot, process), name=f"worker {slot.index} watcher"
        )

    async def _watch(self, slot: WorkerSlot, process: BaseProcess) -> None:
        try:
            await self._follow(slot, process)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug here must not leave a slot empty for good, silently
            log.exception("bug: watching worker %d failed", slot.index)

    async def _follow(self, slot: WorkerSlot, process: BaseProcess) -> None:
        """Wait for ``process`` to exit; then keep its counts and start its replacement."""
        pid = process.pid
        code = await _exit_code(process)
        if slot.process is process:
            slot.process = None  # closed: its resources are released
        lived = time.time() - (slot.started_at or time.time())
        if slot.channel is not None:
            slot.channel.close()
            slot.channel = None
        self.totals.retire(slot.index)
        self._on_counters()
        for (index, _), waiter in self._prepares.items():
            if index == slot.index and not waiter.done():
                waiter.set_result(None)  # its replacement builds the generation on Commit
        served = slot.phase == "running"
        if slot.ready is not None and not slot.ready.done():
            slot.ready.set_result(None)
        if not served and not slot.failure:
            slot.failure = f"exited with code {code} before it listened"
        if self.stopping or not self.started:
            slot.phase = "stopping"
            slot.pid = None
            return
        slot.phase = "restarting"
        slot.pid = None
        if served and lived >= STABLE_SECONDS:
            slot.quick_deaths = 0
        else:
            slot.quick_deaths += 1
        delay = backoff(slot.quick_deaths)
        what = f"exited with code {code}" if served else f"could not start: {slot.failure}"
        log.warning(
            "worker %d (pid %d) %s; restarting it%s",
            slot.index,
            pid,
            what,
            f" in {delay:g}s" if delay else "",
        )
        if delay:
            await asyncio.sleep(delay)
        if self.stopping:
            return
        self.restarts += 1
        slot.restarts += 1
        try:
            await self._spawn(slot)
        except OSError as exc:  # cannot even fork: try again later
            log.error("worker %d: cannot start a process: %s", slot.index, exc)
            slot.quick_deaths += 1
            slot.watcher = asyncio.get_running_loop().create_task(self._retry(slot))

    async def _retry(self, slot: WorkerSlot) -> None:
        await asyncio.sleep(backoff(slot.quick_deaths))
        if not self.stopping:
            await self._spawn(slot)

    # -- messages from workers --------------------------------------------------------------

    def _on_message(self, slot: WorkerSlot, message: Message) -> None:
        if isinstance(message, Counters):
            self.totals.update(slot.index, message.counters)
            self._on_counters()
        elif isinstance(message, PassiveFailure):
            self.totals.passive(slot.index, message.backend, message.consecutive)
            self._on_passive(message.backend, message.kind)
        elif isinstance(message, Ready):
            slot.phase = "running"
            if slot.ready is not None and not slot.ready.done():
                slot.ready.set_result(None)
            if slot.restarts:
                log.info("worker %d serving again (pid %d)", slot.index, message.pid)
        elif isinstance(message, Failed):
            slot.failure = message.reason
        elif isinstance(message, Prepared):
            waiter = self._prepares.get((slot.index, message.generation))
            if waiter is not None and not waiter.done():
                waiter.set_result(message.error)
        elif isinstance(message, Committed):
            slot.generation = message.generation
        else:
            log.error("bug: unexpected message from worker %d: %r", slot.index, message)

    # -- orders to workers ----------------------------------------------------------------

    def broadcast(self, message: ToWorker) -> None:
        for slot in self.slots:
            if slot.channel is not None:
                slot.channel.send(message)

    def send_states(self, states: HealthStates) -> None:
        self.broadcast(States(states))

    async def prepare(self, generation: int, config: Config) -> list[str]:
        """Every worker builds ``generation`` (in a thread: they keep serving); the reasons it
        cannot, one per worker that failed. A worker that does not answer in time, or dies,
        builds it on Commit instead."""
        waits: dict[int, asyncio.Future[str | None]] = {}
        loop = asyncio.get_running_loop()
        for slot in self.slots:
            if slot.channel is not None and slot.channel.send(Prepare(generation, config)):
                waits[slot.index] = self._prepares[(slot.index, generation)] = loop.create_future()
        try:
            if waits:
                await asyncio.wait(list(waits.values()), timeout=PREPARE_TIMEOUT)
        finally:
            for index in waits:
                self._prepares.pop((index, generation), None)
        errors = []
        for index, waiter in waits.items():
            if not waiter.done():
                log.warning(
                    "worker %d took over %gs to build generation %d",
                    index,
                    PREPARE_TIMEOUT,
                    generation,
                )
            elif waiter.result() is not None:
                errors.append(f"worker {index}: {waiter.result()}")
        return errors

    def commit(self, generation: int, config: Config, states: HealthStates) -> None:
        """The swap: every worker installs ``generation`` as soon as this arrives."""
        self.broadcast(Commit(generation, config, states))

    # -- stop -----------------------------------------------------------------------------

    async def stop(self, grace: float) -> None:
        """Every worker drains (``grace``) and exits; one still there after ``grace`` plus
        ``STOP_MARGIN`` is killed. Their last counters are kept."""
        self.stopping = True
        self.broadcast(Stop(grace))
        for slot in self.slots:
            if slot.process is None and slot.watcher is not None:
                slot.watcher.cancel()  # waiting to restart: there is nothing to drain
        watchers = [slot.watcher for slot in self.slots if slot.watcher is not None]
        if watchers:
            _, pending = await asyncio.wait(watchers, timeout=grace + STOP_MARGIN)
            for slot in self.slots:
                process = slot.process
                if process is not None and process.exitcode is None:
                    log.warning("worker %d did not exit in time: killing it", slot.index)
                    with contextlib.suppress(OSError, ValueError):
                        process.kill()
            if pending:
                await asyncio.wait(pending, timeout=STOP_MARGIN)
            for task in pending:
                task.cancel()
        if self._reservation is not None:
            self._reservation.close()
            self._reservation = None

    # -- reporting ------------------------------------------------------------------------

    @property
    def live(self) -> int:
        return sum(1 for slot in self.slots if slot.phase == "running")

    def report(self) -> WorkersReport:
        processes: list[WorkerStatus] = []
        for slot in self.slots:
            counts = self.totals.live.get(slot.index)
            processes.append(
                {
                    "index": slot.index,
                    "pid": slot.pid,
                    "state": slot.phase,
                    "started_at": slot.started_at,
                    "generation": slot.generation,
                    "requests": counts.answered if counts is not None else 0,
                    "connections_active": counts.connections if counts is not None else 0,
                    "restarts": slot.restarts,
                }
            )
        return WorkersReport(
            self.count, self.live, self.restarts, processes, self.totals.dropped_log_lines()
        )


def backoff(quick_deaths: int) -> float:
    """Seconds before restarting a worker after ``quick_deaths`` early deaths in a row: the
    first is restarted at once, the next ones after a delay that doubles up to the cap."""
    if quick_deaths <= 1:
        return 0.0
    return min(MAX_BACKOFF, FIRST_BACKOFF * 2.0 ** (quick_deaths - 2))


def reserve_port(address: str, port: int) -> tuple[socket.socket, int]:
    """Bind ``address:port`` with ``SO_REUSEPORT`` and never listen: the port is taken for
    tdproxy's workers (and resolved when 0) while no connection is ever queued here."""
    infos = socket.getaddrinfo(
        address or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"entrypoint {address}:{port}: {exc.strerror}") from None
    return sock, int(sock.getsockname()[1])


# Workers are forked by multiprocessing's fork server, which has imported the worker's code
# once: a new worker (at start-up or after a crash) is a fork away, not an interpreter start
# and half a second of imports. The fork server is a fresh, single-threaded interpreter, so
# forking it is safe, unlike forking the supervisor with its event loop and threads.
_FORKSERVER = multiprocessing.get_context("forkserver")
_FORKSERVER.set_forkserver_preload(["tdproxy.workers.worker"])


def _start_process(channel: socket.socket, index: int) -> BaseProcess:
    process = _FORKSERVER.Process(
        target=run_worker, args=(channel,), name=f"tdproxy-worker-{index}", daemon=True
    )
    process.start()
    return process


async def _exit_code(process: BaseProcess) -> int:
    """Wait, without blocking the loop, until ``process`` exits; its exit code (-N: signal N)."""
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()
    sentinel = process.sentinel

    def ready() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(sentinel, ready)
    try:
        await exited
    finally:
        loop.remove_reader(sentinel)
    process.join(1.0)  # reads the status the fork server wrote to the sentinel
    code = process.exitcode
    with contextlib.suppress(ValueError):
        process.close()
    return code if code is not None else -1
