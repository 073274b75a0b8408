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
