"""The running distributor: owns the data plane, the router and every background task."""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

from tdproxy.config.loader import ConfigError, parse_config_text, read_config_text
from tdproxy.config.model import Config
from tdproxy.controlplane.admin import AdminServer, configured_shares
from tdproxy.controlplane.changes import (
    ChangeLog,
    change_trigger,
    config_summary,
    health_summary,
    passive_cause,
    start_summary,
)
from tdproxy.controlplane.health import HealthChecker, needs_first_check
from tdproxy.controlplane.reload import (
    ConfigWatcher,
    content_hash,
    describe_changes,
    restart_only_changes,
)
from tdproxy.controlplane.reload_state import ReloadHistory, ReloadOutcome
from tdproxy.controlplane.signals import HANDLED as HANDLED_SIGNALS
from tdproxy.controlplane.signals import signal_name
from tdproxy.controlplane.slow_start import SlowStartDriver
from tdproxy.dataplane.context import ProxyContext, Settings, trusted_proxies
from tdproxy.dataplane.endpoints import Endpoints
from tdproxy.dataplane.redirect import RedirectServer
from tdproxy.dataplane.redirect_listener import RedirectListener, served_by_data_plane
from tdproxy.dataplane.server import Entrypoint, tls_server_context
from tdproxy.observability.access_log import AccessLog
from tdproxy.observability.log_output import QueuedLogHandler, stderr_writer
from tdproxy.routing.router import Router
from tdproxy.routing.state import BackendState
from tdproxy.routing.table import RoutingTable, Target
from tdproxy.workers.report import WorkersReport, single_process_report

log = logging.getLogger("tdproxy")


