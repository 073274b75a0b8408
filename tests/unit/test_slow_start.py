"""Slow start: the ramp's math, which events start a ramp, and that the selector follows it."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from tdproxy.config import Config, parse_config
from tdproxy.config.loader import ConfigError
from tdproxy.controlplane.slow_start import SlowStartDriver
from tdproxy.routing.router import Router
from tdproxy.routing.slow_start import ramp_fraction, ramp_step, selector_weight
from tdproxy.routing.table import RoutingTable
from tests.fakes.process import async_wait_until
from tests.fakes.routing import new_router


class Clock:
    """Monotonic seconds that move only when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_config(
    *spec: tuple[str, int], slow_start: str | None = "10s", method: str = "round_robin"
) -> Config:
    backends = [
        {"name": name, "url": f"http://{name}.internal", "weight": weight} for name, weight in spec
    ]
    routing: dict[str, Any] = {"method": method, "slow_start": slow_start}
    return parse_config({"routing": routing, "backends": backends})


def effective(table: RoutingTable) -> dict[str, float]:
    return {target.name: table.effective_weight(target) for target in table.targets}


def recover(router: Router, name: str, clock: Clock) -> None:
    """``name`` goes down, then comes back up at ``clock``'s time."""
    state = router.states[name]
    state.set_health(False, "test: down", monotonic=clock)
    router.refresh()
    state.set_health(True, "test: up", monotonic=clock)
    router.refresh()


def shares(table: RoutingTable, count: int) -> Counter[str]:
    picked: Counter[str] = Counter()
    for _ in range(count):
        target = table.pick()
        assert target is not None
        picked[target.name] += 1
    return picked


# -- the math --------------------------------------------------------------------------------


def test_the_ramp_is_linear_from_ten_percent_to_full() -> None:
    assert ramp_fraction(100.0, 10.0, 100.0) == pytest.approx(0.1)
    assert ramp_fraction(100.0, 10.0, 105.0) == pytest.approx(0.55)
    assert ramp_fraction(100.0, 10.0, 109.0) == pytest.approx(0.91)
    assert ramp_fraction(100.0, 10.0, 110.0) == 1.0
    assert ramp_fraction(100.0, 10.0, 500.0) == 1.0
    assert ramp_fraction(100.0, 10.0, 99.0) == pytest.approx(0.1)  # never below the floor


def test_no_ramp_without_a_start_or_a_window() -> None:
    assert ramp_fraction(None, 10.0, 100.0) == 1.0
    assert ramp_fraction(100.0, None, 100.0) == 1.0


def test_selector_weights_are_integers_of_at_least_one() -> None:
    assert selector_weight(1, 0.1, 10) == 1
    assert selector_weight(1, 0.55, 10) in (5, 6)
    assert selector_weight(1, 1.0, 10) == 10
    assert selector_weight(50, 0.1, 10) == 50
    assert selector_weight(50, 1.0, 10) == 500
    assert selector_weight(50, 1.0, 1) == 50
    assert selector_weight(0, 0.5, 10) == 0  # a drain stays a drain
    for weight in (1, 2, 3, 7, 1_000_000):
        for step in range(11):
            assert selector_weight(weight, 0.1 + 0.09 * step, 10) >= 1


def test_ramp_steps_are_a_second_or_a_tenth_of_a_short_window() -> None:
    assert ramp_step(30.0) == 1.0
    assert ramp_step(10.0) == 1.0
    assert ramp_step(2.0) == pytest.approx(0.2)


def test_slow_start_is_a_positive_duration_or_null() -> None:
    assert make_config(("blue", 1), slow_start=None).routing.slow_start is None
    assert make_config(("blue", 1), slow_start="30s").routing.slow_start == 30.0
    assert make_config(("blue", 1), slow_start="2m").routing.slow_start == 120.0
    for bad in ("0s", 0, "-1s", "soon"):
        with pytest.raises(ConfigError) as raised:
            make_config(("blue", 1), slow_start=bad)  # type: ignore[arg-type]
        assert "routing.slow_start" in raised.value.describe()


# -- which events start a ramp ---------------------------------------------------------------


def test_no_ramp_at_process_start() -> None:
    clock = Clock()
    router = new_router(make_config(("blue", 50), ("green", 50)), monotonic=clock)
    assert all(state.ramp_started is None for state in router.states.values())
    assert router.table.ramp_ends is None
    assert effective(router.table) == {"blue": 50, "green": 50}


