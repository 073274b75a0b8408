"""What the supervisor and its workers say to each other, and how it is framed (no I/O here).

Each message is one small named tuple, pickled, behind a 4-byte big-endian length. The channel
is a socketpair the supervisor creates for each worker it starts, so nothing else can write to
it: pickle is used for what it is good at (the validated ``Config`` and the counters go across
as they are), not for data from outside.

Supervisor -> worker: :class:`Init` (first, once), :class:`Prepare` / :class:`Commit` (a new
generation, two phases so that every worker switches at the same moment), :class:`States`
(health and slow-start ramps changed), :class:`ReloadTls`, :class:`Stop`.

Worker -> supervisor: :class:`Ready` or :class:`Failed` (start-up), :class:`Prepared`,
:class:`Committed`, :class:`Counters` (a few times a second, and once more at exit),
:class:`PassiveFailure` (at once: it may take a backend out of rotation everywhere).
"""

from __future__ import annotations

import pickle
import struct
from typing import NamedTuple

from tdproxy.config.model import Config
from tdproxy.workers.counters import WorkerCounters

HEADER = struct.Struct(">I")
MAX_FRAME = 64 * 1024 * 1024  # a config is at most 4 MiB of YAML; anything bigger is corrupt


class BackendHealth(NamedTuple):
    """What the supervisor knows about one backend that changes which backends a worker picks."""

    healthy: bool
    reason: str
    changed_at: float  # epoch seconds
    ramp_started: float | None  # monotonic seconds (CLOCK_MONOTONIC is system-wide)


HealthStates = dict[str, BackendHealth]


# -- supervisor -> worker ----------------------------------------------------------------


class Init(NamedTuple):
    worker: int  # the worker's slot, 0..N-1
    config: Config
    generation: int
    states: HealthStates
    port: int  # the entrypoint port (resolved when the config says 0)
    workers: int  # how many there are: limits.max_connections is shared out among them


class Prepare(NamedTuple):
    generation: int
    config: Config


class Commit(NamedTuple):
    generation: int
    config: Config  # again: a worker started since Prepare builds it now
    states: HealthStates


class States(NamedTuple):
    states: HealthStates


class ReloadTls(NamedTuple):
    pass


class Stop(NamedTuple):
    grace: float


# -- worker -> supervisor ----------------------------------------------------------------


class Ready(NamedTuple):
    pid: int


class Failed(NamedTuple):
    reason: str


class Prepared(NamedTuple):
    generation: int
    error: str | None


class Committed(NamedTuple):
    generation: int


class Counters(NamedTuple):
    counters: WorkerCounters


class PassiveFailure(NamedTuple):
    backend: str
    kind: str
    consecutive: int  # this worker's run of failures on that backend


ToWorker = Init | Prepare | Commit | States | ReloadTls | Stop
FromWorker = Ready | Failed | Prepared | Committed | Counters | PassiveFailure
Message = ToWorker | FromWorker


class FrameError(ValueError):
    """The byte stream is not a sequence of frames: the other side is broken."""


def encode(message: Message) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(body)) + body


class FrameDecoder:
    """Bytes in, messages out, whatever way the stream was cut."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        buffer = self._buffer
        buffer += data
        messages: list[Message] = []
        offset = 0
        while len(buffer) - offset >= HEADER.size:
            (size,) = HEADER.unpack_from(buffer, offset)
            if size > MAX_FRAME:
                raise FrameError(f"frame of {size} bytes")
            end = offset + HEADER.size + size
            if len(buffer) < end:
                break
            message = pickle.loads(bytes(buffer[offset + HEADER.size : end]))
            if not isinstance(message, Message):
                raise FrameError(f"not a message: {type(message).__name__}")
            messages.append(message)
            offset = end
        del buffer[:offset]
        return messages

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held."""
        return len(self._buffer)
