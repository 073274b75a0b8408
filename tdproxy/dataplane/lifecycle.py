"""The life of a client connection and of one exchange: named states and their transitions.

Theory of operation
-------------------
A client connection (:class:`~tdproxy.dataplane.client.ClientConnection`) is always in exactly one
connection state, kept in one attribute. It says what the connection does with its *input*, and
names the deadline that bounds it:

==========  ===============================================  ===================================
state       meaning                                          bounded by
==========  ===============================================  ===================================
IDLE        no request begun, none outstanding               ``timeouts.idle``
HEAD        a request head is arriving                       ``timeouts.client_header`` (whole head)
BODY        a request body is arriving                       ``timeouts.client_body`` (idle time)
BUSY        the requests read so far are complete; answers   each exchange's own deadline
            are outstanding
ENDING      no more input is taken (EOF, a ``close``         each exchange's own deadline; closes
            request, a refusal queued): what is owed is      once nothing is owed
            answered, then the connection closes
TUNNEL      a WebSocket tunnel                               ``timeouts.tunnel_idle`` (or none)
LINGER      an error answer was sent and the write side      ``LINGER_SECONDS``
            shut; what still arrives is discarded
CLOSING     closed by tdproxy, waiting for the last bytes    ``timeouts.client_send``
            to leave
CLOSED      the transport is gone                            terminal
==========  ===============================================  ===================================

The read deadlines (HEAD, BODY) are suspended while tdproxy itself holds reading paused (a full
backend write buffer, a full body buffer, a long pipeline queue): the client is not the slow one.

Every request is an :class:`~tdproxy.dataplane.exchange.Exchange` with its own state and its own
deadline, so one request's deadline never leaks into the next one's:

==========  ===============================================  ===================================
state       meaning                                          bounded by
==========  ===============================================  ===================================
QUEUED      parsed, waiting for its turn (or for the read    the exchanges ahead of it
            that holds it to be parsed)
CONNECTING  a backend connection is being opened             ``timeouts.connect``
WAITING     the request went upstream; waiting for the       ``timeouts.response_header`` once the
            response head                                    request is complete, re-armed after
                                                             each 1xx; while the body is still
                                                             sent: only while the backend does
                                                             not take it
RELAYING    the response body streams to the client          ``timeouts.response_header`` per
                                                             pause of the backend; while the
                                                             client holds it back,
                                                             ``timeouts.client_send`` instead
DONE        answered completely (by a backend or by          terminal
            tdproxy), or turned into a tunnel
ABORTED     ended without a complete answer                  terminal
==========  ===============================================  ===================================

Two bounds hold in every state: ``timeouts.client_send`` while bytes wait for a client that
accepts none, and a **backstop** that no state can switch off: a connection on which nothing has
moved for longer than any of its deadlines allows (``Settings.backstop``) is closed and logged as a
bug, because some state failed to bound it.

The allowed transitions are the tables below. A transition the table does not hold, or an event
that comes in a state that does not expect it, is a bug: it is logged and the connection closed,
never ignored (see ``ClientConnection.bug``).
"""

from __future__ import annotations

import math

INF = math.inf  # the deadline of a state that has none
# Why reading from a client is paused (ClientIO keeps a set of these bits).
PAUSE_UPSTREAM = 1  # the upstream's write buffer is full
PAUSE_BUFFER = 2  # request bytes are waiting (for an upstream connection, or a handshake)
PAUSE_QUEUE = 4  # too many pipelined requests are waiting their turn

# Connection states (ClientConnection.state).
IDLE, HEAD, BODY, BUSY, ENDING, TUNNEL, LINGER, CLOSING, CLOSED = range(9)
CONNECTION_STATES = (
    "IDLE",
    "HEAD",
    "BODY",
    "BUSY",
    "ENDING",
    "TUNNEL",
    "LINGER",
    "CLOSING",
    "CLOSED",
)

# Exchange states (Exchange.state).
QUEUED, CONNECTING, WAITING, RELAYING, DONE, ABORTED = range(6)
EXCHANGE_STATES = ("QUEUED", "CONNECTING", "WAITING", "RELAYING", "DONE", "ABORTED")

CONNECTION_TRANSITIONS: dict[int, frozenset[int]] = {
    IDLE: frozenset({HEAD, LINGER, CLOSING, CLOSED}),
    HEAD: frozenset({BODY, BUSY, ENDING, LINGER, CLOSING, CLOSED}),
    BODY: frozenset({BUSY, ENDING, LINGER, CLOSING, CLOSED}),
    BUSY: frozenset({IDLE, HEAD, ENDING, TUNNEL, LINGER, CLOSING, CLOSED}),
    ENDING: frozenset({TUNNEL, LINGER, CLOSING, CLOSED}),
    TUNNEL: frozenset({CLOSING, CLOSED}),
    LINGER: frozenset({CLOSING, CLOSED}),
    CLOSING: frozenset({CLOSED}),
    CLOSED: frozenset(),
}

EXCHANGE_TRANSITIONS: dict[int, frozenset[int]] = {
    # A pooled connection goes straight to WAITING; tdproxy's own answers (503, refusals) go
    # straight to DONE.
    QUEUED: frozenset({CONNECTING, WAITING, DONE, ABORTED}),
    # A failed connect is retried on another backend (CONNECTING again) or answered (DONE).
    CONNECTING: frozenset({CONNECTING, WAITING, DONE, ABORTED}),
    # A retry or replay after the backend failed before answering goes back to CONNECTING or,
    # on a pooled connection, WAITING again.
    WAITING: frozenset({CONNECTING, WAITING, RELAYING, DONE, ABORTED}),
    # A response head still in the unsent write batch can be taken back (see ResponseRelay).
    RELAYING: frozenset({CONNECTING, WAITING, DONE, ABORTED}),
    DONE: frozenset(),
    ABORTED: frozenset(),
}

# Seconds a connection lingers after an error answer (see ClientIO.linger).
LINGER_SECONDS = 2.0
# How much longer than its longest deadline a connection may go without progress.
BACKSTOP_SLACK = 5.0


def connection_state_name(state: int) -> str:
    return CONNECTION_STATES[state]


def exchange_state_name(state: int) -> str:
    return EXCHANGE_STATES[state]
