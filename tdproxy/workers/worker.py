"""A worker process: one data plane, steered by its supervisor over a socketpair.

A worker runs exactly the single-process data plane (the same ``Entrypoint``, connections and
``BackendState`` counters), listening with ``SO_REUSEPORT`` beside its siblings. It has no
control plane of its own: no health checks, no config watcher, no admin server. What it routes
by comes from the supervisor:

- :class:`Init`: the config, its generation number and every backend's health, before anything
  starts (read blocking: there is nothing else to do yet);
- :class:`Prepare` then :class:`Commit`: a new generation, built in a thread on Prepare (the
  event loop keeps serving), swapped in with one assignment on Commit;
- :class:`States`: health flipped or a slow-start ramp moved: the table's selector is rebuilt.

What it reports: counter snapshots every ``REPORT_INTERVAL`` (and once more after its drain),
and each passive failure at once, since the supervisor decides when a backend is down.

It dies with its supervisor: ``PR_SET_PDEATHSIG`` turns the supervisor's death into SIGTERM,
and the channel's end of file means the same, so a worker drains and exits rather than serving
on without a control plane. SIGTERM drains (``timeouts.shutdown_grace``); SIGINT and SIGHUP
are ignored (a terminal's Ctrl-C reaches the whole process group: the supervisor handles it).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

from tdproxy.config.model import Config
from tdproxy.dataplane.context import ProxyContext, Settings, trusted_proxies
from tdproxy.dataplane.endpoints import Endpoints
from tdproxy.dataplane.server import Entrypoint
from tdproxy.observability import log_output
from tdproxy.observability.access_log import AccessLog
from tdproxy.routing.router import Router
from tdproxy.routing.table import RoutingTable, Target
from tdproxy.workers import counters
from tdproxy.workers.channel import Channel
from tdproxy.workers.messages import (
    HEADER,
    MAX_FRAME,
    Commit,
    Committed,
    Counters,
    Failed,
    FrameDecoder,
    HealthStates,
    Init,
    Message,
    PassiveFailure,
    Prepare,
    Prepared,
    Ready,
    ReloadTls,
    States,
    Stop,
)

if TYPE_CHECKING:
    from tdproxy.dataplane.redirect import RedirectServer
    from tdproxy.dataplane.redirect_listener import RedirectListener

log = logging.getLogger("tdproxy.worker")

REPORT_INTERVAL = 0.25  # seconds between counter snapshots
INIT_TIMEOUT = 30.0  # seconds to wait for the supervisor's Init
MAX_UNSENT = 1024 * 1024  # a supervisor this far behind gets no snapshot until it catches up
PR_SET_PDEATHSIG = 1


def apply_states(router: Router, states: HealthStates) -> None:
    """Take the supervisor's view of health and ramps, then rebuild the selector."""
    for name, health in states.items():
        state = router.states.get(name)
        if state is None:
            continue
        state.healthy = health.healthy
        state.health_reason = health.reason
        state.health_changed_at = health.changed_at
        state.ramp_started = health.ramp_started
    router.refresh()


