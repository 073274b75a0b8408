"""``tdproxy rollout`` without sockets: the plan, the judging arithmetic, and the step loop driven
against fake proxies on a fake clock."""

from __future__ import annotations

import io
import math
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from tdproxy.config.loader import parse_config_text
from tdproxy.config.model import Config
from tdproxy.rollout.judge import (
    Counters,
    Limits,
    counters_from_metrics,
    judge,
    p99_text,
    percent_text,
    quantile,
    total,
)
from tdproxy.rollout.output import Reporter, duration_text
from tdproxy.rollout.plan import RolloutError, make_plan, parse_steps, split_rest
from tdproxy.rollout.proxies import Look, admin_base
from tdproxy.rollout.runner import Interrupts, Options, Rollout
from tdproxy.weights_file import load_and_build


def config(text: str) -> Config:
    return parse_config_text(text)


THREE = config(
    """
backends:
  - {name: blue, url: "http://b", weight: 50}
  - {name: red, url: "http://r", weight: 30}
  - {name: green, url: "http://g", weight: 0}
  - {name: spare, url: "http://s", backup: true}
"""
)

# -- the plan ---------------------------------------------------------------------------------


def test_steps_are_rising_whole_percentages_ending_at_100() -> None:
    assert parse_steps("5,25,50,100") == (5, 25, 50, 100)
    assert parse_steps(" 10% , 100 ") == (10, 100)
    for bad, message in [
        ("", "expected percentages"),
        ("5,,100", "expected percentages"),
        ("0,100", "from 1 to 100"),
        ("5,101", "from 1 to 100"),
        ("5.5,100", "from 1 to 100"),
        ("50,50,100", "higher than the one before"),
        ("5,50", "the last step must be 100"),
    ]:
        with pytest.raises(RolloutError, match=message):
            parse_steps(bad)


def test_the_rest_is_shared_in_the_original_proportion_and_adds_up() -> None:
    plan = make_plan(THREE, "green", (), (5, 25, 100), 60)
    assert plan.sources == ("blue", "red")
    assert [step.weights for step in plan.steps] == [
        {"green": 5, "blue": 59, "red": 36},  # 95 * 5/8 = 59.375, 95 * 3/8 = 35.625
        {"green": 25, "blue": 47, "red": 28},  # 46.875 and 28.125
        {"green": 100, "blue": 0, "red": 0},
    ]
    assert all(sum(step.weights.values()) == 100 for step in plan.steps)
    assert plan.original == {"blue": 50, "red": 30, "green": 0, "spare": 1}
    assert (plan.shortest, plan.longest) == (180, 720)


def test_split_rest_is_equal_without_weights_and_breaks_ties_in_order() -> None:
    assert split_rest(95, ["a", "b"], {"a": 0, "b": 0}) == {"a": 48, "b": 47}
    assert split_rest(10, ["a", "b", "c"], {"a": 1, "b": 1, "c": 1}) == {"a": 4, "b": 3, "c": 3}
    assert split_rest(0, ["a"], {"a": 7}) == {"a": 0}