def test_a_backend_back_up_after_being_down_ramps() -> None:
    clock = Clock()
    router = new_router(make_config(("blue", 50), ("green", 50)), monotonic=clock)
    clock.now += 5
    recover(router, "green", clock)
    assert router.states["green"].ramp_started == clock.now
    assert router.table.ramp_ends == clock.now + 10
    assert effective(router.table) == {"blue": 50, "green": 5}
    clock.now += 5
    router.refresh()
    assert effective(router.table) == {"blue": 50, "green": pytest.approx(27.5)}
    clock.now += 5
    router.refresh()
    assert effective(router.table) == {"blue": 50, "green": 50}
    assert router.table.ramp_ends is None
    assert router.table.scale == 1  # the configured weights again


def test_going_down_mid_ramp_ends_it_and_coming_back_starts_it_again() -> None:
    clock = Clock()
    router = new_router(make_config(("blue", 50), ("green", 50)), monotonic=clock)
    recover(router, "green", clock)
    clock.now += 8
    router.refresh()
    assert effective(router.table)["green"] == pytest.approx(41)
    router.states["green"].set_health(False, "test: down", monotonic=clock)
    router.refresh()
    assert router.states["green"].ramp_started is None
    assert router.table.ramp_ends is None
    router.states["green"].set_health(True, "test: up", monotonic=clock)
    router.refresh()
    assert effective(router.table)["green"] == 5


def test_no_ramp_while_slow_start_is_off() -> None:
    clock = Clock()
    router = new_router(make_config(("blue", 50), ("green", 50), slow_start=None), monotonic=clock)
    recover(router, "green", clock)
    assert router.table.ramp_ends is None
    assert effective(router.table) == {"blue": 50, "green": 50}


def test_a_backend_a_reload_adds_ramps() -> None:
    clock = Clock()
    router = new_router(make_config(("blue", 50)), monotonic=clock)
    clock.now += 60
    table = router.apply(make_config(("blue", 50), ("green", 50)))
    assert router.states["green"].ramp_started == clock.now
    assert router.states["blue"].ramp_started is None
    assert effective(table) == {"blue": 50, "green": 5}
    assert table.ramp_ends == clock.now + 10


def test_a_backend_a_reload_raises_from_weight_zero_ramps() -> None:
    clock = Clock()
    router = new_router(make_config(("blue", 100), ("green", 0)), monotonic=clock)
    clock.now += 60
    table = router.apply(make_config(("blue", 50), ("green", 50)))
    assert effective(table) == {"blue": 50, "green": 5}
    clock.now += 10
    router.refresh()
    assert effective(router.table) == {"blue": 50, "green": 50}


def test_a_reload_leaves_unchanged_and_reweighted_backends_unramped() -> None:
    clock = Clock()
    router = new_router(make_config(("blue", 70), ("green", 30)), monotonic=clock)
    clock.now += 60
    table = router.apply(make_config(("blue", 50), ("green", 50)))  # 70 -> 50, 30 -> 50
    assert table.ramp_ends is None
    assert effective(table) == {"blue": 50, "green": 50}
    table = router.apply(make_config(("blue", 50), ("green", 50), slow_start="20s"))
    assert table.ramp_ends is None
    assert all(state.ramp_started is None for state in router.states.values())


def test_a_reload_keeps_a_ramp_going_on() -> None:
    clock = Clock()
    router = new_router(make_config(("blue", 50), ("green", 50)), monotonic=clock)
    recover(router, "green", clock)
    clock.now += 5
    table = router.apply(make_config(("blue", 50), ("green", 50), slow_start="20s"))
    # The same start, the new window: 10 % + 90 % * 5/20.
    assert effective(table)["green"] == pytest.approx(16.25, abs=0.1)
    assert table.ramp_ends == clock.now - 5 + 20


def test_failover_ignores_slow_start() -> None:
    clock = Clock()
    router = new_router(
        make_config(("blue", 50), ("green", 50), method="failover"), monotonic=clock
    )
    recover(router, "blue", clock)
    assert router.table.ramp_ends is None
    assert effective(router.table) == {"blue": 50, "green": 50}
    assert shares(router.table, 10) == {"blue": 10}


