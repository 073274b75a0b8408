"""Signals from before anything starts until the process exits.

``tdproxy run`` handles SIGTERM, SIGINT and SIGHUP for its whole life, so no signal ever meets
Python's defaults (SIGTERM and SIGHUP kill the process outright, SIGINT raises
``KeyboardInterrupt`` wherever the code happens to be). There are three stretches:

1. Before the event loop runs (reading and checking the config): :class:`EarlySignals`
   records what arrives; the app acts on it as soon as its loop handlers are in place.
2. While the loop runs: :meth:`tdproxy.app.App.on_signal` decides by the app's phase
   (starting, running, stopping) what a signal means.
3. After the loop has closed (the last log lines being written out): :func:`ignore_all`.
"""

from __future__ import annotations

import signal
from types import FrameType

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class EarlySignals:
    """Records the signals that arrive before the event loop takes over."""

    def __init__(self) -> None:
        self.received: list[int] = []

    def install(self) -> None:
        for signum in HANDLED:
            signal.signal(signum, self._record)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)

    def __repr__(self) -> str:
        return f"<EarlySignals {[signal_name(s) for s in self.received]}>"


def ignore_all() -> None:
    """The loop is gone and the process is about to exit: nothing may interrupt that."""
    for signum in HANDLED:
        signal.signal(signum, signal.SIG_IGN)
