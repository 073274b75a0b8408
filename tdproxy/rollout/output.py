"""What ``tdproxy rollout`` prints: one line per event, or one JSON object per line (``--json``),
and a progress bar for the interval while stdout is a terminal (never on a pipe or in a file).

The bar is drawn on one line with ``\\r`` and erased before every event line, so the events read
the same with or without it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

BAR_WIDTH = 24
REDRAW_SECONDS = 0.25


def duration_text(seconds: float) -> str:
    """``2m``, ``1m 30s``, ``45s``, ``1h 5m``, ``500ms``."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [
        f"{hours}h" if hours else "",
        f"{minutes}m" if minutes else "",
        f"{secs}s" if secs else "",
    ]
    return " ".join(part for part in parts if part) or "0s"


def weights_text(weights: Mapping[str, int]) -> str:
    """``green 25%  blue 75%`` (weights that add up to 100 read as percentages)."""
    return "  ".join(f"{name} {weight}%" for name, weight in weights.items())


def plain_weights(weights: Mapping[str, int]) -> str:
    """``blue=70 green=30 spare=1``: as ``tdproxy weights set`` takes them."""
    return " ".join(f"{name}={weight}" for name, weight in weights.items())


def json_number(value: float | None) -> float | None:
    """JSON has no infinity: an unbounded value is written as null."""
    return None if value is None or math.isinf(value) else value


class Reporter:
    """Writes events to ``stream``; draws the progress bar when ``progress`` is on."""

    def __init__(
        self,
        stream: TextIO,
        *,
        json_lines: bool,
        progress: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stream = stream
        self._json = json_lines
        self._progress = progress and not json_lines
        self._clock = clock
        self._drawn = False
        self._last_draw = -math.inf

    def event(self, kind: str, text: str, **fields: Any) -> None:
        """One event: ``text`` as a line, or with ``--json`` the fields as one object."""
        self.clear()
        if self._json:
            stamp = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
            line = json.dumps({"event": kind, "time": stamp, **fields}, allow_nan=False)
        else:
            line = text
        self._write(line + "\n")

    def event_json_only(self, kind: str, **fields: Any) -> None:
        """An event that only ``--json`` shows (its text went to stderr already)."""
        if self._json:
            self.event(kind, "", **fields)

    def progress(self, label: str, elapsed: float, total: float, note: str = "") -> None:
        """Redraw the bar (at most four times a second)."""
        if not self._progress:
            return
        now = self._clock()
        if now - self._last_draw < REDRAW_SECONDS:
            return
        self._last_draw = now
        done = min(1.0, elapsed / total) if total > 0 else 1.0
        filled = round(done * BAR_WIDTH)
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        text = f"{label} [{bar}] {duration_text(elapsed)} / {duration_text(total)}"
        self._write("\r\x1b[K" + (f"{text}  {note}" if note else text))
        self._drawn = True

    def clear(self) -> None:
        if self._drawn:
            self._write("\r\x1b[K")
            self._drawn = False
            self._last_draw = -math.inf

    def _write(self, text: str) -> None:
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):
            pass  # a closed pipe must not stop a rollout, nor its rollback
