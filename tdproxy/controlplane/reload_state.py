"""What the admin server and metrics report about config reloads."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ReloadOutcome:
    """The result of one reload attempt."""

    ok: bool
    time: float
    trigger: str  # "file", "signal", "api", "start"
    generation: int  # the generation serving after the attempt
    changes: tuple[str, ...] = ()  # what changed, one line each (empty: nothing changed)
    errors: tuple[str, ...] = ()  # why it failed (file, key path, reason), one line each
    pending_restart: tuple[str, ...] = ()  # changes that apply only at the next start

    def summary(self) -> str:
        if not self.ok:
            return "failed: " + "; ".join(self.errors)
        summary = "; ".join(self.changes) if self.changes else "no change"
        if self.pending_restart:
            summary += "; at the next start: " + "; ".join(self.pending_restart)
        return summary


@dataclass
class ReloadHistory:
    """Counters and the last outcome; ``reloads`` feeds tdproxy_config_reloads_total."""

    last: ReloadOutcome | None = None
    reloads: dict[str, int] = field(default_factory=lambda: {"success": 0, "failure": 0})
    started_at: float = field(default_factory=time.time)

    def record(self, outcome: ReloadOutcome) -> None:
        self.last = outcome
        if outcome.trigger != "start":
            self.reloads["success" if outcome.ok else "failure"] += 1

    @property
    def last_successful(self) -> bool:
        return self.last is None or self.last.ok
