"""Live reload: watching the config file, and describing what a new generation changes.

The watcher polls the file's resolved path, inode, size and mtime about once a second and, when
any of them moves, compares a hash of the content. Polling (rather than inotify) sees editors that
replace the file and Kubernetes ConfigMap updates, which swap a ``..data`` symlink.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Awaitable, Callable

from tdproxy.config.model import Config

log = logging.getLogger("tdproxy.reload")

POLL_INTERVAL = 1.0


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _file_identity(path: str) -> tuple[object, ...] | None:
    try:
        real = os.path.realpath(path)
        stat = os.stat(real)
    except OSError:
        return None
    return (real, stat.st_ino, stat.st_size, stat.st_mtime_ns)


class ConfigWatcher:
    """Calls ``on_change`` when the file at ``path`` may have new content."""

    def __init__(
        self,
        path: str,
        on_change: Callable[[], Awaitable[object]],
        interval: float = POLL_INTERVAL,
    ) -> None:
        self.path = path
        self._on_change = on_change
        self._interval = interval
        self._identity = _file_identity(path)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name="tdproxy-config-watcher"
        )

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            identity = _file_identity(self.path)
            if identity == self._identity:
                continue
            self._identity = identity
            if identity is None:
                log.warning("config file %s is missing; keeping the running config", self.path)
                continue
            try:
                await self._on_change()
            except Exception:  # the watcher must survive anything a reload does
                log.exception("reload after a change of %s failed", self.path)


def restart_only_changes(old: Config, new: Config) -> list[str]:
    """Settings that a running process cannot change: they apply at the next start."""
    pending = []
    if (old.entrypoint.address, old.entrypoint.port) != (
        new.entrypoint.address,
        new.entrypoint.port,
    ):
        pending.append(
            f"entrypoint {old.entrypoint.address}:{old.entrypoint.port} -> "
            f"{new.entrypoint.address}:{new.entrypoint.port}"
        )
    if (old.entrypoint.tls is None) != (new.entrypoint.tls is None):
        pending.append("entrypoint.tls turned " + ("on" if new.entrypoint.tls else "off"))
    if old.entrypoint.redirect_http_port != new.entrypoint.redirect_http_port:
        pending.append("entrypoint.redirect_http_port")
    if (old.admin.address, old.admin.port) != (new.admin.address, new.admin.port):
        pending.append(
            f"admin {old.admin.address}:{old.admin.port} -> {new.admin.address}:{new.admin.port}"
        )
    return pending


def describe_changes(old: Config, new: Config) -> list[str]:
    """One line per change that a reload applies live."""
    changes = []
    old_backends = {b.name: b for b in old.backends}
    new_backends = {b.name: b for b in new.backends}
    for name in old_backends.keys() - new_backends.keys():
        changes.append(f"backend {name} removed")
    for backend in new.backends:
        before = old_backends.get(backend.name)
        if before is None:
            changes.append(f"backend {backend.name} added ({backend.url}, weight {backend.weight})")
            continue
        if before.weight != backend.weight:
            changes.append(f"{backend.name} weight {before.weight} -> {backend.weight}")
        for key in ("url", "backup", "host_header", "tls_verify"):
            if getattr(before, key) != getattr(backend, key):
                changes.append(
                    f"{backend.name} {key} {getattr(before, key)!r} -> {getattr(backend, key)!r}"
                )
    if [b.name for b in old.backends] != [b.name for b in new.backends] and not changes:
        changes.append("backend order changed")
    if old.routing != new.routing:
        if old.routing.method != new.routing.method:
            changes.append(f"routing.method {old.routing.method} -> {new.routing.method}")
        else:
            changes.append("routing settings changed")
    for section in ("health_check", "timeouts", "limits", "access_log"):
        if getattr(old, section) != getattr(new, section):
            changes.append(f"{section} changed")
    if old.entrypoint.tls != new.entrypoint.tls and old.entrypoint.tls and new.entrypoint.tls:
        changes.append("entrypoint TLS certificate files changed")
    if old.admin.token != new.admin.token or old.admin.token_env != new.admin.token_env:
        changes.append("admin token changed")
    return changes