class Worker:
    def __init__(self, init: Init, sock: socket.socket) -> None:
        self.index = init.worker
        self.config = init.config
        self.port = init.port
        self.workers = init.workers
        self.endpoints = Endpoints()
        self.router = Router(
            init.config,
            self.endpoints,
            secure_cookie=init.config.entrypoint.tls is not None,
            generation=init.generation,
        )
        apply_states(self.router, init.states)
        self.grace = init.config.timeouts.shutdown_grace
        self.ctx: ProxyContext | None = None
        self.entrypoint: Entrypoint | None = None
        # The redirect port (the plain server imports aiohttp: only when configured).
        self.redirect: RedirectServer | RedirectListener | None = None
        self._sock = sock
        self._channel: Channel | None = None
        self._stop = asyncio.Event()
        # The generation built on the last Prepare, with its config, waiting for its Commit.
        self._prepared: tuple[int, Config, RoutingTable, Callable[[], None]] | None = None
        self._preparing = 0  # the generation the last Prepare asked for
        self._tasks: set[asyncio.Task[None]] = set()

    # -- life cycle -----------------------------------------------------------------------

    async def serve(self, stop_requested: bool) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._request_stop, "SIGTERM")
        name = f"worker {self.index}"
        self._channel = await Channel.open(self._sock, self._on_message, self._on_lost, name)
        if stop_requested:
            self._stop.set()
        try:
            await self._start()
        except OSError as exc:
            log.error("cannot start: %s", exc)
            self._channel.send(Failed(str(exc)))
            await self._close_channel()
            return 1
        self._channel.send(Ready(os.getpid()))
        reporter = loop.create_task(self._report(), name="worker-report")
        await self._stop.wait()
        log.info("stopping: draining connections (grace %gs)", self.grace)
        if self.redirect is not None:
            await self.redirect.stop()
        if self.entrypoint is not None:
            await self.entrypoint.shutdown(self.grace)
        reporter.cancel()
        await asyncio.gather(reporter, *self._tasks, return_exceptions=True)
        self._send_counters()  # the last word: nothing it counted is lost
        await self._close_channel()
        log.info("stopped")
        return 0

    async def _start(self) -> None:
        config = self.config
        self.ctx = ProxyContext(
            asyncio.get_running_loop(),
            self.router,
            config,
            _access_log(config),
            self._passive_failure,
            self.endpoints,
        )
        self.ctx.max_connections = connection_share(config.limits.max_connections, self.workers)
        self.entrypoint = Entrypoint(self.ctx, config, reuse_port=True)
        self.entrypoint.port = self.port
        await self.entrypoint.start()
        redirect_port = config.entrypoint.redirect_http_port
        if redirect_port is not None and config.entrypoint.tls is not None:
            from tdproxy.dataplane.redirect import RedirectServer
            from tdproxy.dataplane.redirect_listener import RedirectListener, served_by_data_plane

            redirect: RedirectServer | RedirectListener
            if served_by_data_plane(config):  # behind a balancer: see redirect_listener
                redirect = RedirectListener(self.ctx, config, self.port, reuse_port=True)
            else:
                redirect = RedirectServer(
                    config.entrypoint.address, redirect_port, self.port, reuse_port=True
                )
            await redirect.start()
            self.redirect = redirect

    def _request_stop(self, why: str) -> None:
        if not self._stop.is_set():
            log.info("%s: stopping", why)
            self._stop.set()

    def _on_lost(self) -> None:
        if not self._stop.is_set():
            log.warning("the supervisor is gone: draining and exiting")
            self._stop.set()

    async def _close_channel(self) -> None:
        channel = self._channel
        if channel is not None:
            channel.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(channel.wait_closed(), 2.0)

    # -- reporting ------------------------------------------------------------------------

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(REPORT_INTERVAL)
            self._send_counters()

    def _send_counters(self) -> None:
        channel, ctx = self._channel, self.ctx
        if channel is None or ctx is None or channel.buffered() > MAX_UNSENT:
            return
        snapshot = counters.take(
            self.router.states,
            int(time.time()),
            len(ctx.connections),
            ctx.unrouted,
            log_output.dropped_lines(),
        )
        channel.send(Counters(snapshot))

    def _passive_failure(self, target: Target, kind: str) -> None:
        """Counted here as in one process; whether the backend is down is the supervisor's
        call (it sums every worker's run)."""
        state = target.state
        state.consecutive_failures += 1
        if self._channel is not None:
            self._channel.send(PassiveFailure(state.name, kind, state.consecutive_failures))

    # -- orders from the supervisor ---------------------------------------------------------

    def _on_message(self, message: Message) -> None:
        if isinstance(message, Prepare):
            self._spawn(self._prepare(message))
        elif isinstance(message, Commit):
            self._commit(message)
        elif isinstance(message, States):
            apply_states(self.router, message.states)
        elif isinstance(message, ReloadTls):
            if self.entrypoint is not None:
                self._reload_tls(self.config)
        elif isinstance(message, Stop):
            self.grace = message.grace
            self._request_stop("stop requested by the supervisor")
        else:
            log.error("bug: unexpected message from the supervisor: %r", type(message).__name__)

    def _spawn(self, coroutine: object) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coroutine)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _prepare(self, message: Prepare) -> None:
        generation = message.generation
        self._preparing, self._prepared = generation, None  # an older build is stale now
        error = None
        if generation > self.router.generation:
            try:
                table, commit = await asyncio.to_thread(
                    self.router.prepare, message.config, generation
                )
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
            else:
                # Kept unless a Commit or a newer Prepare overtook the build.
                if generation > self.router.generation and generation == self._preparing:
                    self._prepared = (generation, message.config, table, commit)
        if self._channel is not None:
            self._channel.send(Prepared(generation, error))

    def _commit(self, message: Commit) -> None:
        router = self.router
        if message.generation > router.generation:
            prepared, self._prepared = self._prepared, None
            if (
                prepared is not None
                and prepared[0] == message.generation
                and prepared[1] == message.config
            ):
                _, _, table, commit = prepared
            else:
                # Started after the Prepare, or its build was slow: build it now.
                table, commit = router.prepare(message.config, message.generation)
            router.install(table, commit)
            self._apply_settings(message.config)
        apply_states(router, message.states)
        if self._channel is not None:
            self._channel.send(Committed(router.generation))

    def _apply_settings(self, new: Config) -> None:
        """As one process does after a swap: timeouts, limits, the access log, TLS files."""
        self.config = new
        ctx = self.ctx
        if ctx is not None:
            ctx.settings = Settings(new)
            ctx.trusted_proxies = trusted_proxies(new)  # for connections accepted from now on
            ctx.max_connections = connection_share(new.limits.max_connections, self.workers)
            if ctx.access_log is not None:
                ctx.access_log.flush()
            ctx.access_log = _access_log(new)
        self._reload_tls(new)

    def _reload_tls(self, config: Config) -> None:
        if self.entrypoint is None:
            return
        try:
            self.entrypoint.reload_tls(config)
        except Exception as exc:  # the supervisor loaded these files a moment ago
            log.error("cannot load the TLS certificate files, keeping the old ones: %s", exc)