@pytest.mark.parametrize(
    ("to", "sources", "message"),
    [
        ("purple", (), "unknown backend 'purple'"),
        ("spare", (), "backend spare is a backup"),
        ("green", ("spare",), "backend spare is a backup"),
        ("green", ("green",), "both --to and --from"),
        ("green", ("blue", "blue"), "more than once"),
        ("green", ("blue",), "backend red (weight 30) is neither --to nor --from"),
    ],
)
def test_a_plan_that_cannot_work_is_refused(
    to: str, sources: tuple[str, ...], message: str
) -> None:
    with pytest.raises(RolloutError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_plan(THREE, to, sources, (100,), 60)


def test_failover_ignores_weights_so_it_is_refused() -> None:
    failover = config(
        "routing: {method: failover}\nbackends:\n"
        "  - {name: a, url: 'http://a'}\n  - {name: b, url: 'http://b'}\n"
    )
    with pytest.raises(RolloutError, match="failover"):
        make_plan(failover, "b", (), (100,), 60)


# -- judging --------------------------------------------------------------------------------

BOUNDS = (0.1, 0.25, 0.5, math.inf)


def buckets(*cumulative: float) -> tuple[tuple[float, float], ...]:
    return tuple(zip(BOUNDS, cumulative, strict=True))


def test_p99_interpolates_inside_the_bucket_holding_the_rank() -> None:
    assert quantile(0.99, buckets(0, 0, 0, 0)) is None
    assert quantile(0.99, buckets(100, 100, 100, 100)) == pytest.approx(0.099)
    # 90 fast, 10 in (0.25, 0.5]: rank 99 is the 9th of those 10
    assert quantile(0.99, buckets(90, 90, 100, 100)) == pytest.approx(0.25 + 0.25 * 0.9)
    # a rank above every finite bound is unbounded, never "10 s"
    assert quantile(0.99, buckets(90, 90, 90, 100)) == math.inf


def test_errors_count_tdproxys_own_502_for_an_upstream_error_once() -> None:
    # 2 answers of 500 by the backend, 3 x 502 made by tdproxy for 3 connect errors, 1 retry
    # after a 4th connect error; 100 answers in all
    window = Counters(100, 2, 3, 1, 4)
    assert window.requests == 101
    assert window.errors == 2 + 4
    # a reset that cut an answer short counts although its status was 200
    assert Counters(10, 0, 0, 0, 1).errors == 1
    # a backend that answers 502 itself: no upstream error, still an error
    assert Counters(10, 0, 2, 0, 0).errors == 2


METRICS = """\
# TYPE tdproxy_requests_total counter
tdproxy_requests_total{backend="green",code="200"} 90.0
tdproxy_requests_total{backend="green",code="500"} 4.0
tdproxy_requests_total{backend="green",code="502"} 1.0
tdproxy_requests_total{backend="green",code="404"} 5.0
tdproxy_requests_total{backend="blue",code="500"} 50.0
# TYPE tdproxy_request_duration_seconds histogram
tdproxy_request_duration_seconds_bucket{backend="green",le="0.1"} 80.0
tdproxy_request_duration_seconds_bucket{backend="green",le="0.25"} 99.0
tdproxy_request_duration_seconds_bucket{backend="green",le="+Inf"} 100.0
tdproxy_request_duration_seconds_count{backend="green"} 100.0
tdproxy_request_duration_seconds_sum{backend="green"} 5.0
# TYPE tdproxy_upstream_errors_total counter
tdproxy_upstream_errors_total{backend="green",kind="connect"} 2.0
tdproxy_upstream_errors_total{backend="green",kind="reset"} 0.0
# TYPE tdproxy_retries_total counter
tdproxy_retries_total{backend="green"} 1.0
"""


def test_counters_are_read_for_one_backend_from_the_exposition() -> None:
    counters = counters_from_metrics(METRICS, "green")
    assert counters == Counters(100, 4, 1, 1, 2, ((0.1, 80.0), (0.25, 99.0), (math.inf, 100.0)))
    assert counters_from_metrics(METRICS, "purple") == Counters()


def test_a_window_is_the_difference_and_a_reset_counts_from_zero() -> None:
    earlier = Counters(10, 1, 0, 0, 0, buckets(5, 10, 10, 10))
    later = Counters(30, 2, 0, 1, 1, buckets(20, 30, 30, 30))
    assert later.minus(earlier) == Counters(20, 1, 0, 1, 1, buckets(15, 20, 20, 20))
    restarted = Counters(3, 0, 0, 0, 0, buckets(3, 3, 3, 3))
    assert restarted.minus(earlier) == restarted
    summed = total([later.minus(earlier), restarted])
    assert summed.answered == 23 and summed.buckets == buckets(18, 23, 23, 23)


LIMITS = Limits(max_error_rate=0.01, max_p99=0.2, min_requests=10)


def test_the_verdict() -> None:
    fast = buckets(100, 100, 100, 100)
    assert judge(Counters(100, 0, 0, 0, 0, fast), LIMITS, final=True).outcome == "ok"
    assert (
        judge(Counters(100, 1, 0, 0, 0, fast), LIMITS, final=True).outcome == "ok"
    )  # 1 % is not over
    over = judge(Counters(100, 2, 0, 0, 0, fast), LIMITS, final=True)
    assert (over.outcome, over.reason) == ("fail", "error rate 2.0% over the limit 1.0%")
    slow = judge(Counters(100, 0, 0, 0, 0, buckets(0, 0, 100, 100)), LIMITS, final=True)
    assert (slow.outcome, slow.reason) == ("fail", "p99 498 ms over the limit 200 ms")
    short = judge(Counters(9, 0, 0, 0, 0, fast), LIMITS, final=True)
    assert (short.outcome, short.reason) == ("short", "9 of the 10 requests needed to judge")
    # before the end a window only fails, and only with enough requests
    assert judge(Counters(9, 9, 0, 0, 0, fast), LIMITS, final=False).outcome == "pending"
    assert judge(Counters(10, 0, 0, 0, 0, fast), LIMITS, final=False).outcome == "pending"
    assert judge(Counters(10, 5, 0, 0, 0, fast), LIMITS, final=False).outcome == "fail"
    unjudged = Limits(0.01, None, 10)
    assert (
        judge(Counters(100, 0, 0, 0, 0, buckets(0, 0, 0, 100)), unjudged, final=True).outcome
        == "ok"
    )


def test_printed_numbers() -> None:
    assert [percent_text(r) for r in (0, 0.004, 0.0004, 0.12)] == ["0%", "0.4%", "0.04%", "12%"]
    assert p99_text(Counters(1, 0, 0, 0, 0, buckets(0, 0, 0, 1))) == "over 500 ms"
    assert p99_text(Counters()) == "-"
    assert [duration_text(s) for s in (0.5, 45, 120, 90, 3900)] == [
        "500ms",
        "45s",
        "2m",
        "1m 30s",
        "1h 5m",
    ]


def test_admin_urls_are_base_urls() -> None:
    assert admin_base("http://127.0.0.1:9901/") == "http://127.0.0.1:9901"
    assert admin_base("http://h:1/api/v1/status") == "http://h:1"
    assert admin_base("https://h/metrics") == "https://h"
    for bad in ("127.0.0.1:9901", "ftp://h", "http://h/x", "http://h:1/?a=1"):
        with pytest.raises(RolloutError):
            admin_base(bad)


def test_the_progress_bar_is_only_drawn_when_asked_and_erased_before_events() -> None:
    shown = io.StringIO()
    reporter = Reporter(shown, json_lines=False, progress=True, clock=lambda: 10.0)
    reporter.progress("step 1/2", 30, 60)
    reporter.event("judged", "step 1/2 ok")
    assert shown.getvalue() == (
        "\r\x1b[Kstep 1/2 [############------------] 30s / 1m\r\x1b[Kstep 1/2 ok\n"
    )
    piped = io.StringIO()
    quiet = Reporter(piped, json_lines=False, progress=False)
    quiet.progress("step 1/2", 30, 60)
    quiet.event("judged", "step 1/2 ok")
    assert piped.getvalue() == "step 1/2 ok\n"


# -- the step loop against fake proxies ------------------------------------------------------

FILE = """\
# the two environments
backends:
  - name: blue
    url: http://127.0.0.1:1
    weight: 100   # live
  - name: green
    url: http://127.0.0.1:2
    weight: 0
admin:
  port: 9
"""


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class FakeProxy:
    """Applies the file at once; green answers ``rate`` requests a second, ``bad`` of them 500."""

    def __init__(self, path: Path, clock: FakeClock, rate: float = 100) -> None:
        self.url = "http://fake:9"
        self.path = path
        self.clock = clock
        self.rate = rate
        self.bad = 0.0
        self.healthy = True
        self.down = False
        self.answered = 0.0
        self.errors = 0.0
        self._last = 0.0

    def look(self, to: str) -> Look:
        from tdproxy.rollout.proxies import Unreachable

        if self.down:
            raise Unreachable("no answer from http://fake:9: refused")
        passed = self.clock() - self._last
        self._last = self.clock()
        self.answered += passed * self.rate
        self.errors += passed * self.rate * self.bad
        _, config = load_and_build(str(self.path))
        weights = {b.name: b.weight for b in config.backends}
        count = int(self.answered)
        counters = Counters(count, int(self.errors), 0, 0, 0, ((0.1, count), (math.inf, count)))
        backends = {name: {"name": name, "healthy": self.healthy or name != to} for name in weights}
        return Look(1, 0.0, weights, backends, counters, str(self.path))


def run_rollout(
    tmp_path: Path, during: Callable[[FakeProxy, FakeClock], None] | None = None, **limits: float
) -> tuple[int, str, FakeProxy, Path]:
    path = tmp_path / "tdproxy.yaml"
    path.write_text(FILE)
    _, cfg = load_and_build(str(path))
    plan = make_plan(cfg, "green", (), (50, 100), 10)
    clock = FakeClock()
    proxy = FakeProxy(path, clock)
    out = io.StringIO()
    options = Options(
        str(path),
        plan,
        Limits(limits.get("rate", 0.01), 0.5, int(limits.get("min", 10))),
        (),
        None,
        False,
        False,
    )
    sleep = clock.sleep
    if during is not None:

        def sleep(seconds: float) -> None:
            clock.sleep(seconds)
            during(proxy, clock)

    rollout = Rollout(
        options,
        FILE,
        [proxy],  # type: ignore[list-item]
        Reporter(out, json_lines=False, progress=False),
        Interrupts(),
        clock,
        sleep,
    )
    return rollout.run(), out.getvalue(), proxy, path


def test_a_healthy_rollout_promotes_and_drains(tmp_path: Path) -> None:
    code, out, _, path = run_rollout(tmp_path)
    assert code == 0
    assert path.read_text() == FILE.replace("100   # live", "0   # live").replace(
        "weight: 0\n", "weight: 100\n"
    )
    lines = out.splitlines()
    assert lines[0] == "step 1/2  green 50%  blue 50%  applied (generation 1)"
    assert lines[1].startswith("step 1/2  green 50%  ") and lines[1].endswith("  ok")
    assert lines[-1] == "verdict: promoted green to 100% in 20s (blue at 0: drained)"


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (lambda proxy: setattr(proxy, "bad", 0.05), "error rate 1.7% over the limit 1.0%"),
        (lambda proxy: setattr(proxy, "healthy", False), "green became unhealthy at http://fake:9"),
        (lambda proxy: setattr(proxy, "down", True), "the proxy is unreachable (no answer"),
    ],
)
def test_a_failure_during_a_step_rolls_back_at_once(
    tmp_path: Path, event: Callable[[FakeProxy], None], reason: str
) -> None:
    def at_three_seconds(proxy: FakeProxy, clock: FakeClock) -> None:
        if clock() >= 3:
            event(proxy)
            if proxy.down and clock() >= 6.5:
                proxy.down = False  # back for the rollback

    code, out, proxy, path = run_rollout(tmp_path, at_three_seconds)
    assert code == 3, out
    assert path.read_text() == FILE
    assert f"rolling back: step 1/2  green 50%: {reason}" in out
    assert "rolled back: blue 100, green 0 (the weights before the rollout)" in out
    assert proxy.clock() < 10  # before the step's end


