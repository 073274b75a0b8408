"""The admin server over real sockets, reading a small fake distributor built on a real Router."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator
from html.parser import HTMLParser
from typing import Any

import aiohttp
import pytest

import tdproxy
from tdproxy.config import Config, parse_config
from tdproxy.controlplane.admin import AdminServer, AdminSource, RecentWindow
from tdproxy.controlplane.changes import ChangeLog
from tdproxy.controlplane.reload_state import ReloadHistory, ReloadOutcome
from tdproxy.workers.report import WorkersReport, single_process_report
from tests.fakes.routing import new_router

CONFIG_PATH = "/etc/tdproxy/tdproxy.yaml"
TOKEN = "s3cret-token"


def make_config(*, admin: dict[str, Any] | None = None, **routing: Any) -> Config:
    routing_section: dict[str, Any] = {"when_all_down": "reject", **routing}
    return parse_config(
        {
            "routing": routing_section,
            "backends": [
                {"name": "blue", "url": "http://127.0.0.1:9001", "weight": 70},
                {"name": "green", "url": "http://127.0.0.1:9002", "weight": 30},
                {"name": "spare", "url": "http://127.0.0.1:9003", "backup": True},
            ],
            "admin": admin or {},
        }
    )


class FakeSource:
    """Implements AdminSource: a real Router; ``reload`` applies ``next_config`` or fails."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.config_path: str | None = CONFIG_PATH
        self.router = new_router(config)
        self.reload_history = ReloadHistory()
        self.changes = ChangeLog()
        self.reload_history.record(
            ReloadOutcome(ok=True, time=time.time(), trigger="start", generation=1)
        )
        self.connections = 0
        self.unrouted: dict[int, int] = {}
        self.workers = single_process_report(self.router.states, 0, 1)
        self.draining = False
        self.next_config: Config | None = None
        self.triggers: list[str] = []

    def connections_active(self) -> int:
        return self.connections

    def unrouted_requests(self) -> dict[int, int]:
        return self.unrouted

    def workers_report(self) -> WorkersReport:
        return self.workers

    async def reload(self, trigger: str) -> ReloadOutcome:
        self.triggers.append(trigger)
        if self.next_config is None:
            outcome = ReloadOutcome(
                ok=False,
                time=time.time(),
                trigger=trigger,
                generation=self.router.generation,
                errors=(f"{CONFIG_PATH}: backends[0].weight: must be >= 0",),
            )
        else:
            self.config, self.next_config = self.next_config, None
            self.router.apply(self.config)
            outcome = ReloadOutcome(
                ok=True,
                time=time.time(),
                trigger=trigger,
                generation=self.router.generation,
                changes=("weights: blue 10 -> 100",),
            )
        self.reload_history.record(outcome)
        return outcome


Started = Callable[..., Any]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
async def servers() -> AsyncIterator[list[AdminServer]]:
    started: list[AdminServer] = []
    yield started
    for server in started:
        await server.stop()


@pytest.fixture
def start(servers: list[AdminServer]) -> Started:
    async def start(config: Config | None = None) -> tuple[FakeSource, AdminServer]:
        source = FakeSource(config or make_config())
        typed: AdminSource = source  # the fake satisfies the protocol
        server = AdminServer()
        await server.start(typed, "127.0.0.1", 0)
        servers.append(server)
        return source, server

    return start


@pytest.fixture
def env_token(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("TDPROXY_TEST_ADMIN_TOKEN", TOKEN)
    yield "TDPROXY_TEST_ADMIN_TOKEN"


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, str, Any]:
    async with session.get(url) as response:
        return response.status, response.headers.get("Content-Type", ""), await response.text()


async def get_json(session: aiohttp.ClientSession, server: AdminServer) -> Any:
    async with session.get(server.url + "/api/v1/status") as response:
        assert response.status == 200
        return await response.json()


async def post_reload(
    session: aiohttp.ClientSession, server: AdminServer, **headers: str
) -> tuple[int, Any]:
    async with session.post(server.url + "/api/v1/reload", headers=headers) as response:
        return response.status, await response.json()


