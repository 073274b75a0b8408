"""The change log: every applied config generation and every health transition, newest first.

Theory of operation: the app calls :meth:`ChangeLog.record` when a generation is installed
(at start and by each applied reload) and when a backend flips between up and down (active
checks or passive failures). Each :class:`Change` carries the configured split that results:
``weights`` as written and ``shares`` as ``/api/v1/status`` reports ``configured_share``, i.e.
weight over the sum of the non-backup weights, 0 for a backup (it serves only while no
non-backup backend is healthy), and in ``failover`` 1 for the first non-backup backend.

The summaries are pure functions of what changed, so they are tested without a process. A reload
that fails or finds the file unchanged applies no generation and is not recorded here (the
reload status says so). Health changes that a reload itself causes (a new backend down after its
first check, checks turned off) are part of that reload's entry.

Only the last :data:`MAX_CHANGES` are kept; each record is also one INFO line on ``tdproxy``.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, TypedDict

log = logging.getLogger("tdproxy")

MAX_CHANGES = 100

Kind = Literal["config", "health"]
Trigger = Literal["start", "file", "sighup", "api", "health"]

# Reload triggers as the app and the reload status name them -> the change log's names.
_TRIGGERS: dict[str, Trigger] = {
    "start": "start",
    "file": "file",
    "signal": "sighup",
    "sighup": "sighup",
    "api": "api",
}


def change_trigger(reload_trigger: str) -> Trigger:
    """The change log's name for a reload trigger (``signal`` is SIGHUP, the only one)."""
    return _TRIGGERS[reload_trigger]


class ChangeJson(TypedDict):
    time: str  # ISO-8601, UTC
    kind: Kind
    trigger: Trigger
    generation: int
    summary: str
    weights: dict[str, int]
    shares: dict[str, float]


@dataclass(frozen=True)
class Change:
    time: float  # epoch seconds
    kind: Kind
    trigger: Trigger
    generation: int
    summary: str
    weights: Mapping[str, int]
    shares: Mapping[str, float]

    def to_json(self) -> ChangeJson:
        return {
            "time": iso_time(self.time),
            "kind": self.kind,
            "trigger": self.trigger,
            "generation": self.generation,
            "summary": self.summary,
            "weights": dict(self.weights),
            "shares": dict(self.shares),
        }

    def log_line(self) -> str:
        weights = ", ".join(f"{name}={weight}" for name, weight in self.weights.items())
        return (
            f"change: {self.kind} ({self.trigger}), generation {self.generation}: "
            f"{self.summary} [weights {weights}]"
        )


class ChangeLog:
    """The last ``limit`` changes (oldest dropped first)."""

    def __init__(self, limit: int = MAX_CHANGES, clock: Callable[[], float] = time.time) -> None:
        self._changes: deque[Change] = deque(maxlen=limit)
        self._clock = clock

    def record(
        self,
        kind: Kind,
        trigger: Trigger,
        generation: int,
        summary: str,
        weights: Mapping[str, int],
        shares: Mapping[str, float],
    ) -> Change:
        change = Change(
            self._clock(), kind, trigger, generation, summary, dict(weights), dict(shares)
        )
        self._changes.append(change)
        log.info("%s", change.log_line())
        return change

    def latest(self, n: int | None = None) -> list[Change]:
        """The newest ``n`` (all when None), newest first."""
        newest = reversed(self._changes)
        count = len(self._changes) if n is None else max(0, min(n, len(self._changes)))
        return [next(newest) for _ in range(count)]

    def __len__(self) -> int:
        return len(self._changes)

    def __repr__(self) -> str:
        return f"<ChangeLog {len(self._changes)}/{self._changes.maxlen}>"


def iso_time(epoch: float) -> str:
    """``2026-11-27T17:20:26.125Z``."""
    moment = datetime.fromtimestamp(epoch, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- summaries (pure) --------------------------------------------------------------------------


def percent(share: float) -> str:
    """``70%``, ``33.3%``: one decimal at most, none when it is whole."""
    text = f"{share * 100:.1f}"
    return (text[:-2] if text.endswith(".0") else text) + "%"


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, abs_tol=1e-9)


def share_changes(before: Mapping[str, float], after: Mapping[str, float]) -> list[str]:
    """``blue 70% -> 0%`` for each backend whose configured share moved; a backend added or
    removed counts as coming from or going to 0%."""
    lines = []
    for name in [*after, *(name for name in before if name not in after)]:
        old, new = before.get(name, 0.0), after.get(name, 0.0)
        if not _same(old, new):
            lines.append(f"{name} {percent(old)} -> {percent(new)}")
    return lines


def weight_line(name: str, old: int, new: int) -> str:
    """How a reload's change list writes a weight change (see ``describe_changes``)."""
    return f"{name} weight {old} -> {new}"


def config_summary(
    before_weights: Mapping[str, int],
    before_shares: Mapping[str, float],
    after_weights: Mapping[str, int],
    after_shares: Mapping[str, float],
    changes: Sequence[str] = (),
    pending: Sequence[str] = (),
) -> str:
    """One line for an applied reload: the share moves first, then what else changed.

    When shares moved, the weight lines in ``changes`` are left out (the shares say it, and
    the record carries the weights); when only weights moved (70/30 -> 7/3) they stay."""
    moves = share_changes(before_shares, after_shares)
    rest = list(changes)
    if moves:
        weight_lines = {
            weight_line(name, before_weights[name], weight)
            for name, weight in after_weights.items()
            if name in before_weights
        }
        rest = [line for line in rest if line not in weight_lines]
    parts = []
    if moves:
        parts.append(", ".join(moves))
    parts.extend(rest)
    summary = "; ".join(parts) if parts else "no live change"
    if pending:
        summary += "; at the next start: " + "; ".join(pending)
    return summary


def start_summary(shares: Mapping[str, float], down: Mapping[str, str] | None = None) -> str:
    """``started: blue 70%, green 30%``, then any backend the start-up check found down."""
    split = ", ".join(f"{name} {percent(share)}" for name, share in shares.items())
    summary = f"started: {split}"
    for name, reason in (down or {}).items():
        summary += f"; {name} down ({reason})"
    return summary


def health_summary(name: str, healthy: bool, cause: str) -> str:
    """``green down: 3 failed checks (HTTP 503)``."""
    return f"{name} {'up' if healthy else 'down'}: {cause}"


def checks_cause(count: int, healthy: bool, detail: str = "") -> str:
    """``3 failed checks (HTTP 503)`` / ``3 successful checks``: the run of active check
    results that flipped the health. The detail is left out of a success."""
    noun = "check" if count == 1 else "checks"
    if healthy:
        return f"{count} successful {noun}"
    return f"{count} failed {noun}" + (f" ({detail})" if detail else "")


def passive_cause(count: int, kind: str) -> str:
    """``3 connect failures on live traffic``."""
    noun = "failure" if count == 1 else "failures"
    return f"{count} {kind} {noun} on live traffic"
