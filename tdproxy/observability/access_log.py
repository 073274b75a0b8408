"""One access-log line per request, JSON by default, written to stdout off the request's path.

Lines are buffered in memory and written in one go by :meth:`AccessLog.flush`, which the
server's sweeper calls a few times a second (and once more at shutdown).
"""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from tdproxy.dataplane.context import Clock
    from tdproxy.dataplane.exchange import Exchange

MAX_PENDING = 10_000


def _text(value: bytes | None) -> str | None:
    return value.decode("latin-1") if value is not None else None


class AccessLog:
    def __init__(self, fmt: str = "json", stream: TextIO | None = None) -> None:
        self.format = fmt
        self._stream = stream
        self._pending: list[str] = []

    def log(self, exchange: Exchange, peer: bytes, status: int, clock: Clock) -> None:
        duration = time.monotonic() - exchange.monotonic_start
        backend = exchange.target_backend.name if exchange.target_backend else None
        if self.format == "json":
            line = json.dumps(
                {
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "remote": peer.decode(),
                    "method": exchange.method,
                    "target": exchange.target.decode("latin-1"),
                    "version": exchange.version,
                    "host": _text(exchange.host),
                    "status": status,
                    "bytes": exchange.response_bytes,
                    "duration_ms": round(duration * 1000, 3),
                    "backend": backend,
                    "attempts": len(exchange.tried),
                    "user_agent": _text(exchange.field(b"user-agent")),
                },
                separators=(",", ":"),
            )
        else:
            stamp = time.strftime("%d/%b/%Y:%H:%M:%S %z")
            line = (
                f'{peer.decode()} - - [{stamp}] "{exchange.method} '
                f'{exchange.target.decode("latin-1")} HTTP/{exchange.version}" {status} '
                f'{exchange.response_bytes} "{_text(exchange.field(b"referer")) or "-"}" '
                f'"{_text(exchange.field(b"user-agent")) or "-"}" {backend or "-"} {duration:.3f}'
            )
        pending = self._pending
        pending.append(line)
        if len(pending) >= MAX_PENDING:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        lines, self._pending = self._pending, []
        stream = self._stream or sys.stdout
        try:
            stream.write("\n".join(lines) + "\n")
            stream.flush()
        except (OSError, ValueError):
            pass  # stdout closed: the log is best-effort, serving is not
