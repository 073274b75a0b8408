"""Live reload: watching the config file, and describing what a new generation changes.

The watcher polls the file's resolved path, inode, size and mtime a few times a second (polling,
rather than inotify, sees editors that replace the file and Kubernetes ConfigMap updates, which
swap a ``..data`` symlink). A file that moved is not applied at once: it may be half written
(``cat >``, scp and slow editors write in place, in pieces). :class:`FileSettling` holds it as a
candidate and the watcher hands it over only once it has stayed the same (size, mtime and a hash
of its content) for ``SETTLE_SECONDS``. The content it hands over is the very text it checked,
so a write that lands after the last check is seen as the next change, never applied half.

With a poll every 0.2 s and 1 s of settling, an edit applies 1.0-1.3 s after the last write.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from tdproxy.config.loader import ConfigError, read_config_text
from tdproxy.config.model import Config

log = logging.getLogger("tdproxy.reload")

POLL_INTERVAL = 0.2
SETTLE_SECONDS = 1.0

Identity = tuple[object, ...]


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def file_identity(path: str) -> Identity | None:
    try:
        real = os.path.realpath(path)
        stat = os.stat(real)
    except OSError:
        return None
    return (real, stat.st_ino, stat.st_size, stat.st_mtime_ns)


@dataclass(frozen=True)
class Snapshot:
    """What one look at the file saw; ``text`` is None when it could not be read."""

    identity: Identity
    digest: str
    text: str | None


def take_snapshot(path: str) -> Snapshot | None:
    """Stat and read the file (blocking: run it in a thread). None when it is missing."""
    identity = file_identity(path)
    if identity is None:
        return None
    try:
        text: str | None = read_config_text(path)
    except ConfigError as exc:
        # Unreadable or too big: settle on that too; the reload re-reads and says why.
        text = None
        digest = "unreadable: " + "; ".join(exc.errors)
    else:
        assert text is not None
        digest = content_hash(text)
    return Snapshot(identity, digest, text)


class FileSettling:
    """Decides when a changed file has settled (pure: the caller supplies looks and times).

    ``seen`` is the identity of the file last handed over (or at start). A look at a different
    identity becomes the candidate; a look at the same identity and content as the candidate at
    least ``settle`` seconds after it was first seen says: hand it over now."""

    __slots__ = ("candidate", "seen", "settle", "since")

    def __init__(self, seen: Identity | None, settle: float = SETTLE_SECONDS) -> None:
        self.seen = seen
        self.settle = settle
        self.candidate: Snapshot | None = None
        self.since = 0.0

    def moved(self, identity: Identity | None) -> bool:
        """Whether the file needs a closer look (a read) at all."""
        return identity != self.seen or self.candidate is not None

    def observe(self, snapshot: Snapshot, now: float) -> Snapshot | None:
        """Count one look; return the snapshot to apply once it has settled, else None."""
        candidate = self.candidate
        if (
            candidate is None
            or candidate.identity != snapshot.identity
            or candidate.digest != snapshot.digest
        ):
            self.candidate = snapshot
            self.since = now
            return None
        if now - self.since < self.settle:
            return None
        self.candidate = None
        self.seen = snapshot.identity
        return snapshot

    def missing(self) -> None:
        self.candidate = None
        self.seen = None

    def __repr__(self) -> str:
        state = "settling" if self.candidate is not None else "idle"
        return f"<FileSettling {state} since={self.since:.1f}>"


class ConfigWatcher:
    """Calls ``on_change(text)`` with the file's content once a change has settled (``text``
    is None when the file could not be read; the callback then reads it again and fails)."""

    def __init__(
        self,
        path: str,
        on_change: Callable[[str | None], Awaitable[object]],
        interval: float = POLL_INTERVAL,
        settle: float = SETTLE_SECONDS,
    ) -> None:
        self.path = path
        self._on_change = on_change
        self._interval = interval
        self._settling = FileSettling(file_identity(path), settle)
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
        loop = asyncio.get_running_loop()
        settling = self._settling
        while True:
            await asyncio.sleep(self._interval)
            try:
                # File system calls run in a thread: a slow (network) mount must not stall the loop.
                identity = await asyncio.to_thread(file_identity, self.path)
                if not settling.moved(identity):
                    continue
                snapshot = await asyncio.to_thread(take_snapshot, self.path)
                if snapshot is None:
                    if settling.seen is not None or settling.candidate is not None:
                        log.warning(
                            "config file %s is missing; keeping the running config", self.path
                        )
                    settling.missing()
                    continue
                settled = settling.observe(snapshot, loop.time())
                if settled is not None:
                    await self._on_change(settled.text)
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
    elif new.entrypoint.redirect_http_port is not None and _redirect_by_data_plane(
        old
    ) != _redirect_by_data_plane(new):
        # Who serves the redirect port (the data plane, or the plain redirect server) is
        # decided at start: see dataplane/redirect_listener.py.
        pending.append("entrypoint.redirect_http_port behind trusted_proxies")
    if old.entrypoint.proxy_protocol != new.entrypoint.proxy_protocol:
        pending.append(
            "entrypoint.proxy_protocol turned " + ("on" if new.entrypoint.proxy_protocol else "off")
        )
    if old.entrypoint.http2 != new.entrypoint.http2:
        pending.append("entrypoint.http2 turned " + ("on" if new.entrypoint.http2 else "off"))
    if old.workers != new.workers:
        pending.append(f"workers {old.workers} -> {new.workers}")
    if (old.admin.address, old.admin.port) != (new.admin.address, new.admin.port):
        pending.append(
            f"admin {old.admin.address}:{old.admin.port} -> {new.admin.address}:{new.admin.port}"
        )
    return pending


def _redirect_by_data_plane(config: Config) -> bool:
    return bool(config.entrypoint.trusted_proxies) or config.entrypoint.proxy_protocol


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
    if old.entrypoint.trusted_proxies != new.entrypoint.trusted_proxies:
        changes.append("entrypoint.trusted_proxies changed (new connections)")
    if old.admin.token != new.admin.token or old.admin.token_env != new.admin.token_env:
        changes.append("admin token changed")
    return changes