# -- the selector follows the ramp -----------------------------------------------------------


def test_the_share_of_picks_follows_the_effective_weights() -> None:
    clock = Clock()
    router = new_router(make_config(("blue", 1), ("green", 1)), monotonic=clock)
    assert shares(router.table, 100) == {"blue": 50, "green": 50}
    recover(router, "green", clock)
    # 10 % of weight 1 against a full 1: 1 to 10 in every 11 picks.
    assert shares(router.table, 110) == {"blue": 100, "green": 10}
    clock.now += 5  # 55 %: 5.5 rounds to 6 (of 10)
    router.refresh()
    assert shares(router.table, 160) == {"blue": 100, "green": 60}
    clock.now += 5
    router.refresh()
    assert shares(router.table, 100) == {"blue": 50, "green": 50}


def test_a_step_that_changes_no_weight_keeps_the_rotation() -> None:
    clock = Clock()
    router = new_router(make_config(("blue", 1), ("green", 1), slow_start="1h"), monotonic=clock)
    recover(router, "green", clock)
    before = router.table.pick()
    selector = router.table._selector
    clock.now += 1  # 1 s of an hour: 10 % + 0.025 %, the same integer weights
    router.refresh()
    assert router.table._selector is selector
    after = [router.table.pick() for _ in range(10)]
    # The cycle of 11 (10 blue, 1 green) went on: one green in the 11 picks around the step.
    assert Counter(t.name for t in [before, *after] if t is not None) == {"blue": 10, "green": 1}


def test_a_reload_during_a_ramp_goes_on_with_the_rotation() -> None:
    def ramping_router() -> Router:
        router = new_router(make_config(("blue", 1), ("green", 1)), monotonic=clock)
        recover(router, "green", clock)
        return router

    def names(router: Router, count: int) -> list[str]:
        return [t.name for t in (router.table.pick() for _ in range(count)) if t is not None]

    clock = Clock()
    uninterrupted = names(ramping_router(), 22)
    router = ramping_router()
    before = names(router, 7)
    router.apply(make_config(("blue", 1), ("green", 1)))
    assert before + names(router, 15) == uninterrupted
    assert uninterrupted.count("green") == 2


def test_sticky_users_pinned_to_a_ramping_backend_stay_there() -> None:
    clock = Clock()
    router = new_router(make_config(("blue", 50), ("green", 50), method="sticky"), monotonic=clock)
    green = router.table.by_name["green"]
    cookie = green.set_cookie.decode().removeprefix("Set-Cookie: ").split(";")[0].encode()
    recover(router, "green", clock)
    assert effective(router.table)["green"] == 5
    picked = [router.table.pick(cookie=cookie) for _ in range(50)]
    assert all(target is green for target in picked)


# -- the driver ------------------------------------------------------------------------------


async def test_the_driver_steps_the_ramp_and_stops_when_it_is_over() -> None:
    router = new_router(make_config(("blue", 1), ("green", 1), slow_start="400ms"))
    driver = SlowStartDriver(router)
    driver.start()
    assert not driver.active  # nothing ramps
    state = router.states["green"]
    state.set_health(False, "test: down")
    router.refresh()
    state.set_health(True, "test: up")
    seen: set[float] = set()
    router.refresh()  # the ramp starts: the router wakes the driver
    assert driver.active

    def over() -> bool:
        seen.add(router.table.effective_weight(router.table.by_name["green"]))
        return not driver.active

    await async_wait_until(over, timeout=3.0, interval=0.005, message="ramp over")
    assert router.table.ramp_ends is None
    assert router.table.effective_weight(router.table.by_name["green"]) == 1
    assert len(seen) >= 5, seen  # it went up in steps (of 40 ms here), not in one jump
    assert min(seen) < 0.5
    await driver.stop()


async def test_the_driver_stops_cleanly_mid_ramp() -> None:
    router = new_router(make_config(("blue", 1), ("green", 1), slow_start="1h"))
    driver = SlowStartDriver(router)
    driver.start()
    router.states["green"].set_health(False, "test: down")
    router.states["green"].set_health(True, "test: up")
    router.refresh()
    assert driver.active
    await asyncio.sleep(0)
    await driver.stop()
    assert not driver.active
    assert router.on_ramp is None
    router.refresh()  # no driver listens any more: nothing starts
    assert not driver.active
