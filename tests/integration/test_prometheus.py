"""tdproxy's metrics checked against the real thing: Debian's Prometheus server and promtool.

A module-scoped tdproxy sends a known 70/30 mix (100 requests over one keep-alive connection,
which smooth weighted round robin splits exactly 70/30) to two fake backends. Prometheus, started
on a free port with its own storage in a temporary directory, scrapes the admin port every second;
the test waits for a successful scrape and asks Prometheus' HTTP API for the traffic share.

The binaries come from Debian's ``prometheus`` package (``scripts/system-deps`` installs it).
Without them the tests skip when they cannot install it themselves (not root), and fail as root,
where the set-up should have installed it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self
from urllib.parse import urlencode

import pytest
import yaml

from tests.fakes import client
from tests.fakes.client import RawClient
from tests.fakes.process import (
    LOCALHOST,
    ProcessFailed,
    ProxyProcess,
    free_port,
    proxy_config,
    start_backend,
    start_tdproxy,
    wait_until,
)

SHARES = {"blue": 70, "green": 30}
REQUESTS = 100
STOP_TIMEOUT = 10.0


def require_binary(name: str) -> str:
    """The path of ``name``; skip when missing and not root, fail when missing as root."""
    path = shutil.which(name)
    if path is not None:
        return path
    if os.geteuid() != 0:
        pytest.skip(f"{name} is not installed (Debian package prometheus; scripts/system-deps)")
    pytest.fail(f"{name} is not installed: run scripts/system-deps (Debian package prometheus)")


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """tdproxy at 70/30 that has served exactly ``REQUESTS`` requests."""
    with start_backend("blue") as blue, start_backend("green") as green:
        backends = {"blue": blue, "green": green}
        config = proxy_config([(name, backends[name].url, w) for name, w in SHARES.items()])
        with start_tdproxy(config, tmp_path_factory.mktemp("prometheus"), wait_admin=True) as td:
            with RawClient(td.host, td.port) as raw:
                for _ in range(REQUESTS):
                    assert raw.request("GET", "/").status == 200
            yield td


class Prometheus:
    """A ``prometheus`` server process scraping one target every second."""

    def __init__(self, binary: str, directory: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://{LOCALHOST}:{self.port}"
        self.log_path = directory / "prometheus.log"
        config_path = directory / "prometheus.yml"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {
                    "job_name": "tdproxy",
                    "scrape_interval": "1s",
                    "scrape_timeout": "1s",
                    "static_configs": [{"targets": [target]}],
                }
            ],
        }
        config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        self._args = [
            binary,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address={LOCALHOST}:{self.port}",
            "--log.level=warn",
        ]
        self._log: IO[bytes] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        self._log = self.log_path.open("wb")
        self._proc = subprocess.Popen(
            self._args, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )
        try:
            wait_until(self._ready, 30, 0.1, message="prometheus ready", ignore=(OSError,))
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _ready(self) -> bool:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise ProcessFailed(f"prometheus exited with {self._proc.returncode}:\n{self.log()}")
        return client.request(self.url + "/-/ready", timeout=2).status == 200

    def stop(self) -> None:
        """SIGTERM, SIGKILL after a while; always reaps and closes the log. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def api(self, path: str, **params: str) -> Any:
        response = client.request(f"{self.url}/api/v1/{path}?{urlencode(params)}", timeout=10)
        assert response.status == 200, (response.status, response.text)
        body = response.json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expression: str) -> dict[str, float]:
        """An instant query's result as ``{backend: value}``."""
        data = self.api("query", query=expression)
        assert data["resultType"] == "vector", data
        return {item["metric"]["backend"]: float(item["value"][1]) for item in data["result"]}


def test_prometheus_scrapes_and_answers_the_traffic_share_query(
    proxy: ProxyProcess, tmp_path: Path
) -> None:
    binary = require_binary("prometheus")
    target = f"{proxy.admin_host}:{proxy.admin_port}"
    with Prometheus(binary, tmp_path, target) as prometheus:

        def scraped() -> dict[str, Any]:
            """Our target once its health is "up" (after a successful scrape), else {}."""
            targets = prometheus.api("targets")["activeTargets"]
            ours = [t for t in targets if t["scrapeUrl"] == f"http://{target}/metrics"]
            return ours[0] if ours and ours[0]["health"] == "up" else {}

        scrape = wait_until(scraped, 30, 0.2, message="a successful scrape of tdproxy")
        assert scrape["lastError"] == "", scrape

        shares = wait_until(
            lambda: prometheus.query("tdproxy_backend_traffic_share"),
            10,
            0.2,
            message="tdproxy_backend_traffic_share in Prometheus",
        )
        assert shares == pytest.approx({"blue": 0.7, "green": 0.3}, abs=1e-9), shares
        answered = prometheus.query("sum by (backend) (tdproxy_requests_total)")
        assert answered == {"blue": 70.0, "green": 30.0}, answered
        weights = prometheus.query("tdproxy_backend_weight")
        assert weights == {"blue": 70.0, "green": 30.0}, weights
        assert "level=error" not in prometheus.log(), prometheus.log()


def test_promtool_accepts_the_exposition(proxy: ProxyProcess) -> None:
    promtool = require_binary("promtool")
    response = client.request(proxy.admin_url + "/metrics")
    assert response.status == 200
    assert (response.header("Content-Type") or "").startswith("text/plain")
    assert b"tdproxy_backend_traffic_share" in response.body
    checked = subprocess.run(
        [promtool, "check", "metrics"],
        input=response.body,
        capture_output=True,
        timeout=30,
        check=False,
    )
    report = (checked.stdout + checked.stderr).decode(errors="replace")
    assert checked.returncode == 0, f"promtool check metrics exited {checked.returncode}:\n{report}"