# -- the plain endpoints ---------------------------------------------------------------------


async def test_binds_port_zero_and_serves_healthz(
    start: Started, session: aiohttp.ClientSession
) -> None:
    _, server = await start()
    assert server.port > 0
    status, _, text = await get(session, server.url + "/healthz")
    assert (status, text) == (200, "ok\n")


async def test_metrics_endpoint(start: Started, session: aiohttp.ClientSession) -> None:
    source, server = await start()
    source.router.states["blue"].record_response(200, int(time.time()))
    source.connections = 3
    status, content_type, text = await get(session, server.url + "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    assert 'tdproxy_requests_total{backend="blue",code="200"} 1.0' in text
    assert 'tdproxy_backend_weight{backend="green"} 30.0' in text
    assert 'tdproxy_backend_traffic_share{backend="blue"} 1.0' in text
    assert "tdproxy_connections_active 3.0" in text
    accept = {"Accept": "application/openmetrics-text;version=1.0.0;q=1,*/*;q=0.1"}
    async with session.get(server.url + "/metrics", headers=accept) as response:
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        assert (await response.text()).endswith("# EOF\n")


async def test_readyz_flips_when_every_backend_is_down(
    start: Started, session: aiohttp.ClientSession
) -> None:
    source, server = await start(make_config(when_all_down="reject"))
    status, _, text = await get(session, server.url + "/readyz")
    assert status == 200 and "blue" in text and "green" in text
    for state in source.router.states.values():
        state.set_health(False, "test: marked down")
    source.router.refresh()
    status, _, _ = await get(session, server.url + "/readyz")
    assert status == 503
    source.router.states["spare"].set_health(True, "test: back")  # a backup can serve too
    source.router.refresh()
    status, _, text = await get(session, server.url + "/readyz")
    assert status == 200 and "spare" in text


# -- the status document ---------------------------------------------------------------------


async def test_status_json_describes_config_and_observations(
    start: Started, session: aiohttp.ClientSession
) -> None:
    source, server = await start()
    now = int(time.time())
    blue, green = source.router.states["blue"], source.router.states["green"]
    for _ in range(6):
        blue.record_response(200, now)
        blue.record_duration(0.02)
    blue.record_response(502, now)
    blue.record_duration(0.02)
    blue.retries = 1  # one more request failed here and was retried on green
    blue.record_error("connect")
    blue.record_error("connect")
    for _ in range(3):
        green.record_response(200, now)
        green.record_duration(0.3)
    blue.in_flight = 2
    green.set_health(False, "3 failed checks")
    source.router.refresh()
    source.connections = 5

    doc = await get_json(session, server)
    assert doc["version"] == tdproxy.__version__
    assert doc["method"] == "round_robin"
    assert doc["when_all_down"] == "reject"
    assert doc["config_path"] == CONFIG_PATH
    assert doc["generation"] == source.router.generation
    assert doc["ready"] is True
    assert doc["connections_active"] == 5
    assert doc["uptime_seconds"] >= 0
    assert doc["window_seconds"] == 60
    assert doc["reloads"] == {"success": 0, "failure": 0}
    last = doc["last_reload"]
    assert last["ok"] is True and last["trigger"] == "start" and last["summary"] == "no change"
    assert last["errors"] == [] and last["pending_restart"] == []

    backends = {b["name"]: b for b in doc["backends"]}
    assert [b["name"] for b in doc["backends"]] == ["blue", "green", "spare"]
    b, g, s = backends["blue"], backends["green"], backends["spare"]
    assert b["url"] == "http://127.0.0.1:9001"
    assert (b["weight"], b["backup"], s["backup"]) == (70, False, True)
    # No slow start: the weight after it is the configured one.
    assert [x["effective_weight"] for x in (b, g, s)] == [70, 30, 1]
    assert b["configured_share"] == pytest.approx(0.7)
    assert g["configured_share"] == pytest.approx(0.3)
    assert s["configured_share"] == 0
    assert b["observed_share"] == pytest.approx(0.7)
    assert g["observed_share"] == pytest.approx(0.3)
    assert b["healthy"] is True and g["healthy"] is False
    assert g["health_reason"] == "3 failed checks"
    assert g["health_changed_at"] == pytest.approx(time.time(), abs=5)
    assert (b["eligible"], g["eligible"], s["eligible"]) == (True, False, False)
    assert b["in_flight"] == 2
    assert b["requests"] == 7 and g["requests"] == 3
    assert b["responses_5xx"] == 1 and b["retries"] == 1
    assert b["errors"] == 2  # the 502 answered + the attempt retried elsewhere
    assert b["upstream_errors"] == {"connect": 2}
    assert b["request_rate"] == pytest.approx(7 / 60)
    assert b["error_rate"] == pytest.approx(2 / 8)  # failed / (answered + retried)
    assert g["error_rate"] == 0
    assert 0.01 < b["p95_latency_seconds"] <= 0.025
    assert 0.25 < g["p95_latency_seconds"] <= 0.5
    assert s["p95_latency_seconds"] is None and s["request_rate"] == 0


async def test_status_after_a_reload_drops_removed_backends(
    start: Started, session: aiohttp.ClientSession
) -> None:
    source, server = await start()
    source.next_config = parse_config(
        {"backends": [{"name": "blue", "url": "http://127.0.0.1:9001", "weight": 100}]}
    )
    status, outcome = await post_reload(session, server)
    assert status == 200
    doc = await get_json(session, server)
    assert [b["name"] for b in doc["backends"]] == ["blue"]
    assert doc["backends"][0]["configured_share"] == 1
    assert doc["generation"] == outcome["generation"] == 2
    assert doc["when_all_down"] == "fail_open"


def test_recent_window_keeps_the_last_minute() -> None:
    clock = [1000.0]
    router = new_router(make_config())
    window = RecentWindow(clock=lambda: clock[0])
    blue = router.states["blue"]

    def answer(status: int, count: int) -> None:
        for _ in range(count):
            blue.record_response(status, int(clock[0]))
            blue.record_duration(0.02)

    answer(200, 10)
    window.sample(router)  # t=1000: 10 answered before the window
    answer(500, 5)
    clock[0] = 1030.0
    window.sample(router)  # t=1030
    answer(200, 5)
    recent = window.recent(router)["blue"]
    assert (recent.answered, recent.fives, recent.error_rate) == (10, 5, 0.5)
    clock[0] = 1065.0
    window.sample(router)  # t=1000 falls out: the window starts at t=1030
    recent = window.recent(router)["blue"]
    assert (recent.answered, recent.fives, recent.error_rate) == (5, 0, 0.0)
    assert sum(recent.durations) == 5
    # removed, then added again: a new state whose counters start over
    router.apply(parse_config({"backends": [{"name": "green", "url": "http://127.0.0.1:9002"}]}))
    router.apply(make_config())
    router.states["blue"].record_response(200, int(clock[0]))
    assert window.recent(router)["blue"].answered == 1


# -- reload, token and origin ------------------------------------------------------------------


async def test_reload_success_and_failure_codes(
    start: Started, session: aiohttp.ClientSession
) -> None:
    source, server = await start()
    status, outcome = await post_reload(session, server)
    assert status == 422
    assert outcome["ok"] is False
    assert outcome["errors"] == [f"{CONFIG_PATH}: backends[0].weight: must be >= 0"]
    assert outcome["summary"].startswith("failed: ")
    _, _, metrics = await get(session, server.url + "/metrics")
    assert "tdproxy_config_last_reload_successful 0.0" in metrics
    assert 'tdproxy_config_reloads_total{result="failure"} 1.0' in metrics
    doc = await get_json(session, server)
    assert doc["last_reload"]["ok"] is False and doc["last_reload"]["trigger"] == "api"

    source.next_config = make_config()
    status, outcome = await post_reload(session, server)
    assert status == 200
    assert outcome["ok"] is True and outcome["trigger"] == "api"
    assert outcome["changes"] == ["weights: blue 10 -> 100"]
    assert source.triggers == ["api", "api"]
    _, _, metrics = await get(session, server.url + "/metrics")
    assert "tdproxy_config_last_reload_successful 1.0" in metrics


async def test_reload_is_post_only(start: Started, session: aiohttp.ClientSession) -> None:
    source, server = await start()
    status, _, _ = await get(session, server.url + "/api/v1/reload")
    assert status == 405
    assert source.triggers == []


async def test_token_is_required_when_configured(
    start: Started, session: aiohttp.ClientSession
) -> None:
    source, server = await start(make_config(admin={"token": TOKEN}))
    source.next_config = make_config(admin={"token": TOKEN})
    status, body = await post_reload(session, server)
    assert status == 401 and body["ok"] is False
    status, _ = await post_reload(session, server, Authorization="Bearer wrong")
    assert status == 401
    status, _ = await post_reload(session, server, Authorization=f"Basic {TOKEN}")
    assert status == 401
    assert source.triggers == []
    # GET endpoints stay open: they only read
    status, _, _ = await get(session, server.url + "/api/v1/status")
    assert status == 200
    status, _ = await post_reload(session, server, Authorization=f"Bearer {TOKEN}")
    assert status == 200
    assert source.triggers == ["api"]


async def test_token_from_the_environment(
    start: Started, session: aiohttp.ClientSession, env_token: str
) -> None:
    source, server = await start(make_config(admin={"token_env": env_token}))
    source.next_config = make_config()
    status, _ = await post_reload(session, server)
    assert status == 401
    status, _ = await post_reload(session, server, Authorization=f"Bearer {TOKEN}")
    assert status == 200


async def test_unset_token_env_refuses_rather_than_opens(
    start: Started, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TDPROXY_TEST_UNSET_TOKEN", raising=False)
    source, server = await start(make_config(admin={"token_env": "TDPROXY_TEST_UNSET_TOKEN"}))
    source.next_config = make_config()
    status, body = await post_reload(session, server, Authorization="Bearer ")
    assert status == 401
    assert "TDPROXY_TEST_UNSET_TOKEN" in body["errors"][0]
    assert source.triggers == []


async def test_cross_origin_posts_are_refused(
    start: Started, session: aiohttp.ClientSession
) -> None:
    source, server = await start(make_config(admin={"token": TOKEN}))
    auth = f"Bearer {TOKEN}"
    for origin in ("http://evil.example", "null", f"http://localhost:{server.port + 1}"):
        status, _ = await post_reload(session, server, Origin=origin, Authorization=auth)
        assert status == 403, origin
    assert source.triggers == []
    source.next_config = make_config()
    status, _ = await post_reload(session, server, Origin=server.url, Authorization=auth)
    assert status == 200  # the admin's own page may post
    source.next_config = make_config()
    status, _ = await post_reload(session, server, Authorization=auth)
    assert status == 200  # no Origin at all: not a browser's cross-site request


# -- the status page ---------------------------------------------------------------------------


class FieldReader(HTMLParser):
    """Collects (backend, field) -> (data-value, text) from the rendered page."""

    def __init__(self) -> None:
        super().__init__()
        self.fields: dict[tuple[str, str], tuple[str, str]] = {}
        self.backend = ""
        self.in_template = False
        self._open: tuple[str, str, str] | None = None
        self._text: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if tag == "template":
            self.in_template = True
        elif tag == "script":
            self.scripts += 1
        if tag == "tr" and "data-backend" in values:
            self.backend = values["data-backend"]
        if "data-field" in values and not self.in_template:
            self._open = (self.backend, values["data-field"], values.get("data-value", ""))
            self._text = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "template":
            self.in_template = False
        elif tag == "tr":
            self.backend = ""
        if self._open is not None:
            backend, field, value = self._open
            self.fields[(backend, field)] = (value, "".join(self._text))
            self._open = None

    def handle_data(self, data: str) -> None:
        if self._open is not None:
            self._text.append(data)


async def test_status_page_is_rendered_on_the_server(
    start: Started, session: aiohttp.ClientSession
) -> None:
    source, server = await start()
    now = int(time.time())
    for _ in range(3):
        source.router.states["blue"].record_response(200, now)
    source.router.states["green"].record_response(200, now)
    source.router.states["green"].set_health(False, "connection refused")
    async with session.get(server.url + "/status") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/html")
        csp = response.headers["Content-Security-Policy"]
        page = await response.text()
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert "http://" not in page.replace("http://127.0.0.1:900", "")  # no external assets
    assert "<script src" not in page and '<link rel="stylesheet"' not in page

    reader = FieldReader()
    reader.feed(page)
    fields = reader.fields
    doc = await get_json(session, server)
    for backend in doc["backends"]:
        name = backend["name"]
        assert f'data-backend="{name}"' in page
        assert fields[(name, "name")] == (name, name)
        assert fields[(name, "weight")] == (str(backend["weight"]), str(backend["weight"]))
        for field in ("configured_share", "observed_share", "request_rate", "error_rate"):
            raw, _ = fields[(name, field)]
            assert float(raw) == pytest.approx(backend[field], abs=1e-9), (name, field)
    assert fields[("blue", "observed_share")][1] == "75.0%"
    assert fields[("green", "observed_share")][1] == "25.0%"
    assert fields[("blue", "configured_share")][1] == "70.0%"
    assert fields[("blue", "request_rate")][1] == "0.05/s"
    assert fields[("blue", "healthy")] == ("true", "up")
    assert fields[("green", "healthy")] == ("false", "down")
    assert fields[("green", "health_reason")][1] == "connection refused"
    assert fields[("green", "health_changed_at")][1].endswith("ago)")
    assert fields[("spare", "p95_latency_seconds")] == ("", "\u2013")
    assert fields[("spare", "backup")][1] == "backup"
    assert fields[("", "method")][1] == "round_robin"
    assert fields[("", "config_path")][1] == CONFIG_PATH
    assert fields[("", "last_reload.ok")] == ("true", "ok")
    assert fields[("", "last_reload.trigger")][1] == "start"
    assert fields[("", "ready")] == ("true", "ready")
    assert reader.scripts == 1
    assert "/api/v1/status" in page  # the script refreshes from the JSON


async def test_status_page_escapes_what_it_shows(
    start: Started, session: aiohttp.ClientSession
) -> None:
    source, server = await start()
    source.router.states["blue"].set_health(False, "<img src=x onerror=alert(1)>")
    _, _, page = await get(session, server.url + "/status")
    assert "<img src=x" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page


async def test_stop_is_clean_and_idempotent(start: Started) -> None:
    _, server = await start()
    port = server.port
    await server.stop()
    await server.stop()
    async with aiohttp.ClientSession() as client:
        with pytest.raises(aiohttp.ClientConnectionError):
            await client.get(f"http://127.0.0.1:{port}/healthz")


async def test_readyz_is_503_while_draining(start: Started, session: aiohttp.ClientSession) -> None:
    source, server = await start()
    status, _, _ = await get(session, server.url + "/readyz")
    assert status == 200
    source.draining = True  # what SIGTERM sets: load balancers should stop sending now
    status, _, text = await get(session, server.url + "/readyz")
    assert status == 503 and "shutting down" in text


async def test_readyz_is_503_while_no_worker_serves(
    start: Started, session: aiohttp.ClientSession
) -> None:
    source, server = await start()
    source.workers = source.workers._replace(configured=2, live=0)  # every worker restarting
    status, _, text = await get(session, server.url + "/readyz")
    assert status == 503 and "no worker process is serving" in text
    source.workers = source.workers._replace(live=1)
    status, _, _ = await get(session, server.url + "/readyz")
    assert status == 200
    document = await get_json(session, server)
    assert document["workers"]["live"] == 1