class App:
    """The whole distributor: data plane, health checks, admin server, config watcher.

    It is also the admin server's ``AdminSource``: the admin reads ``router``, ``config``,
    ``config_path``, ``reload_history`` and ``changes`` and calls :meth:`reload`.
    """

    def __init__(
        self, config: Config, config_path: str | None = None, config_text: str | None = None
    ) -> None:
        self.config = config
        self.started_config = config  # what the listeners were bound with
        self.config_path = config_path
        self.endpoints = Endpoints()  # the data plane's pools and TLS contexts per backend
        self.router = Router(
            config, self.endpoints, secure_cookie=config.entrypoint.tls is not None
        )
        self.reload_history = ReloadHistory()
        self.changes = ChangeLog()  # applied generations and health transitions
        self.ctx: ProxyContext | None = None
        self.entrypoint: Entrypoint | None = None
        self.redirect: RedirectServer | RedirectListener | None = None
        self.health = HealthChecker(
            self.router, config.health_check, on_transition=self._health_changed
        )
        self.slow_start = SlowStartDriver(self.router)  # moves ramping backends up their ramp
        self.admin = AdminServer()
        self.watcher: ConfigWatcher | None = None
        self._applied_hash = content_hash(config_text) if config_text is not None else None
        self._reload_lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self.phase: Literal["starting", "running", "stopping"] = "starting"
        self._starting: asyncio.Task[None] | None = None
        self._reload_deferred = False  # SIGHUP during start-up: reload once started

    # -- life cycle -----------------------------------------------------------------------

    async def start(self) -> None:
        config = self.config
        if config.health_check.enabled:
            # One round before accepting: a dead environment gets no traffic from the start.
            await self.health.initial_round()
        weights, shares = _split(self.router.table)
        down = {
            t.name: t.state.health_reason for t in self.router.table.targets if not t.state.healthy
        }
        self.changes.record(
            "config", "start", self.router.generation, start_summary(shares, down), weights, shares
        )
        await self._start_data_plane()
        self.health.start()
        self.slow_start.start()
        await self.admin.start(self, config.admin.address, config.admin.port)
        if self.config_path is not None:
            self.watcher = ConfigWatcher(self.config_path, lambda text: self.reload("file", text))
            self.watcher.start()
        self.reload_history.record(
            ReloadOutcome(True, time.time(), "start", self.router.generation)
        )
        log.info("routing: %s", describe_distribution(self.router))

    async def _start_data_plane(self) -> None:
        """The entrypoint (and the redirect port), served by this process's own event loop.
        A supervisor of worker processes starts those instead (``tdproxy.workers``)."""
        config = self.config
        self.ctx = ProxyContext(
            asyncio.get_running_loop(),
            self.router,
            config,
            _access_log(config),
            self.passive_failure,
            self.endpoints,
        )
        self.entrypoint = Entrypoint(self.ctx, config)
        await self.entrypoint.start()
        redirect_port = config.entrypoint.redirect_http_port
        if redirect_port is not None and config.entrypoint.tls is not None:
            if served_by_data_plane(config):  # behind a balancer: see redirect_listener
                self.redirect = RedirectListener(self.ctx, config, self.entrypoint.port)
            else:
                self.redirect = RedirectServer(
                    config.entrypoint.address, redirect_port, self.entrypoint.port
                )
            await self.redirect.start()

    def request_stop(self) -> None:
        self._stop.set()

    async def serve(self, early_signals: Sequence[int] = ()) -> None:
        """Run until SIGTERM/SIGINT (reloading on SIGHUP), then drain and stop.

        The signal handlers are installed before anything starts and stay until the loop ends;
        ``early_signals`` arrived before that and are acted on first."""
        loop = asyncio.get_running_loop()
        for signum in HANDLED_SIGNALS:
            loop.add_signal_handler(signum, self.on_signal, signum)
        try:
            for early in early_signals:
                self.on_signal(early)
            if not self._stop.is_set():
                self._starting = loop.create_task(self.start(), name="tdproxy-start")
                try:
                    await self._starting
                except asyncio.CancelledError:
                    if not self._stop.is_set():
                        raise  # cancelled from outside, not by a stop signal
                self._starting = None
            if not self._stop.is_set():
                self.phase = "running"
                if self._reload_deferred:
                    self._reload_soon()
                await self._stop.wait()
        finally:
            self.phase = "stopping"
            await self.stop()

    def on_signal(self, signum: int) -> None:
        """What a signal means depends on the phase: see the table in docs/operations.md."""
        name = signal_name(signum)
        phase = self.phase
        if phase == "stopping":
            # The drain goes on: in-flight requests keep their grace period.
            log.warning("%s while stopping: ignored (the drain goes on)", name)
        elif signum == signal.SIGHUP:
            if phase == "starting":
                log.info("SIGHUP during start-up: reload deferred until started")
                self._reload_deferred = True
            else:
                self._reload_soon()
        elif self._stop.is_set():
            log.warning("%s: already stopping, ignored", name)
        else:
            self._stop.set()
            if phase == "starting":
                log.info("%s during start-up: stopping", name)
                if self._starting is not None:
                    self._starting.cancel()
            else:
                log.info("%s: stopping", name)

    async def stop(self) -> None:
        grace = self.config.timeouts.shutdown_grace
        log.info("stopping: draining connections (grace %gs)", grace)
        if self.watcher is not None:
            await self.watcher.stop()
        await self._stop_data_plane(grace)
        await self.health.stop()
        await self.slow_start.stop()
        await self.admin.stop()
        log.info("stopped")

    async def _stop_data_plane(self, grace: float) -> None:
        if self.redirect is not None:
            await self.redirect.stop()
        if self.entrypoint is not None:
            await self.entrypoint.shutdown(grace)

    @property
    def draining(self) -> bool:
        return self.ctx is not None and self.ctx.shutting_down

    def connections_active(self) -> int:
        return len(self.ctx.connections) if self.ctx is not None else 0

    def unrouted_requests(self) -> dict[int, int]:
        return dict(self.ctx.unrouted) if self.ctx is not None else {}

    def workers_report(self) -> WorkersReport:
        """One process serves: itself (a supervisor reports its workers instead)."""
        return single_process_report(
            self.router.states, self.connections_active(), self.router.generation
        )

    # -- observed failures ------------------------------------------------------------------

    def passive_failure(self, target: Target, kind: str) -> None:
        """A connect error or timeout on real traffic; enough in a row mark the backend down."""
        target.state.consecutive_failures += 1
        self._check_passive(target.state, kind)

    def _check_passive(self, state: BackendState, kind: str) -> None:
        """``state.consecutive_failures`` grew: mark the backend down once it reaches the limit."""
        limit = self.config.health_check.passive.max_failures
        # Only active checks bring a backend back, so without them nothing is marked down.
        if not self.config.health_check.enabled or limit == 0:
            return
        if state.consecutive_failures >= limit and state.set_health(
            False, f"{state.consecutive_failures} consecutive {kind} failures on live traffic"
        ):
            log.warning("backend %s: up -> down (%s)", state.name, state.health_reason)
            self.health.passive_down(state.name)
            self.router.refresh()
            self._health_changed(state.name, False, passive_cause(state.consecutive_failures, kind))

    def _health_changed(self, name: str, healthy: bool, cause: str) -> None:
        weights, shares = _split(self.router.table)
        summary = health_summary(name, healthy, cause)
        self.changes.record("health", "health", self.router.generation, summary, weights, shares)

    # -- reload -----------------------------------------------------------------------------

    def _reload_soon(self) -> None:
        task = asyncio.get_running_loop().create_task(self.reload("signal"))
        self._background = task  # keep a reference until it is done

    async def reload(self, trigger: str, text: str | None = None) -> ReloadOutcome:
        """Read the file again (or take ``text``, the watcher's settled copy of it) and apply it
        whole, or keep the running config and say why. Never raises: whatever goes wrong is a
        failed reload, counted, logged and answered with the reason."""
        async with self._reload_lock:
            outcome = await self._reload(trigger, text)
            if outcome is not None:
                self.reload_history.record(outcome)
                return outcome
            last = self.reload_history.last
            assert last is not None
            return last

    async def _reload(self, trigger: str, text: str | None) -> ReloadOutcome | None:
        path = self.config_path
        generation = self.router.generation
        if path is None:
            return _failed(
                trigger, generation, ["no config file: this process was started without one"]
            )
        try:
            # Read, parse, validate and build in a worker thread: a big file must not stall
            # the data plane. Only the swap below runs on the event loop.
            prepared = await asyncio.to_thread(self._prepare, path, text)
            if prepared is None:
                # Unchanged: nothing to rebuild. A signal or API call still re-reads the TLS
                # files (how a renewed certificate is picked up), and a file put back after a
                # failed edit clears that failure.
                if trigger == "file" and self.reload_history.last_successful:
                    return None
                return self._reload_unchanged(trigger)
        except ConfigError as exc:
            log.error(
                "reload (%s) failed, still serving generation %d:\n%s",
                trigger,
                generation,
                exc.describe(),
            )
            return _failed(trigger, generation, [f"{exc.path}: {e}" for e in exc.errors])
        except Exception as exc:  # anything else is a failed reload too, never a lost one
            reason = _describe_error(exc)
            log.error(
                "reload (%s) failed, still serving generation %d: %s", trigger, generation, reason
            )
            return _failed(trigger, generation, [f"{path}: {reason}"])
        # Backends that no check has vouched for (added, url changed) get one before they
        # serve, as at start-up: bounded by health_check.timeout plus half a second.
        unchecked = prepared.unchecked
        results = await self.health.first_checks(unchecked, prepared.config.health_check)
        refused = await self._prepare_data_plane(prepared)
        if refused:
            log.error(
                "reload (%s) failed, still serving generation %d: %s",
                trigger,
                generation,
                "; ".join(refused),
            )
            return _failed(trigger, generation, refused)
        # Everything is built; from here on nothing can fail.
        kept_out = self.health.admit(unchecked, results)
        before = _split(self.router.table)
        table = prepared.table
        # install() refreshes the table: health may have changed while it was built and checked.
        self.router.install(table, prepared.commit)
        self._apply_settings(prepared.config)
        self.config = prepared.config
        self._applied_hash = prepared.digest
        changes, pending = prepared.changes + kept_out, prepared.pending
        summary = "; ".join(changes) if changes else "no live change"
        if pending:
            summary += "; at the next start: " + "; ".join(pending)
        log.info(
            "config reloaded (%s), generation %d: %s -> %s",
            trigger,
            table.generation,
            summary,
            describe_distribution(self.router),
        )
        for item in pending:
            log.warning("not applied until the next start: %s", item)
        weights, shares = _split(table)
        self.changes.record(
            "config",
            change_trigger(trigger),
            table.generation,
            config_summary(*before, weights, shares, changes, pending),
            weights,
            shares,
        )
        return ReloadOutcome(
            True, time.time(), trigger, table.generation, tuple(changes), (), tuple(pending)
        )

    async def _prepare_data_plane(self, prepared: _Prepared) -> list[str]:
        """Have the data plane build the new generation too, before the swap; the reasons it
        cannot (none here: this process's data plane reads ``router.table`` directly)."""
        return []

    def _prepare(self, path: str, text: str | None) -> _Prepared | None:
        """Everything a reload does before the swap (in a worker thread; it changes nothing).
        None when the content is the one already applied."""
        if text is None:
            text = read_config_text(path)
        digest = content_hash(text)
        if digest == self._applied_hash:
            return None
        new = parse_config_text(text, path)
        table, commit = self.router.prepare(new)
        tls = new.entrypoint.tls
        if tls is not None and self.config.entrypoint.tls is not None:
            tls_server_context(tls.certificate, tls.key)  # fails here, before any swap
        return _Prepared(
            new,
            table,
            commit,
            digest,
            describe_changes(self.config, new),
            # Listeners were bound from the start-up config: compare with that, not the last file.
            restart_only_changes(self.started_config, new),
            needs_first_check(self.config, new, table),
        )

    def _reload_unchanged(self, trigger: str) -> ReloadOutcome:
        changes = ["configuration unchanged"]
        if self.config.entrypoint.tls is not None and self._reload_tls_files():
            changes.append("TLS certificate files re-read")
        log.info("reload (%s): %s", trigger, "; ".join(changes))
        return ReloadOutcome(True, time.time(), trigger, self.router.generation, tuple(changes))

    def _reload_tls_files(self) -> bool:
        if self.entrypoint is None:
            return False
        self.entrypoint.reload_tls(self.config)
        return True

    def _apply_settings(self, new: Config) -> None:
        self._apply_data_plane(new)
        self.health.update(new.health_check)

    def _apply_data_plane(self, new: Config) -> None:
        """The swap is done: the data plane takes the new timeouts, limits, log and TLS files."""
        ctx = self.ctx
        if ctx is not None:
            ctx.settings = Settings(new)
            ctx.trusted_proxies = trusted_proxies(new)  # for connections accepted from now on
            ctx.max_connections = new.limits.max_connections
            if ctx.access_log is not None:
                ctx.access_log.flush()
            ctx.access_log = _access_log(new)
        if self.entrypoint is not None:
            self.entrypoint.reload_tls(new)


