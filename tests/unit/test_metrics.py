"""The Prometheus collector: names, labels and values computed at scrape time from real state."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families

import tdproxy
from tdproxy.config import Config, parse_config
from tdproxy.controlplane.reload_state import ReloadHistory, ReloadOutcome
from tdproxy.observability.metrics import (
    build_registry,
    cumulative_buckets,
    estimate_quantile,
    exposition,
)
from tdproxy.routing.state import DURATION_BUCKETS
from tdproxy.workers.report import WorkersReport, single_process_report
from tests.fakes.routing import new_router

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "tdproxy-dashboard.json"
NOW = 1_700_000_000.0
SECOND = int(NOW)


def make_config(**overrides: Any) -> Config:
    data: dict[str, Any] = {
        "backends": [
            {"name": "blue", "url": "http://127.0.0.1:9001", "weight": 70},
            {"name": "green", "url": "http://127.0.0.1:9002", "weight": 30},
            {"name": "spare", "url": "http://127.0.0.1:9003", "weight": 0, "backup": True},
        ],
    }
    data.update(overrides)
    return parse_config(data)


class Source:
    """What the collector reads, over a real Router."""

    def __init__(self, config: Config) -> None:
        self.router = new_router(config)
        self.reload_history = ReloadHistory()
        self.connections = 0
        self.unrouted: dict[int, int] = {}
        self.workers = single_process_report(self.router.states, 0, 1)

    def connections_active(self) -> int:
        return self.connections

    def unrouted_requests(self) -> dict[int, int]:
        return self.unrouted

    def workers_report(self) -> WorkersReport:
        return self.workers


@pytest.fixture
def source() -> Source:
    return Source(make_config())


@pytest.fixture
def registry(source: Source) -> CollectorRegistry:
    return build_registry(source, clock=lambda: NOW)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def families(registry: CollectorRegistry) -> dict[str, Any]:
    body, _ = exposition(registry)
    return {family.name: family for family in text_string_to_metric_families(body.decode())}


def test_every_design_metric_is_exposed_with_its_type_and_labels(
    source: Source, registry: CollectorRegistry
) -> None:
    source.router.states["blue"].record_response(200, SECOND)
    source.router.states["blue"].record_duration(0.01)
    source.unrouted[503] = 1
    found = families(registry)
    expected = {
        # the text parser names counters without their _total suffix
        "tdproxy_requests": ("counter", {"backend", "code"}),
        "tdproxy_request_duration_seconds": ("histogram", {"backend"}),
        "tdproxy_backend_traffic_share": ("gauge", {"backend"}),
        "tdproxy_backend_weight": ("gauge", {"backend"}),
        "tdproxy_backend_effective_weight": ("gauge", {"backend"}),
        "tdproxy_backend_up": ("gauge", {"backend"}),
        "tdproxy_backend_in_flight": ("gauge", {"backend"}),
        "tdproxy_upstream_errors": ("counter", {"backend", "kind"}),
        "tdproxy_retries": ("counter", {"backend"}),
        "tdproxy_health_checks": ("counter", {"backend", "result"}),
        "tdproxy_config_reloads": ("counter", {"result"}),
        "tdproxy_config_last_reload_successful": ("gauge", set()),
        "tdproxy_config_generation": ("gauge", set()),
        "tdproxy_connections_active": ("gauge", set()),
        "tdproxy_build_info": ("gauge", {"version"}),
        "tdproxy_unrouted_requests": ("counter", {"code"}),
        "tdproxy_log_lines_dropped": ("counter", set()),
        "tdproxy_workers": ("gauge", set()),
        "tdproxy_worker_restarts": ("counter", set()),
    }
    for name, (kind, labels) in expected.items():
        assert name in found, name
        assert found[name].type == kind, name
        for sample in found[name].samples:
            assert set(sample.labels) - {"le"} == labels, (name, sample)
    assert set(found) == set(expected)


def test_requests_are_counted_by_backend_and_code(
    source: Source, registry: CollectorRegistry
) -> None:
    blue, green = source.router.states["blue"], source.router.states["green"]
    for _ in range(3):
        blue.record_response(200, SECOND)
    blue.record_response(502, SECOND)
    green.record_response(404, SECOND)
    assert value(registry, "tdproxy_requests_total", backend="blue", code="200") == 3
    assert value(registry, "tdproxy_requests_total", backend="blue", code="502") == 1
    assert value(registry, "tdproxy_requests_total", backend="green", code="404") == 1
    assert value(registry, "tdproxy_requests_total", backend="green", code="200") is None


def test_requests_without_a_backend_are_counted_by_code_alone(
    source: Source, registry: CollectorRegistry
) -> None:
    assert value(registry, "tdproxy_unrouted_requests_total", code="503") is None
    source.unrouted.update({503: 7, 400: 2})
    assert value(registry, "tdproxy_unrouted_requests_total", code="503") == 7
    assert value(registry, "tdproxy_unrouted_requests_total", code="400") == 2
    total = sum(
        sample.value
        for sample in families(registry)["tdproxy_requests"].samples
        if sample.name == "tdproxy_requests_total"
    )
    assert total == 0, "answers without a backend are not in tdproxy_requests_total"


def test_histogram_buckets_are_cumulated_at_scrape_time(
    source: Source, registry: CollectorRegistry
) -> None:
    blue = source.router.states["blue"]
    for seconds in (0.0005, 0.003, 0.003, 0.7, 20.0):
        blue.record_duration(seconds)

    def bucket(le: str) -> float | None:
        return value(registry, "tdproxy_request_duration_seconds_bucket", backend="blue", le=le)

    assert bucket("0.001") == 1
    assert bucket("0.0025") == 1
    assert bucket("0.005") == 3
    assert bucket("0.5") == 3
    assert bucket("1.0") == 4
    assert bucket("10.0") == 4
    assert bucket("+Inf") == 5
    assert value(registry, "tdproxy_request_duration_seconds_count", backend="blue") == 5
    total = value(registry, "tdproxy_request_duration_seconds_sum", backend="blue")
    assert total == pytest.approx(0.0005 + 0.003 + 0.003 + 0.7 + 20.0)
    # every backend has a (zero) histogram, with one bucket per bound plus +Inf
    green = [
        s
        for s in families(registry)["tdproxy_request_duration_seconds"].samples
        if s.labels["backend"] == "green" and s.name.endswith("_bucket")
    ]
    assert len(green) == len(DURATION_BUCKETS) + 1
    assert all(s.value == 0 for s in green)


def test_cumulative_buckets_never_decrease() -> None:
    counts = [2, 0, 5, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 3]
    buckets = cumulative_buckets(counts)
    assert [le for le, _ in buckets][-1] == "+Inf"
    values = [v for _, v in buckets]
    assert values == sorted(values)
    assert values[-1] == sum(counts)


def test_traffic_share_is_observed_over_the_last_minute_and_sums_to_one(
    source: Source, registry: CollectorRegistry
) -> None:
    def share(name: str) -> float | None:
        return value(registry, "tdproxy_backend_traffic_share", backend=name)

    assert [share(n) for n in ("blue", "green", "spare")] == [0, 0, 0]  # no traffic yet
    blue, green = source.router.states["blue"], source.router.states["green"]
    for _ in range(50):
        green.record_response(200, SECOND - 61)  # older than the window: not counted
    for i in range(7):
        blue.record_response(200, SECOND - i)
    for i in range(3):
        green.record_response(200, SECOND - 59 + i)
    assert share("blue") == pytest.approx(0.7)
    assert share("green") == pytest.approx(0.3)
    assert share("spare") == 0
    assert sum(share(n) or 0 for n in ("blue", "green", "spare")) == pytest.approx(1.0)


def test_backend_gauges_follow_config_and_state(
    source: Source, registry: CollectorRegistry
) -> None:
    assert value(registry, "tdproxy_backend_weight", backend="blue") == 70
    assert value(registry, "tdproxy_backend_weight", backend="spare") == 0
    assert value(registry, "tdproxy_backend_up", backend="green") == 1
    source.router.states["green"].set_health(False, "test")
    source.router.states["blue"].in_flight = 4
    assert value(registry, "tdproxy_backend_up", backend="green") == 0
    assert value(registry, "tdproxy_backend_in_flight", backend="blue") == 4
    assert value(registry, "tdproxy_backend_in_flight", backend="green") == 0


def test_effective_weight_shows_the_slow_start_ramp() -> None:
    source = Source(make_config(routing={"slow_start": "10s"}))
    registry = build_registry(source, clock=lambda: NOW)

    def effective(backend: str) -> float | None:
        return value(registry, "tdproxy_backend_effective_weight", backend=backend)

    # Slow start on, nothing ramping (not at start): effective = configured.
    assert [effective(n) for n in ("blue", "green", "spare")] == [70, 30, 0]
    green = source.router.states["green"]
    green.set_health(False, "test")
    green.set_health(True, "test")  # back up: its ramp starts at 10 %
    assert green.ramp_started is not None
    source.router.table.refresh(now=green.ramp_started)
    assert effective("green") == 3  # 10 % of 30
    assert effective("blue") == 70
    source.router.table.refresh(now=green.ramp_started + 5)
    assert effective("green") == pytest.approx(16.5)  # 55 % of 30
    source.router.table.refresh(now=green.ramp_started + 10)
    assert effective("green") == 30


def test_failures_retries_and_health_checks(source: Source, registry: CollectorRegistry) -> None:
    blue = source.router.states["blue"]
    blue.record_error("connect")
    blue.record_error("connect")
    blue.record_error("protocol")
    blue.retries = 2
    blue.checks["success"] = 5
    blue.checks["failure"] = 1

    def errors(kind: str, backend: str = "blue") -> float | None:
        return value(registry, "tdproxy_upstream_errors_total", backend=backend, kind=kind)

    assert errors("connect") == 2
    assert errors("protocol") == 1
    # the documented kinds exist at 0 before they happen, so rate() works from the start
    assert errors("timeout") == 0
    assert errors("reset", "green") == 0
    assert value(registry, "tdproxy_retries_total", backend="blue") == 2
    assert value(registry, "tdproxy_retries_total", backend="green") == 0
    checks = "tdproxy_health_checks_total"
    assert value(registry, checks, backend="blue", result="success") == 5
    assert value(registry, checks, backend="blue", result="failure") == 1
    assert value(registry, checks, backend="green", result="failure") == 0


def test_reloads_connections_and_build_info(source: Source, registry: CollectorRegistry) -> None:
    history = source.reload_history
    history.record(ReloadOutcome(ok=True, time=NOW, trigger="start", generation=1))
    assert value(registry, "tdproxy_config_reloads_total", result="success") == 0
    assert value(registry, "tdproxy_config_last_reload_successful") == 1
    history.record(ReloadOutcome(ok=True, time=NOW, trigger="file", generation=2))
    history.record(
        ReloadOutcome(ok=False, time=NOW, trigger="api", generation=2, errors=("x: bad",))
    )
    assert value(registry, "tdproxy_config_reloads_total", result="success") == 1
    assert value(registry, "tdproxy_config_reloads_total", result="failure") == 1
    assert value(registry, "tdproxy_config_last_reload_successful") == 0
    source.connections = 12
    assert value(registry, "tdproxy_connections_active") == 12
    assert value(registry, "tdproxy_build_info", version=tdproxy.__version__) == 1
    assert value(registry, "tdproxy_config_generation") == source.router.generation >= 1


def test_removed_backends_vanish_and_kept_ones_carry_over(
    source: Source, registry: CollectorRegistry
) -> None:
    source.router.states["blue"].record_response(200, SECOND)
    source.router.states["green"].record_response(200, SECOND)
    source.router.apply(
        parse_config(
            {
                "backends": [
                    {"name": "blue", "url": "http://127.0.0.1:9001", "weight": 10},
                    {"name": "teal", "url": "http://127.0.0.1:9004", "weight": 90},
                ]
            }
        )
    )
    body, _ = exposition(registry)
    text = body.decode()
    assert 'backend="green"' not in text
    assert 'backend="spare"' not in text
    assert value(registry, "tdproxy_backend_weight", backend="blue") == 10
    assert value(registry, "tdproxy_backend_weight", backend="teal") == 90
    assert value(registry, "tdproxy_requests_total", backend="blue", code="200") == 1
    assert value(registry, "tdproxy_backend_traffic_share", backend="blue") == 1
    assert value(registry, "tdproxy_backend_traffic_share", backend="teal") == 0


def test_registry_is_not_the_global_one(registry: CollectorRegistry) -> None:
    from prometheus_client import REGISTRY

    assert registry is not REGISTRY
    body, _ = exposition(registry)
    assert b"python_gc" not in body and b"process_" not in body


def test_exposition_negotiates_openmetrics(source: Source, registry: CollectorRegistry) -> None:
    source.router.states["blue"].record_response(200, SECOND)
    body, content_type = exposition(registry)
    assert content_type.startswith("text/plain; version=0.0.4")
    body, content_type = exposition(
        registry, "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    )
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    parsed = {family.name: family for family in parse_openmetrics(body.decode())}
    assert parsed["tdproxy_requests"].type == "counter"
    assert parsed["tdproxy_build_info"].type == "gauge"


@pytest.mark.parametrize(
    ("q", "counts", "expected"),
    [
        (0.95, [0] * 14, None),
        # 100 requests all in (0.01, 0.025]: interpolate within that bucket
        (0.5, [0, 0, 0, 0, 100, *[0] * 9], 0.01 + 0.015 * 0.5),
        (0.95, [0, 0, 0, 0, 100, *[0] * 9], 0.01 + 0.015 * 0.95),
        # 10 in the first bucket (starts at 0), rank 5 -> half of 0.001
        (0.5, [10, *[0] * 13], 0.0005),
        # rank in the +Inf bucket -> the highest finite bound
        (0.95, [1, *[0] * 12, 99], 10.0),
    ],
)
def test_quantile_estimate_matches_histogram_quantile(
    q: float, counts: list[int], expected: float | None
) -> None:
    result = estimate_quantile(q, counts)
    if expected is None:
        assert result is None
    else:
        assert result == pytest.approx(expected)


def test_promtool_accepts_the_exposition(source: Source, registry: CollectorRegistry) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package 'prometheus' provides it)")
    for name in ("blue", "green"):
        state = source.router.states[name]
        state.record_response(200, SECOND)
        state.record_response(503, SECOND)
        state.record_duration(0.02)
        state.record_error("timeout")
    source.unrouted[503] = 3
    source.reload_history.record(ReloadOutcome(ok=True, time=NOW, trigger="file", generation=2))
    body, _ = exposition(registry)
    result = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, timeout=30, check=False
    )
    output = (result.stdout + result.stderr).decode()
    assert result.returncode == 0, output
    assert output.strip() == "", output  # no lint warnings either


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    queries += [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    return queries


def test_dashboard_only_queries_metrics_that_exist(
    source: Source, registry: CollectorRegistry
) -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["schemaVersion"] >= 39
    assert all(p["datasource"]["uid"] == "${datasource}" for p in dashboard["panels"])
    source.router.states["blue"].record_response(200, SECOND)
    source.unrouted[503] = 1
    body, _ = exposition(registry)
    exposed = {line.split("{")[0].split(" ")[0] for line in body.decode().splitlines()}
    referenced = {m for q in dashboard_queries() for m in re.findall(r"tdproxy_[a-z_]+", q)}
    assert referenced, "no tdproxy metric referenced"
    assert referenced <= exposed, referenced - exposed
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("traffic share", "request rate", "error rate", "p50", "p95", "p99", "health"):
        assert topic in titles, topic
    assert "reload" in titles
    assert "generation" in titles


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package 'prometheus' provides it)")
    # Grafana's variables, replaced by what they expand to, then checked as recording rules.
    rules = [
        {"record": f"tdproxy:dashboard_query_{i}", "expr": q}
        for i, q in enumerate(dashboard_queries())
    ]
    text = json.dumps({"groups": [{"name": "dashboard", "rules": rules}]})
    text = text.replace("$__rate_interval", "1m").replace("$instance", ".*")
    text = text.replace("$backend", ".*")
    path = tmp_path / "rules.json"  # JSON is YAML
    path.write_text(text, encoding="utf-8")
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, timeout=30, check=False
    )
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


def test_worker_processes_are_reported(source: Source, registry: CollectorRegistry) -> None:
    assert value(registry, "tdproxy_workers") == 1
    assert value(registry, "tdproxy_worker_restarts_total") == 0
    source.workers = source.workers._replace(live=3, restarts=2, dropped_log_lines=5)
    assert value(registry, "tdproxy_workers") == 3
    assert value(registry, "tdproxy_worker_restarts_total") == 2
    assert value(registry, "tdproxy_log_lines_dropped_total") >= 5  # the workers' own drops
