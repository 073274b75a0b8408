"""benchmarks/hotpath.py drives the real hot-path objects; keep it working as they change."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "hotpath.py"


def run(*argv: str) -> str:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_one_exchange_goes_through_with_the_forwarding_fields() -> None:
    out = run("--show")
    assert "X-Forwarded-For: 127.0.0.1\\r\\n" in out
    assert "client <- b'HTTP/1.1 200 OK\\r\\n" in out
    assert "Connection: keep-alive" not in out.split("client <-")[1]  # hop-by-hop, removed
    assert out.rstrip().endswith("ok\\n'")


def test_it_reports_a_time_per_request() -> None:
    out = run("-n", "300", "-r", "1")
    assert re.fullmatch(r"[0-9.]+ µs per request \(best of 1 x 300\)\n", out)