def test_weights_changed_by_someone_else_stop_the_rollout(tmp_path: Path) -> None:
    def edit_by_hand(proxy: FakeProxy, clock: FakeClock) -> None:
        if 5 <= clock() < 5.05:
            text = proxy.path.read_text().replace("weight: 50\n", "weight: 70\n", 1)
            proxy.path.write_text(text)

    code, out, _, path = run_rollout(tmp_path, edit_by_hand)
    assert code == 3
    assert "now serves other weights (blue=50 green=70)" in out
    assert path.read_text() == FILE


def test_a_signal_during_a_step_rolls_back_with_its_exit_status(tmp_path: Path) -> None:
    interrupts: list[Interrupts] = []

    def signal_at_four(proxy: FakeProxy, clock: FakeClock) -> None:
        if clock() >= 4 and interrupts[0].signum is None:
            interrupts[0].signum = signal.SIGTERM
            interrupts[0].count = 1

    path = tmp_path / "tdproxy.yaml"
    path.write_text(FILE)
    _, cfg = load_and_build(str(path))
    clock = FakeClock()
    proxy = FakeProxy(path, clock)
    interrupts.append(Interrupts())
    out = io.StringIO()
    options = Options(
        str(path), make_plan(cfg, "green", (), (50, 100), 10), LIMITS, (), None, False, False
    )

    def sleep(seconds: float) -> None:
        clock.sleep(seconds)
        signal_at_four(proxy, clock)

    rollout = Rollout(
        options,
        FILE,
        [proxy],
        Reporter(out, json_lines=False, progress=False),
        interrupts[0],
        clock,
        sleep,
    )  # type: ignore[list-item]
    assert rollout.run() == 143
    assert path.read_text() == FILE
    assert (
        "verdict: interrupted (exit 143): interrupted by SIGTERM at step 1/2  green 50%"
        in out.getvalue()
    )
