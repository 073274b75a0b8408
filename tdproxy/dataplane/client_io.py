"""The transport side of a client connection: its state, writing, pausing, closing.

:class:`ClientIO` is the bottom layer of :class:`~tdproxy.dataplane.client.ClientConnection`
(``ClientIO`` -> ``ResponseRelay`` -> ``ClientConnection``). It knows nothing of HTTP. It keeps
the connection's one state value and its read deadline (:mod:`tdproxy.dataplane.lifecycle`),
batches writes so that a response arriving in one read leaves in one send, keeps the set of
reasons for which reading is paused (reading resumes when the last one clears, and the read
deadline is suspended while any holds), arms ``client_send`` while the client accepts no bytes,
and closes without losing an error answer (lingering close) or waiting forever on a client that
reads nothing (CLOSING is bounded too).
"""

from __future__ import annotations

import asyncio
import logging

from tdproxy.dataplane.context import ProxyContext
from tdproxy.dataplane.dispatch import BackendDispatch
from tdproxy.dataplane.lifecycle import (
    BODY,
    CLOSED,
    CLOSING,
    CONNECTION_TRANSITIONS,
    HEAD,
    IDLE,
    INF,
    LINGER,
    LINGER_SECONDS,
    PAUSE_BUFFER,
    PAUSE_QUEUE,
    PAUSE_UPSTREAM,
    connection_state_name,
)

__all__ = ["INF", "PAUSE_BUFFER", "PAUSE_QUEUE", "PAUSE_UPSTREAM", "ClientIO"]

log = logging.getLogger("tdproxy.dataplane")

# The transition table as a list indexed by state: the cheapest lookup on the per-request path.
CONNECTION_NEXT = [CONNECTION_TRANSITIONS[state] for state in range(len(CONNECTION_TRANSITIONS))]


class ClientIO(BackendDispatch):
    __slots__ = (
        "_batch",
        "_pause_bits",
        "deadline",
        "input_ended",
        "peer",
        "progress",
        "send_deadline",
        "state",
        "transport",
    )

    def __init__(self, ctx: ProxyContext) -> None:
        super().__init__(ctx)
        self.transport: asyncio.Transport | None = None
        self.peer = b"-"
        self.state = IDLE
        # The deadline of the connection state (see lifecycle); INF when the state has none.
        self.deadline = INF
        # client_send: armed while the client's write buffer is full.
        self.send_deadline = INF
        # When anything last moved on this connection (either direction): the backstop and
        # tunnel_idle are measured from it.
        self.progress = ctx.clock.now
        self.input_ended = False  # the client sent its FIN
        self._batch: list[bytes] | None = None
        self._pause_bits = 0

    # -- state --------------------------------------------------------------------------------

    def move(self, new: int) -> None:
        """Enter connection state ``new``; a transition the table does not allow is a bug."""
        if new not in CONNECTION_NEXT[self.state]:
            self.bug(
                f"connection state {connection_state_name(self.state)} -> "
                f"{connection_state_name(new)}"
            )
            return
        self.state = new

    def bug(self, what: str) -> None:
        """Something happened that the lifecycle does not allow: log it and close at once."""
        log.error("bug: %s on the connection from %s; closing it", what, self.peer.decode())
        self.abort()

    # -- writing ------------------------------------------------------------------------------

    def begin_batch(self) -> bool:
        """Collect writes until :meth:`end_batch`, so that a response read whole leaves in one
        send. False when a batch is already open (its opener sends it)."""
        if self._batch is not None:
            return False
        self._batch = []
        return True

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

    # -- flow control -------------------------------------------------------------------------

    def pause_writing(self) -> None:
        """The client's write buffer is full: from now it has ``client_send`` to take bytes."""
        self.write_paused = True
        self.send_deadline = self.ctx.clock.now + self.ctx.settings.client_send

    def resume_writing(self) -> None:
        self.write_paused = False
        self.send_deadline = INF
        self.progress = self.ctx.clock.now
        if self.state == CLOSING:
            self.deadline = self.ctx.clock.now + self.ctx.settings.client_send

    def _set_pause(self, bit: int, on: bool) -> None:
        before = self._pause_bits
        after = before | bit if on else before & ~bit
        if after == before:
            return
        self._pause_bits = after
        transport = self.transport
        if transport is None or self.state >= LINGER:
            return
        if before == 0:
            transport.pause_reading()
            if self.state == HEAD or self.state == BODY:
                self.deadline = INF  # tdproxy holds the client back: not the client's delay
        elif after == 0:
            transport.resume_reading()
            self.rearm_read_deadline()

    def rearm_read_deadline(self) -> None:
        settings = self.ctx.settings
        if self.state == HEAD:
            self.deadline = self.ctx.clock.now + settings.client_header
        elif self.state == BODY:
            self.deadline = self.ctx.clock.now + settings.client_body

    def pause_reading_for_upstream(self, on: bool) -> None:
        self._set_pause(PAUSE_UPSTREAM, on)

    # -- closing ------------------------------------------------------------------------------

    def close(self) -> None:
        """Close once what was written has left; CLOSING is bounded by ``client_send``."""
        self.end_batch()
        if self.state >= CLOSING:
            return
        self.move(CLOSING)
        self.deadline = self.ctx.clock.now + self.ctx.settings.client_send
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()

    def abort(self) -> None:
        self._batch = None
        transport = self.transport
        if transport is not None:
            transport.abort()

    def linger(self) -> None:
        """Close after an error answer without losing it: closing a socket that still holds
        unread request bytes sends a reset, which can destroy the answer before the client
        reads it. So half-close, discard what still arrives, and close for good after a
        moment."""
        transport = self.transport
        if (
            transport is None
            or self.input_ended  # nothing more can arrive: nothing to wait for
            or not transport.can_write_eof()
            or self.state >= LINGER
        ):
            self.close()
            return
        self.end_batch()
        self._set_pause(self._pause_bits, False)  # read, to discard what still arrives
        self.move(LINGER)
        transport.write_eof()
        self.deadline = self.ctx.clock.now + LINGER_SECONDS

    def lost(self) -> None:
        """The transport is gone (``connection_lost``)."""
        self.state = CLOSED  # from any state: the peer decides this one
        self.deadline = INF
        self.send_deadline = INF
