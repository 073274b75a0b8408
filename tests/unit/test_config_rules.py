"""Config rules added for operational safety: how much and how deep a file may be, and values
that are accepted by type but cannot work (an empty token, a cookie that expires at once, a
health check every millisecond)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tdproxy.config import ConfigError, load_config, loader, parse_config, parse_config_text

BACKENDS = [{"name": "blue", "url": "http://blue.example.com"}]


def errors_with(**sections: Any) -> list[str]:
    sections.setdefault("backends", BACKENDS)
    with pytest.raises(ConfigError) as info:
        parse_config(sections)
    return info.value.errors


# -- reading and parsing ---------------------------------------------------------------------


def test_a_file_over_4_mib_is_refused_unparsed(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    valid = "backends:\n  - {name: a, url: 'http://a'}\n"
    path.write_text(valid + "#" * (loader.MAX_FILE_BYTES - len(valid)))
    assert load_config(str(path)).backends[0].name == "a"  # exactly 4 MiB: fine
    path.write_text(valid + "#" * (loader.MAX_FILE_BYTES - len(valid) + 1))
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert info.value.errors == ["the file is larger than 4 MiB: refused"]


def test_the_c_loader_is_used_when_available() -> None:
    if getattr(yaml, "CSafeLoader", None) is None:  # pragma: no cover - PyYAML without libyaml
        pytest.skip("PyYAML was built without libyaml")
    assert loader._Loader is yaml.CSafeLoader


@pytest.mark.parametrize("use_c", [True, False], ids=["libyaml", "pure-python"])
def test_deep_nesting_is_a_config_error(monkeypatch: pytest.MonkeyPatch, use_c: bool) -> None:
    if not use_c:
        monkeypatch.setattr(loader, "_Loader", yaml.SafeLoader)  # it runs out of recursion
    elif getattr(yaml, "CSafeLoader", None) is None:  # pragma: no cover
        pytest.skip("PyYAML was built without libyaml")
    with pytest.raises(ConfigError) as info:
        parse_config_text("backends: " + "[" * 5000 + "\n", "deep.yaml")
    [error] = info.value.errors
    assert error.startswith("(yaml): ")
    assert "nest" in error


def test_any_failure_of_the_yaml_layer_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config_text("backends: 2001-13-01\n")
    assert info.value.errors == ["(yaml): cannot load the document: month must be in 1..12"]


# -- values that parse but cannot work ---------------------------------------------------------


@pytest.mark.parametrize("token", ["", " ", "\t\n"])
def test_an_empty_or_blank_admin_token_is_refused(token: str) -> None:
    assert errors_with(admin={"token": token}) == [
        "admin.token: must not be empty or blank (leave it out or null for no token)"
    ]


def test_a_real_admin_token_and_no_token_are_fine() -> None:
    assert parse_config({"backends": BACKENDS, "admin": {"token": "s3cret"}}).admin.token
    assert parse_config({"backends": BACKENDS, "admin": {"token": None}}).admin.token is None


@pytest.mark.parametrize("max_age", ["500ms", 0.999, "1ms"])
def test_sticky_max_age_below_1s_is_refused(max_age: object) -> None:
    assert errors_with(routing={"sticky": {"max_age": max_age}}) == [
        "routing.sticky.max_age: must be at least 1s (null = a session cookie)"
    ]


def test_sticky_max_age_of_1s_or_null_is_fine() -> None:
    for max_age in ("1s", None, "720h"):
        cfg = parse_config({"backends": BACKENDS, "routing": {"sticky": {"max_age": max_age}}})
        assert cfg.routing.sticky.max_age in (1.0, None, 2_592_000.0)


@pytest.mark.parametrize("interval", ["1ms", "99ms", 0.05])
def test_health_interval_below_100ms_is_refused(interval: object) -> None:
    assert errors_with(health_check={"interval": interval}) == [
        "health_check.interval: must be at least 100ms"
    ]


def test_health_interval_of_100ms_is_fine() -> None:
    cfg = parse_config({"backends": BACKENDS, "health_check": {"interval": "100ms"}})
    assert cfg.health_check.interval == 0.1


@pytest.mark.parametrize("timeout", [0, "0s", "0ms"])
def test_health_timeout_must_be_above_0(timeout: object) -> None:
    assert errors_with(health_check={"timeout": timeout}) == [
        "health_check.timeout: must be greater than 0"
    ]


# -- credentials in backend urls ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://user:s3cret@blue.example.com", "'http://***@blue.example.com'"),
        ("https://s3cret@blue.example.com:8443/", "'https://***@blue.example.com:8443/'"),
        ("ftp://user:s3cret@blue.example.com", "'ftp://***@blue.example.com'"),
        ("user:s3cret@blue.example.com", "'***@blue.example.com'"),
        ("http://a:s3cret@b@blue.example.com/x", "'http://***@blue.example.com/x'"),
    ],
)
def test_a_rejected_url_never_shows_its_credentials(url: str, shown: str) -> None:
    [error] = errors_with(backends=[{"name": "blue", "url": url}])
    assert "s3cret" not in error
    assert error.startswith(f"backends[0].url: {shown} ")


def test_config_error_text_never_shows_credentials() -> None:
    text = "backends:\n  - {name: blue, url: 'http://admin:s3cret@blue:8080'}\n"
    with pytest.raises(ConfigError) as info:
        parse_config_text(text, "td.yaml")
    assert "s3cret" not in info.value.describe()
    assert "must not carry credentials" in info.value.describe()
