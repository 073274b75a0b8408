"""The rise/fall state machine behind active health checks: pure, no sockets, no clock."""

from __future__ import annotations

from typing import Any

import pytest

from tdproxy.config import Config, parse_config
from tdproxy.controlplane.health import HealthHysteresis, needs_first_check
from tests.fakes.routing import new_router


def feed(tracker: HealthHysteresis, results: str) -> list[bool | None]:
    """Feed ``"+"`` (success) / ``"-"`` (failure) results; return what each ``observe`` said."""
    return [tracker.observe(result == "+") for result in results]


@pytest.mark.parametrize("fall", [1, 2, 3, 5])
def test_goes_down_after_exactly_fall_failures(fall: int) -> None:
    tracker = HealthHysteresis(fall=fall, rise=3)
    flips = feed(tracker, "-" * fall)
    assert flips == [None] * (fall - 1) + [False]
    assert not tracker.healthy
    assert tracker.failures == fall


@pytest.mark.parametrize("rise", [1, 2, 3, 5])
def test_comes_up_after_exactly_rise_successes(rise: int) -> None:
    tracker = HealthHysteresis(fall=3, rise=rise, healthy=False)
    flips = feed(tracker, "+" * rise)
    assert flips == [None] * (rise - 1) + [True]
    assert tracker.healthy


def test_a_success_breaks_a_failing_run() -> None:
    tracker = HealthHysteresis(fall=3, rise=3)
    assert feed(tracker, "--+--") == [None] * 5
    assert tracker.healthy
    assert feed(tracker, "-") == [False]


def test_a_failure_breaks_a_rising_run() -> None:
    tracker = HealthHysteresis(fall=3, rise=3, healthy=False)
    assert feed(tracker, "++-++") == [None] * 5
    assert not tracker.healthy
    assert feed(tracker, "+") == [True]


def test_flips_are_reported_once() -> None:
    tracker = HealthHysteresis(fall=2, rise=2)
    assert feed(tracker, "------") == [None, False, None, None, None, None]
    assert feed(tracker, "++++") == [None, True, None, None]


def test_full_cycle_down_and_up() -> None:
    tracker = HealthHysteresis(fall=3, rise=2)
    assert feed(tracker, "+--+---++") == [None, None, None, None, None, None, False, None, True]


def test_configure_keeps_the_running_counts() -> None:
    tracker = HealthHysteresis(fall=5, rise=3)
    feed(tracker, "--")
    tracker.configure(fall=3, rise=3)
    assert tracker.failures == 2
    assert feed(tracker, "-") == [False]


def test_lowering_fall_below_the_run_flips_on_the_next_failure() -> None:
    tracker = HealthHysteresis(fall=5, rise=3)
    feed(tracker, "---")
    tracker.configure(fall=2, rise=3)
    assert tracker.healthy  # thresholds alone change nothing; the next result decides
    assert feed(tracker, "-") == [False]


def test_raising_rise_extends_a_run_in_progress() -> None:
    tracker = HealthHysteresis(fall=1, rise=2, healthy=False)
    feed(tracker, "+")
    tracker.configure(fall=1, rise=4)
    assert feed(tracker, "+++") == [None, None, True]


def test_reset_forces_health_and_counts_from_zero() -> None:
    tracker = HealthHysteresis(fall=3, rise=3)
    feed(tracker, "++++++")
    tracker.reset(False)  # e.g. a passive down
    assert (tracker.healthy, tracker.successes, tracker.failures) == (False, 0, 0)
    assert feed(tracker, "+++") == [None, None, True]

    tracker.reset(True)
    assert feed(tracker, "---") == [None, None, False]


def test_starts_healthy_by_default() -> None:
    tracker = HealthHysteresis(fall=1, rise=1)
    assert tracker.healthy
    assert feed(tracker, "+") == [None]


def test_repr_shows_health_and_progress() -> None:
    tracker = HealthHysteresis(fall=3, rise=2)
    feed(tracker, "-")
    assert repr(tracker) == "<HealthHysteresis up successes=0/2 failures=1/3>"
    feed(tracker, "--+")
    assert repr(tracker) == "<HealthHysteresis down successes=1/2 failures=0/3>"


def test_uses_slots() -> None:
    tracker = HealthHysteresis(fall=1, rise=1)
    with pytest.raises(AttributeError):
        tracker.extra = 1  # type: ignore[attr-defined]


# -- what a reload must check before it serves ------------------------------------------------


def _config(backends: dict[str, str], enabled: bool = True, **extra: Any) -> Config:
    entries = [{"name": name, "url": url, **extra.get(name, {})} for name, url in backends.items()]
    return parse_config({"backends": entries, "health_check": {"enabled": enabled}})


def _unchecked(old: Config, new: Config) -> list[str]:
    return [target.name for target in needs_first_check(old, new, new_router(new).table)]


def test_a_reload_checks_added_backends_and_changed_urls_only() -> None:
    old = _config({"a": "http://a.internal", "b": "http://b.internal"})
    assert _unchecked(old, old) == []
    new = _config({"a": "http://a.internal", "b": "http://b2.internal", "c": "http://c.internal"})
    assert _unchecked(old, new) == ["b", "c"]
    verify_off = _config(
        {"a": "https://a.internal", "b": "http://b.internal"}, a={"tls_verify": False}
    )
    assert _unchecked(
        _config({"a": "https://a.internal", "b": "http://b.internal"}), verify_off
    ) == ["a"]


def test_a_reload_turning_checks_on_checks_every_backend() -> None:
    off = _config({"a": "http://a.internal", "b": "http://b.internal"}, enabled=False)
    on = _config({"a": "http://a.internal", "b": "http://b.internal"})
    assert _unchecked(off, on) == ["a", "b"]


def test_without_checks_nothing_waits_for_one() -> None:
    old = _config({"a": "http://a.internal"}, enabled=False)
    new = _config({"a": "http://a.internal", "c": "http://c.internal"}, enabled=False)
    assert _unchecked(old, new) == []
