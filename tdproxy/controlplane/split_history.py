"""The observed split over the last minutes, for the status page's chart (pure; no clock).

The data plane keeps each backend's requests per second for one minute only
(:class:`~tdproxy.routing.state.BackendState`). The admin server's sampling task copies the
observed shares (over that minute) into a :class:`SplitHistory` every few seconds; the chart
draws those samples and then the current value, so its last point is what ``/api/v1/status``
says at the same moment.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping

HISTORY_SECONDS = 15 * 60

Point = tuple[float, dict[str, float]]  # (epoch seconds, {backend: observed share 0..1})


class SplitHistory:
    """Observed shares sampled over the last ``span`` seconds."""

    def __init__(self, span: float = HISTORY_SECONDS, interval: float = 5.0) -> None:
        self.span = span
        # Sized for one sample per interval, with slack for a late sampler.
        self._points: deque[Point] = deque(maxlen=int(span / interval) + 8)

    def sample(self, now: float, shares: Mapping[str, float]) -> None:
        self._points.append((now, dict(shares)))
        while self._points and self._points[0][0] < now - self.span:
            self._points.popleft()

    def points(self, now: float, current: Mapping[str, float]) -> list[Point]:
        """The samples of the last ``span`` seconds before ``now``, oldest first, then
        ``(now, current)``."""
        since = now - self.span
        earlier = [(t, shares) for t, shares in self._points if since <= t < now]
        return [*earlier, (now, dict(current))]

    def __len__(self) -> int:
        return len(self._points)

    def __repr__(self) -> str:
        return f"<SplitHistory {len(self._points)} samples over {self.span:g}s>"
