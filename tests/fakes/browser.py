"""Headless Chromium (Debian's ``chromium`` package) driven as a real browser by the tests.

Without it the tests that need it skip when not root and fail as root (``scripts/system-deps``
installs it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from pathlib import Path
from types import TracebackType
from typing import Self

import pytest

CHROMIUM_TIMEOUT = 90.0


def require_chromium() -> str:
    path = shutil.which("chromium")
    if path is not None:
        return path
    if os.geteuid() != 0:
        pytest.skip("chromium is not installed (Debian package chromium; scripts/system-deps)")
    pytest.fail("chromium is not installed: run scripts/system-deps (Debian package chromium)")


# -- driving chromium ------------------------------------------------------------------------


class Chromium:
    """One headless chromium run; its process group is killed if it outlives its timeout."""

    def __init__(self, binary: str, profile: Path, url: str, *action: str) -> None:
        profile.mkdir(parents=True)
        args = [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile / 'data'}",
            "--virtual-time-budget=6000",
            *action,
            url,
        ]
        env = dict(os.environ, HOME=str(profile), XDG_CONFIG_HOME=str(profile / "config"))
        env["XDG_CACHE_HOME"] = str(profile / "cache")
        self._stderr_path = profile / "stderr.log"
        self._stderr = self._stderr_path.open("wb")
        try:
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
                env=env,
                start_new_session=True,  # its own process group: renderer and GPU children too
            )
        except BaseException:
            self._stderr.close()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.communicate()
        self._stderr.close()

    def output(self) -> str:
        """Wait for chromium to finish and return its stdout (the DOM for ``--dump-dom``)."""
        try:
            stdout, _ = self._proc.communicate(timeout=CHROMIUM_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"chromium ran over {CHROMIUM_TIMEOUT}s") from None
        stderr = self._stderr_path.read_text(errors="replace")
        assert self._proc.returncode == 0, f"chromium exited {self._proc.returncode}:\n{stderr}"
        return stdout.decode("utf-8")


def dump_dom(binary: str, profile: Path, url: str) -> str:
    with Chromium(binary, profile, url, "--dump-dom") as chromium:
        return chromium.output()
