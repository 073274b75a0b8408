"""The log writer: lines leave through a thread, a full queue drops and counts instead of
blocking, one notice per episode of drops, and a broken descriptor drops everything."""

from __future__ import annotations

import logging
import os
import time

from tdproxy.observability.log_output import LogWriter, QueuedLogHandler, line_batches

Notices = list[tuple[str, bool]]


def read_all(fd: int) -> bytes:
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    return data


def notices() -> tuple[Notices, object]:
    seen: Notices = []

    def on_drop(writer: LogWriter, started: bool) -> None:
        seen.append((writer.name, started))

    return seen, on_drop


def test_lines_are_written_whole_and_in_order(pipe: tuple[int, int]) -> None:
    read, write = pipe
    writer = LogWriter(write, "test")
    for batch in range(100):
        writer.write_lines([f"{batch}-{n}" for n in range(10)])
    assert writer.close(timeout=5)
    os.close(write)
    lines = read_all(read).decode().splitlines()
    assert lines == [f"{batch}-{n}" for batch in range(100) for n in range(10)]
    assert writer.dropped == 0


def test_a_stalled_reader_costs_lines_not_time(pipe: tuple[int, int]) -> None:
    read, write = pipe
    seen, on_drop = notices()
    writer = LogWriter(write, "stalled", capacity=100_000, on_drop=on_drop)  # type: ignore[arg-type]
    line = "x" * 99
    started = time.monotonic()
    for _ in range(100):  # 1 MB: far more than the pipe (64 KiB) and the queue hold
        writer.write_lines([line] * 100)
    assert time.monotonic() - started < 2.0  # never waited for the reader
    assert writer.dropped > 0
    assert seen == [("stalled", True)]  # one notice, however many drops
    assert writer.close(timeout=0.2) is False  # the reader still has not read: not waited for
    data = b""
    while len(data) + writer.dropped * 100 < 1_000_000:
        data += os.read(read, 65536)
    assert data.count(b"\n") + writer.dropped == 10_000  # every line written or counted


def test_partial_batch_keeps_the_lines_that_fit(pipe: tuple[int, int]) -> None:
    read, write = pipe
    writer = LogWriter(write, "small", capacity=10)
    # Lines of 4 characters plus a newline: two fit in 10.
    writer.write_lines(["aaaa", "bbbb", "cccc"])
    assert writer.close(timeout=5)
    os.close(write)
    assert read_all(read) == b"aaaa\nbbbb\n"
    assert writer.dropped == 1


def test_a_closed_reader_turns_into_counted_drops(pipe: tuple[int, int]) -> None:
    read, write = pipe
    os.close(read)
    writer = LogWriter(write, "gone")
    writer.write_lines(["one", "two"])
    writer.write_lines(["three"])
    assert writer.close(timeout=5)
    assert writer.dropped == 3


def test_the_handler_formats_records_into_the_writer(pipe: tuple[int, int]) -> None:
    read, write = pipe
    writer = LogWriter(write, "records")
    handler = QueuedLogHandler(writer)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("tdproxy.test-log-output")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("first %s", "record")
        logger.error("second\nwith two lines")
    finally:
        logger.removeHandler(handler)
    assert writer.close(timeout=5)
    os.close(write)
    assert read_all(read) == b"WARNING first record\nERROR second\nwith two lines\n"


def test_batches_for_a_shared_pipe_are_cut_at_line_ends() -> None:
    lines = [b"a" * 10, b"b" * 4000, b"c" * 5000, b"d" * 95, b"e"]
    data = b"".join(line + b"\n" for line in lines)
    pieces = line_batches(data, 4096)
    assert b"".join(pieces) == data
    assert all(piece.endswith(b"\n") for piece in pieces)
    # At most PIPE_BUF bytes each (atomic), but for the one line longer than that on its own.
    assert [len(piece) for piece in pieces] == [4012, 5001, 98]
    assert line_batches(b"") == []


def test_a_shared_writer_writes_every_line_whole(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    writer = LogWriter(write_end, "test")
    writer.shared = True
    lines = [f"{n:05d} " + "x" * 300 for n in range(40)]
    writer.write_lines(lines)
    assert writer.close(timeout=5)
    os.close(write_end)
    assert read_all(read_end).decode().splitlines() == lines