def connection_share(limit: int, workers: int) -> int:
    """One worker's part of ``limits.max_connections``, which bounds the whole proxy (and so
    the memory it may take), however many processes serve."""
    return max(1, -(-limit // workers))


def _access_log(config: Config) -> AccessLog | None:
    return AccessLog(config.access_log.format) if config.access_log.enabled else None


# -- the process --------------------------------------------------------------------------


def run_worker(sock: socket.socket) -> None:
    """A worker process's life, forked by the supervisor's fork server (see pool.py)."""
    stop_requested = False

    def early_term(signum: int, frame: FrameType | None) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, early_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _die_with_fork_server()
    try:
        init = read_init(sock)
    except (OSError, ValueError) as exc:
        print(f"tdproxy worker: no start-up message from the supervisor: {exc}", file=sys.stderr)
        sys.exit(1)
    _setup_logging(f"worker {init.worker}")
    log_output.share_outputs()
    _install_event_loop_policy()
    try:
        code = asyncio.run(Worker(init, sock).serve(stop_requested))
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        log_output.close_all()
    sys.exit(code)


def read_init(sock: socket.socket) -> Init:
    """The first frame, read exactly: what follows it stays in the socket for the channel."""
    sock.settimeout(INIT_TIMEOUT)
    decoder = FrameDecoder()
    header = _recv_exactly(sock, HEADER.size)
    (size,) = HEADER.unpack(header)
    messages = decoder.feed(header + _recv_exactly(sock, min(size, MAX_FRAME + 1)))
    if len(messages) != 1 or not isinstance(messages[0], Init):
        raise ValueError("the first message is not Init")
    return messages[0]


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ValueError("the channel closed")
        data += chunk
    return bytes(data)


def _die_with_fork_server() -> None:
    """Linux: SIGTERM this process when its parent, the fork server, exits, which it does as
    soon as the supervisor is gone, once no worker holds its "alive" pipe open (this one lets
    go of it here). The channel's end of file says the same on any system."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    from multiprocessing import forkserver

    server = forkserver._forkserver
    alive = getattr(server, "_forkserver_alive_fd", None)
    if isinstance(alive, int):
        with contextlib.suppress(OSError):
            os.close(alive)
        vars(server)["_forkserver_alive_fd"] = None  # closed: nothing may close it again


def _setup_logging(tag: str) -> None:
    handler = log_output.QueuedLogHandler(log_output.stderr_writer())
    handler.setFormatter(
        logging.Formatter(
            f"%(asctime)s %(levelname)s %(name)s [{tag} pid %(process)d]: %(message)s",
            "%Y-%m-%dT%H:%M:%S%z",
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def _install_event_loop_policy() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a hard dependency on Linux
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