def _split(table: RoutingTable) -> tuple[dict[str, int], dict[str, float]]:
    """The configured split a change-log entry records: weights, and shares as the status
    document's ``configured_share``."""
    return {t.name: t.weight for t in table.targets}, configured_shares(table)


def _access_log(config: Config) -> AccessLog | None:
    return AccessLog(config.access_log.format) if config.access_log.enabled else None


class _Prepared(NamedTuple):
    """A new generation, built and checked, waiting for the swap."""

    config: Config
    table: RoutingTable
    commit: Callable[[], None]
    digest: str
    changes: list[str]
    pending: list[str]  # changes that apply only at the next start
    unchecked: list[Target]  # to be checked once before the table serves


def _describe_error(exc: BaseException) -> str:
    """The reason a reload failed, for the log, the API and the status page."""
    if isinstance(exc, OSError | ssl.SSLError | ValueError):
        return str(exc) or type(exc).__name__
    return f"unexpected error: {type(exc).__name__}: {exc}"


def _failed(trigger: str, generation: int, errors: list[str]) -> ReloadOutcome:
    return ReloadOutcome(False, time.time(), trigger, generation, errors=tuple(errors))


def describe_distribution(router: Router) -> str:
    """``primary-env 0% (drain) / second-env 100%`` for the current table."""
    table = router.table
    if table.method == "failover":
        order = [t.name + (" (backup)" if t.backup else "") for t in table.targets]
        return "failover: " + " -> ".join(order)
    total = sum(t.weight for t in table.targets if not t.backup) or 1
    parts = []
    for target in table.targets:
        if target.backup:
            parts.append(f"{target.name} backup")
            continue
        share = 100 * target.weight / total
        parts.append(f"{target.name} {share:.0f}%" + (" (drain)" if target.weight == 0 else ""))
    return f"{table.method}: " + " / ".join(parts)


def setup_logging(level: int = logging.INFO) -> None:
    """Python log records to stderr through a bounded queue and a writer thread: a stalled
    reader costs log lines (counted), never the event loop's time."""
    handler = QueuedLogHandler(stderr_writer())
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S%z")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def install_event_loop_policy() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a hard dependency on Linux
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
