"""A reload that fails in an unexpected way is a failed reload: counted, with its reason."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tdproxy.app import App
from tdproxy.config import load_config
from tdproxy.config.model import Config

CONFIG = """\
backends:
  - {name: blue, url: "http://127.0.0.1:1", weight: 1}
health_check: {enabled: false}
"""


@pytest.fixture
def app(tmp_path: Path) -> App:
    path = tmp_path / "td.yaml"
    path.write_text(CONFIG)
    return App(load_config(str(path)), str(path), CONFIG)


async def test_an_unexpected_exception_is_a_failed_reload(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert app.config_path is not None
    Path(app.config_path).write_text(CONFIG.replace("weight: 1", "weight: 2"))

    def broken(config: Config) -> object:
        raise RuntimeError("something nobody expected")

    monkeypatch.setattr(app.router, "prepare", broken)
    outcome = await app.reload("api")
    assert not outcome.ok
    assert outcome.errors == (
        f"{app.config_path}: unexpected error: RuntimeError: something nobody expected",
    )
    assert app.reload_history.reloads == {"success": 0, "failure": 1}
    assert not app.reload_history.last_successful
    assert app.router.generation == 1


async def test_the_build_runs_off_the_event_loop(app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    assert app.config_path is not None
    Path(app.config_path).write_text(CONFIG.replace("weight: 1", "weight: 2"))
    threads: list[str] = []
    prepare = app.router.prepare

    def spy(config: Config) -> object:
        threads.append(threading.current_thread().name)
        return prepare(config)

    monkeypatch.setattr(app.router, "prepare", spy)
    outcome = await app.reload("api")
    assert outcome.ok, outcome.errors
    assert app.router.table.targets[0].weight == 2
    assert threads and threads[0] != threading.main_thread().name
