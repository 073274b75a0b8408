"""``tdproxy demo``: two environments behind the distributor, driven through a real config file.

The demo is run as a real process. Its config file is live: a change to it (here written in
place, as an editor would) moves the split while the demo runs. In a real browser, reloading the
page shows both colours: the page asks for nothing but itself (no ``/favicon.ico`` through the
split), so 50/50 alternation reaches the page itself.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes.client import request
from tests.fakes.process import (
    LOCALHOST,
    REPO_ROOT,
    free_port,
    run_tdproxy,
    wait_for_port,
    wait_until,
)
from tests.integration.test_status_page_browser import dump_dom, require_chromium

READY = "Press Ctrl-C to stop."


class Demo:
    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        self.admin_port = free_port()
        self.config = tmp_path / "demo.yaml"
        self.stdout_path = tmp_path / "demo.stdout"
        self._stdout = self.stdout_path.open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tdproxy",
                "demo",
                "--port",
                str(self.port),
                "--admin-port",
                str(self.admin_port),
                "--config-out",
                str(self.config),
            ],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._stdout,
            stderr=subprocess.STDOUT,
        )

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}/"

    def output(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=15)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._stdout.close()


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    running = Demo(tmp_path)
    try:
        wait_until(lambda: READY in running.output() or running.proc.poll() is not None, 20)
        assert running.proc.poll() is None, running.output()
        wait_for_port(LOCALHOST, running.port)
        yield running
    finally:
        running.stop()


def environments(url: str, count: int) -> list[str]:
    return [request(url).text.split()[-1] for _ in range(count)]


def test_the_demo_serves_both_environments_and_prints_its_config_and_commands(
    demo: Demo,
) -> None:
    assert sorted(environments(demo.url, 4)) == ["blue", "blue", "green", "green"]
    out = demo.output()
    assert f"config:      {demo.config}" in out
    for command in ("weights", "weights set blue=90 green=10", "weights swap"):
        assert f"tdproxy {command} --config {demo.config}" in out, out
    text = demo.config.read_text()
    assert "weight: 50" in text and "# tdproxy demo" in text


def test_the_demo_applies_a_change_to_its_config_file_live(demo: Demo) -> None:
    text = demo.config.read_text()
    changed = re.sub(r"(name: green\n(?:.*\n)*?\s+weight: )50", r"\g<1>0", text, count=1)
    assert changed != text
    demo.config.write_text(changed)  # in place, as an editor saves it
    wait_until(
        lambda: set(environments(demo.url, 6)) == {"blue"},
        timeout=10,
        message="every request on blue after green's weight went to 0",
    )
    assert demo.stop() == 0


def test_page_reloads_in_a_browser_show_both_colours(demo: Demo, tmp_path: Path) -> None:
    """Ten page loads in headless Chromium (a fresh profile each, so nothing is cached): both
    colours appear, and each load costs exactly one request through the split."""
    chromium = require_chromium()

    def total_requests() -> int:
        status = request(f"http://{LOCALHOST}:{demo.admin_port}/api/v1/status").json()
        return sum(int(b["requests"]) for b in status["backends"])

    before = total_requests()
    seen = []
    for load in range(10):
        dom = dump_dom(chromium, tmp_path / f"load-{load}", demo.url)
        heading = re.search(r"<h1>(\w+)</h1>", dom)
        assert heading is not None, dom[:500]
        seen.append(heading.group(1))
    assert set(seen) == {"blue", "green"}, seen
    assert total_requests() - before == 10  # no /favicon.ico (or anything else) per load


def test_the_printed_weights_commands_steer_the_running_demo(demo: Demo) -> None:
    result = run_tdproxy("weights", "set", "blue=100", "green=0", "--config", str(demo.config))
    assert result.returncode == 0, result.stderr
    assert "applied by the running proxy" in result.stdout, result.stdout
    assert set(environments(demo.url, 6)) == {"blue"}
    result = run_tdproxy("weights", "swap", "--config", str(demo.config))
    assert result.returncode == 0, result.stderr
    assert set(environments(demo.url, 6)) == {"green"}
    assert "# tdproxy demo" in demo.config.read_text()  # the file's comments are kept
