"""Slow start: the weight a backend rotates by while it ramps up after coming into service.

Theory of operation
-------------------
A backend that comes back up after being down, that a reload adds, or that a reload raises from
weight 0 starts a *ramp*: its observed state (:class:`~tdproxy.routing.state.BackendState`)
records when (``ramp_started``, monotonic seconds), the config says for how long
(``routing.slow_start``). Over that window its weight grows linearly from ``RAMP_FLOOR`` (10 %)
to 100 % of the configured weight, as HAProxy's ``slowstart`` and Envoy's slow-start window do.

The selector works on integers, and 10 % of a weight of 1 is not one. So while any backend of a
table ramps, every weight in that table is multiplied by ``RAMP_SCALE`` (the ratios of the
others hold) and a ramping backend's is ``round(weight * RAMP_SCALE * fraction)``, at least 1:
with weight 1 the ramp moves in tenths, with larger weights finer. Once no backend ramps, the
weights are the configured ones again. The selector is never rebuilt per request: it is rebuilt
on health changes and reloads, and every ``ramp_step(window)`` while a ramp lasts (by
:class:`~tdproxy.controlplane.slow_start.SlowStartDriver`), so the ramp is a staircase of steps of
at most one second.
"""

from __future__ import annotations

RAMP_FLOOR = 0.1  # a ramp starts at this part of the configured weight
RAMP_SCALE = 10  # while a ramp lasts, every selector weight is the configured one times this
MAX_RAMP_STEP = 1.0  # seconds between selector rebuilds while a ramp lasts (at most)
RAMP_STEPS = 10  # ... and at least this many steps over a short window


def ramp_fraction(started: float | None, window: float | None, now: float) -> float:
    """The part (``RAMP_FLOOR``..1) of its configured weight a backend rotates by at ``now``;
    1.0 when it is not ramping (never started, slow start off, or the window is over)."""
    if started is None or window is None:
        return 1.0
    if now >= started + window:  # the very sum a table's ``ramp_ends`` is
        return 1.0
    return RAMP_FLOOR + (1.0 - RAMP_FLOOR) * max(0.0, now - started) / window


def selector_weight(weight: int, fraction: float, scale: int) -> int:
    """The integer a backend of configured ``weight`` rotates by at ``fraction`` of its ramp,
    in a table whose weights are multiplied by ``scale``; at least 1 when ``weight`` is."""
    if weight <= 0:
        return 0
    if fraction >= 1.0:
        return weight * scale
    return max(1, round(weight * scale * fraction))


def ramp_step(window: float) -> float:
    """Seconds between selector rebuilds while a ramp of ``window`` seconds lasts."""
    return min(MAX_RAMP_STEP, window / RAMP_STEPS)
