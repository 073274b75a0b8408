"""Log output that never blocks the event loop: bounded queues drained by writer threads.

Theory of operation
-------------------
A write to stdout or stderr blocks once the pipe behind it is full (64 KiB on Linux), which
happens whenever the log reader (a container log driver, a collector, a terminal on hold) stops
reading for a moment. On the event loop that would stop all traffic. So nothing on the loop
writes to a file descriptor: the access log hands batches of lines to :class:`LogWriter`
(stdout), and Python log records go through :class:`QueuedLogHandler` to another (stderr).
Each writer's thread takes everything queued and writes it with plain blocking writes; only
that thread ever waits for the reader.

Each queue holds at most ``MAX_QUEUED_BYTES`` (what is being written counts until written).
Lines that do not fit are dropped and counted (:func:`dropped_lines`, exported as
``tdproxy_log_lines_dropped_total``); the first drop of an episode is logged once, and its end
(the queue empty again, at least a minute later) once more with the number of lines lost. A
writer whose descriptor fails (closed, ``EPIPE``) drops everything from then on.

Invariants: ``write_lines`` never blocks on I/O (it takes one uncontended lock); the lock is
never held while writing or while logging; lines are written whole and in order.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence

MAX_QUEUED_BYTES = 4 * 1024 * 1024
# Writes of at most PIPE_BUF bytes to a pipe are atomic: with several processes writing to one
# pipe (worker processes), batches are cut at line ends below this, so no line is torn.
PIPE_BUF = 4096
CLOSE_TIMEOUT = 2.0  # seconds a clean exit waits for queued lines to be written
# An episode of drops ends when the queue is empty again, but not sooner than this after it
# began: a reader that keeps falling behind gets a notice a minute, not one per burst.
MIN_EPISODE_SECONDS = 60.0

log = logging.getLogger("tdproxy.log")


class LogWriter:
    """Lines for one file descriptor, queued here and written by a daemon thread."""

    def __init__(
        self,
        fd: int,
        name: str,
        capacity: int = MAX_QUEUED_BYTES,
        on_drop: Callable[[LogWriter, bool], None] | None = None,
    ) -> None:
        self.fd = fd
        self.name = name
        self.shared = False  # other processes write to this fd too: see PIPE_BUF
        self.capacity = capacity
        self.dropped = 0  # lines dropped since start
        self._on_drop = on_drop  # (writer, started): an episode of drops started / ended
        self._chunks: list[str] = []
        self._queued = 0  # characters queued or being written
        self._dropping = False
        self._episode_start = 0  # ``dropped`` when the current episode began
        self._episode_began = 0.0  # and its monotonic time
        self._closed = False
        self._broken = False
        self._ready = threading.Condition(threading.Lock())
        self._thread = threading.Thread(target=self._run, name=f"tdproxy-log-{name}", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return (
            f"<LogWriter {self.name} fd={self.fd} queued={self._queued} dropped={self.dropped}"
            f"{' broken' if self._broken else ''}>"
        )

    def write_lines(self, lines: Sequence[str]) -> None:
        """Queue complete lines (without their newlines); drop and count what does not fit."""
        text = "\n".join(lines) + "\n"
        with self._ready:
            room = 0 if self._broken or self._closed else self.capacity - self._queued
            if len(text) <= room:
                self._chunks.append(text)
                self._queued += len(text)
                self._ready.notify()
                return
            kept = _fitting(lines, room)
            if kept:
                text = "\n".join(lines[:kept]) + "\n"
                self._chunks.append(text)
                self._queued += len(text)
                self._ready.notify()
            self.dropped += len(lines) - kept
            started = not self._dropping
            if started:
                self._dropping = True
                self._episode_start = self.dropped - (len(lines) - kept)
                self._episode_began = time.monotonic()
        # Outside the lock: the notice may come back here through the log handler.
        if started and self._on_drop is not None:
            self._on_drop(self, True)

    def write_line(self, line: str) -> None:
        self.write_lines((line,))

    def episode_drops(self) -> int:
        """Lines dropped since the current (or last) episode of drops began."""
        return self.dropped - self._episode_start

    def close(self, timeout: float = CLOSE_TIMEOUT) -> bool:
        """Write what is queued (waiting at most ``timeout``) and stop the thread.

        Returns False when the reader still had not taken everything; the daemon thread is then
        left behind, so a stuck reader cannot hold the process at exit."""
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- the writer thread ----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._chunks and not self._closed:
                    self._ready.wait()
                if not self._chunks:
                    return
                chunks, self._chunks = self._chunks, []
            text = "".join(chunks)
            if not self._broken:
                try:
                    data = text.encode("utf-8", "backslashreplace")
                    for piece in line_batches(data) if self.shared else (data,):
                        _write_all(self.fd, piece)
                except OSError:
                    self._broken = True  # the reader is gone for good: drop from now on
            ended = False
            with self._ready:
                self._queued -= len(text)
                if self._broken:
                    self.dropped += text.count("\n")
                elif (
                    self._dropping
                    and self._queued == 0
                    and time.monotonic() - self._episode_began >= MIN_EPISODE_SECONDS
                ):
                    self._dropping = False
                    ended = True
            if ended and self._on_drop is not None:
                self._on_drop(self, False)


def _fitting(lines: Sequence[str], room: int) -> int:
    """How many of ``lines`` (each plus a newline) fit in ``room`` characters, from the start."""
    used = 0
    for index, line in enumerate(lines):
        used += len(line) + 1
        if used > room:
            return index
    return len(lines)


def line_batches(data: bytes, limit: int = PIPE_BUF) -> list[bytes]:
    """``data`` (whole lines) cut at line ends into pieces of at most ``limit`` bytes; a line
    longer than that is a piece of its own."""
    pieces = []
    start = 0
    while len(data) - start > limit:
        end = data.rfind(b"\n", start, start + limit) + 1
        if end <= start:  # one line longer than the limit
            end = data.find(b"\n", start + limit) + 1 or len(data)
        pieces.append(data[start:end])
        start = end
    if start < len(data):
        pieces.append(data[start:])
    return pieces


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class QueuedLogHandler(logging.Handler):
    """A logging handler that formats on the caller's thread and queues the line."""

    def __init__(self, writer: LogWriter) -> None:
        super().__init__()
        self.writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.writer.write_line(line)


