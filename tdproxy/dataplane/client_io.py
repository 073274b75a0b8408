"""The transport side of a client connection: writing, pausing, deadlines, closing.

:class:`ClientIO` is the bottom layer of :class:`~tdproxy.dataplane.client.ClientConnection`
(``ClientIO`` -> ``ResponseRelay`` -> ``ClientConnection``). It knows nothing of HTTP: it batches
writes so that a response arriving in one read leaves in one send, keeps the set of reasons for
which reading is paused (reading resumes when the last one clears), keeps the one deadline the
sweeper checks, and closes without losing an error answer (lingering close).
"""

from __future__ import annotations

import asyncio
import math

from tdproxy.dataplane.context import ProxyContext

INF = math.inf
PAUSE_UPSTREAM = 1  # the upstream's write buffer is full
PAUSE_BUFFER = 2  # request bytes are waiting (for an upstream connection, or a handshake)
PAUSE_QUEUE = 4  # too many pipelined requests are waiting their turn

DL_NONE, DL_IDLE, DL_HEADER, DL_BODY, DL_LINGER = 0, 1, 2, 3, 4
LINGER_SECONDS = 2.0


class ClientIO(asyncio.Protocol):
    __slots__ = (
        "_batch",
        "_closed",
        "_closing",
        "_deadline_kind",
        "_lingering",
        "_pause_bits",
        "_write_paused",
        "ctx",
        "deadline",
        "peer",
        "transport",
    )

    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx
        self.transport: asyncio.Transport | None = None
        self.peer = b"-"
        self.deadline = INF
        self._deadline_kind = DL_NONE
        self._batch: list[bytes] | None = None
        self._pause_bits = 0
        self._write_paused = False
        self._closing = False
        self._closed = False
        self._lingering = False

    def end_batch(self) -> None:
        batch = self._batch
        self._batch = None
        if batch:
            self.send_batch(batch)

    def send_batch(self, batch: list[bytes]) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(batch[0] if len(batch) == 1 else b"".join(batch))

    def _write(self, data: bytes) -> None:
        batch = self._batch
        if batch is not None:
            batch.append(data)
            return
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def close(self) -> None:
        self._closing = True
        self.deadline = INF
        self.end_batch()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()

    def abort(self) -> None:
        self._batch = None
        transport = self.transport
        if transport is not None:
            transport.abort()

    def _set_deadline(self, kind: int, seconds: float) -> None:
        self._deadline_kind = kind
        self.deadline = INF if kind == DL_NONE else self.ctx.clock.now + seconds

    def _set_pause(self, bit: int, on: bool) -> None:
        before = self._pause_bits
        after = before | bit if on else before & ~bit
        if after == before:
            return
        self._pause_bits = after
        transport = self.transport
        if transport is None or self._closed:
            return
        if before == 0:
            transport.pause_reading()
        elif after == 0:
            transport.resume_reading()

    def pause_reading_for_upstream(self, on: bool) -> None:
        self._set_pause(PAUSE_UPSTREAM, on)

    def _linger_close(self) -> None:
        """Close after an error without losing it: closing a socket that still holds unread
        request bytes sends a reset, which can destroy the response before the client reads
        it. So half-close, discard what still arrives, and close for good after a moment."""
        transport = self.transport
        if transport is None or not transport.can_write_eof():
            self.close()
            return
        self.end_batch()
        self._lingering = True
        self._set_pause(PAUSE_BUFFER | PAUSE_QUEUE | PAUSE_UPSTREAM, False)
        transport.write_eof()
        self._deadline_kind = DL_LINGER
        self.deadline = self.ctx.clock.now + LINGER_SECONDS
