"""Logging never blocks traffic: a log reader that stops reading costs log lines, not requests.

tdproxy runs here with its stdout and stderr connected to pipes that nobody reads, as happens
when a container's log driver or collector stalls. A pipe holds 64 KiB; past that, a blocking
write would freeze the process. The access log (stdout) and the Python log (stderr) are queued
and written by threads instead, so the entrypoint and the admin server keep answering, lines
that do not fit in the bounded queues are dropped and counted in
``tdproxy_log_lines_dropped_total``, and one log line says so.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tests.fakes import client
from tests.fakes.client import RawClient
from tests.fakes.process import (
    LOCALHOST,
    REPO_ROOT,
    BackendProcess,
    ProxyFactory,
    proxy_config,
    wait_for_port,
    wait_until,
)

PIPE_CAPACITY = 64 * 1024
QUEUE_CAPACITY = 4 * 1024 * 1024  # tdproxy.observability.log_output.MAX_QUEUED_BYTES
ANSWER_WITHIN = 5.0  # every request must be answered this soon, log or no log


@contextlib.contextmanager
def proxy_with_unread_output(
    config: dict[str, Any], tmp_path: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """``tdproxy run`` with stdout and stderr on pipes this test leaves unread until the end."""
    path = tmp_path / "tdproxy.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tdproxy", "run", "--config", str(path)],
        cwd=REPO_ROOT,
        env=dict(os.environ),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        alive = lambda: proc.poll() is None  # noqa: E731
        wait_for_port(LOCALHOST, config["entrypoint"]["port"], 15, alive=alive)
        wait_for_port(LOCALHOST, config["admin"]["port"], 15, alive=alive)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def invalid_config_with_long_errors(config: dict[str, Any]) -> str:
    """A config that fails with ~200 KB of error lines: one per long unknown key."""
    broken = dict(config)
    broken["entrypoint"] = dict(config["entrypoint"])
    for number in range(200):
        broken["entrypoint"][f"unknown_{number}_" + "k" * 1000] = 1
    return yaml.safe_dump(broken, sort_keys=False)


def test_unread_stdout_and_stderr_cost_log_lines_not_requests(
    blue: BackendProcess, tmp_path: Path
) -> None:
    config = proxy_config([("blue", blue.url, 1)])
    admin = f"http://{LOCALHOST}:{config['admin']['port']}"
    with proxy_with_unread_output(config, tmp_path) as proc:
        # stderr: each refused reload logs every error line, well over a pipe's worth.
        (tmp_path / "tdproxy.yaml").write_text(invalid_config_with_long_errors(config))
        for _ in range(2):
            response = client.request(admin + "/api/v1/reload", "POST", timeout=ANSWER_WITHIN)
            assert response.status == 422
        # stdout: long access-log lines, more than the pipe and the queue hold together.
        user_agent = "u" * 8000
        target = "/?" + "q" * 4000
        line_size = len(user_agent) + len(target)
        requests = (PIPE_CAPACITY + QUEUE_CAPACITY) // line_size + 200
        port = config["entrypoint"]["port"]
        with RawClient(LOCALHOST, port, timeout=ANSWER_WITHIN) as raw:
            for _ in range(requests):
                response = raw.request("GET", target, headers=[("User-Agent", user_agent)])
                assert response.status == 200
        # The sweeper hands the last lines over a few times a second; the count then rises.
        dropped = wait_until(
            lambda: client.metric(admin, "tdproxy_log_lines_dropped_total"),
            timeout=ANSWER_WITHIN,
            message="dropped log lines counted",
        )
        assert client.request(admin + "/healthz", timeout=ANSWER_WITHIN).status == 200
        assert client.request(f"http://{LOCALHOST}:{port}/").status == 200
        # Now read the pipes: what the queues held comes out, then a clean exit.
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 0
    logged = stdout.count(b"\n")
    assert logged > QUEUE_CAPACITY // line_size // 2  # the queue's worth came out in the end
    assert logged + dropped <= requests + 1  # every line written or dropped, never both
    text = stderr.decode("utf-8", "replace")
    assert text.count("dropping log lines") == 1, text[-2000:]
    assert "Traceback" not in text


def test_combined_format_escapes_quotes_so_a_user_agent_cannot_forge_fields(
    blue: BackendProcess, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(proxy_config([("blue", blue.url, 1)], access_log={"format": "combined"}))
    forged = 'x" 500 0 "https://forged.example/" "\\'
    with RawClient(proxy.host, proxy.port) as raw:
        response = raw.request("GET", "/", headers=[("User-Agent", forged), ("Referer", '"')])
        assert response.status == 200
    assert proxy.stop() == 0
    line = proxy.stdout_text().splitlines()[-1]
    assert line.split('"')[2] == " 200 16 "  # status and bytes are the real ones
    assert '"\\x22" "x\\x22 500 0 \\x22https://forged.example/\\x22 \\x22\\x5C" blue ' in line