# -- the process's two outputs --------------------------------------------------------------

_writers: dict[str, LogWriter] = {}
_lock = threading.Lock()


def _report(writer: LogWriter, started: bool) -> None:
    if started:
        log.warning(
            "log output on %s cannot keep up: dropping log lines "
            "(counted in tdproxy_log_lines_dropped_total)",
            writer.name,
        )
    else:
        log.warning(
            "log output on %s caught up; %d log line(s) were dropped",
            writer.name,
            writer.episode_drops(),
        )


def _writer(name: str, fd: int) -> LogWriter:
    with _lock:
        writer = _writers.get(name)
        if writer is None:
            writer = _writers[name] = LogWriter(fd, name, on_drop=_report)
        return writer


def stdout_writer() -> LogWriter:
    """The writer for the access log."""
    return _writer("stdout", sys.stdout.fileno())


def stderr_writer() -> LogWriter:
    """The writer for Python log records."""
    return _writer("stderr", sys.stderr.fileno())


def share_outputs() -> None:
    """Other processes write to this process's stdout and stderr too (worker processes): keep
    every write atomic so that lines never interleave mid-line."""
    stdout_writer().shared = True
    stderr_writer().shared = True


def dropped_lines() -> int:
    """Log lines dropped by this process because their output could not keep up."""
    return sum(writer.dropped for writer in list(_writers.values()))


def close_all(timeout: float = CLOSE_TIMEOUT) -> None:
    """At exit: write what is queued, each output waiting at most ``timeout``."""
    for name in ("stdout", "stderr"):  # stderr last: it may carry a notice about stdout
        writer = _writers.get(name)
        if writer is not None:
            writer.close(timeout)
