"""The running distributor: owns the data plane, the router and every background task."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from tdproxy.config.model import Config
from tdproxy.dataplane.context import ProxyContext
from tdproxy.dataplane.server import Entrypoint
from tdproxy.observability.access_log import AccessLog
from tdproxy.routing.router import Router
from tdproxy.routing.table import Target

log = logging.getLogger("tdproxy")


class App:
    def __init__(
        self, config: Config, config_path: str | None = None, config_text: str | None = None
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.router = Router(config, secure_cookie=config.entrypoint.tls is not None)
        self.ctx: ProxyContext | None = None
        self.entrypoint: Entrypoint | None = None
        self._stop = asyncio.Event()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        config = self.config
        access_log = AccessLog(config.access_log.format) if config.access_log.enabled else None
        self.ctx = ProxyContext(loop, self.router, config, access_log, self.passive_failure)
        self.entrypoint = Entrypoint(self.ctx, config)
        await self.entrypoint.start()
        log.info("routing: %s", describe_distribution(self.router))

    def passive_failure(self, target: Target, kind: str) -> None:
        """A connect error or timeout on real traffic; enough in a row mark the backend down."""
        state = target.state
        state.consecutive_failures += 1
        limit = self.config.health_check.passive.max_failures
        # Only active checks bring a backend back, so without them nothing is marked down.
        if not self.config.health_check.enabled or limit == 0:
            return
        if state.consecutive_failures >= limit and state.set_health(
            False, f"{state.consecutive_failures} consecutive {kind} failures on live traffic"
        ):
            log.warning("backend %s: up -> down (%s)", state.name, state.health_reason)
            self.router.refresh()

    def request_stop(self) -> None:
        self._stop.set()

    async def serve(self) -> None:
        """Run until SIGTERM/SIGINT, then drain and stop."""
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            await self._stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self.stop()

    async def stop(self) -> None:
        log.info("stopping: draining connections (grace %gs)", self.config.timeouts.shutdown_grace)
        if self.entrypoint is not None:
            await self.entrypoint.shutdown(self.config.timeouts.shutdown_grace)
        log.info("stopped")


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
    handler = logging.StreamHandler(sys.stderr)
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
