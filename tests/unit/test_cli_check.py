"""``tdproxy check``: validate a config file in a real subprocess and report every error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

VALID = """\
routing:
  method: sticky
backends:
  - name: blue
    url: http://127.0.0.1:8081
    weight: 70
  - name: green
    url: http://127.0.0.1:8082
    weight: 30
"""

INVALID = """\
entrypoint:
  port: 70000
routing:
  method: random
backends:
  - name: blue
    url: ftp://blue
  - name: green
    url: http://green
    weight: -1
    wieght: 5
timeouts:
  idle: forever
"""


def run_check(
    *args: str, cwd: Path = REPO, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "TDPROXY_CONFIG"}
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), *filter(None, [environment.get("PYTHONPATH")])]
    )
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "tdproxy", "check", *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def valid_file(tmp_path: Path) -> Path:
    path = tmp_path / "valid.yaml"
    path.write_text(VALID, encoding="utf-8")
    return path


@pytest.fixture
def invalid_file(tmp_path: Path) -> Path:
    path = tmp_path / "invalid.yaml"
    path.write_text(INVALID, encoding="utf-8")
    return path


def test_valid_file_exits_0(valid_file: Path) -> None:
    result = run_check("--config", str(valid_file))
    assert result.returncode == 0, result.stderr
    assert str(valid_file) in result.stdout
    assert "valid" in result.stdout
    assert "sticky" in result.stdout
    assert "blue (70)" in result.stdout
    assert "green (30)" in result.stdout
    assert result.stderr == ""


def test_short_flag(valid_file: Path) -> None:
    assert run_check("-c", str(valid_file)).returncode == 0


def test_invalid_file_exits_2_and_prints_every_error(invalid_file: Path) -> None:
    result = run_check("--config", str(invalid_file))
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0] == f"{invalid_file}: invalid configuration (6 error(s))"
    errors = {line.strip().split(": ", 1)[0]: line.strip() for line in lines[1:]}
    assert set(errors) == {
        "entrypoint.port",
        "routing.method",
        "backends[0].url",
        "backends[1].weight",
        "backends[1].wieght",
        "timeouts.idle",
    }
    assert errors["backends[1].weight"] == "backends[1].weight: must be >= 0"
    assert errors["backends[1].wieght"] == "backends[1].wieght: unknown key"
    assert errors["entrypoint.port"] == "entrypoint.port: must be <= 65535"
    assert "must start with http:// or https://" in errors["backends[0].url"]
    assert "'forever' is not a duration" in errors["timeouts.idle"]
    assert "Traceback" not in result.stderr


def test_invalid_yaml_exits_2_with_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("backends:\n  - name: a\n   url: http://a\n", encoding="utf-8")
    result = run_check("--config", str(path))
    assert result.returncode == 2
    assert "(yaml): not valid YAML at line 3" in result.stderr
    assert "Traceback" not in result.stderr


def test_empty_file_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("", encoding="utf-8")
    result = run_check("--config", str(path))
    assert result.returncode == 2
    assert "backends: is required" in result.stderr


def test_missing_file_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "does-not-exist.yaml"
    result = run_check("--config", str(path))
    assert result.returncode == 2
    assert f"{path}: invalid configuration" in result.stderr
    assert "file not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_env_var_is_used_without_flag(valid_file: Path, tmp_path: Path) -> None:
    result = run_check(cwd=tmp_path, env={"TDPROXY_CONFIG": str(valid_file)})
    assert result.returncode == 0, result.stderr
    assert str(valid_file) in result.stdout


def test_env_var_pointing_to_an_invalid_file(invalid_file: Path, tmp_path: Path) -> None:
    result = run_check(cwd=tmp_path, env={"TDPROXY_CONFIG": str(invalid_file)})
    assert result.returncode == 2
    assert str(invalid_file) in result.stderr


def test_flag_wins_over_env_var(valid_file: Path, invalid_file: Path) -> None:
    result = run_check("--config", str(valid_file), env={"TDPROXY_CONFIG": str(invalid_file)})
    assert result.returncode == 0, result.stderr
    assert str(valid_file) in result.stdout


def test_default_path_is_the_shipped_config() -> None:
    result = run_check(cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "config/tdproxy.yaml" in result.stdout


def test_default_path_missing_in_another_directory(tmp_path: Path) -> None:
    result = run_check(cwd=tmp_path)
    assert result.returncode == 2
    assert "config/tdproxy.yaml" in result.stderr
    assert "file not found" in result.stderr
