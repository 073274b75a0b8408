"""``workers`` in the config: accepted values, clear errors, a change that waits for a restart;
and a worker's router numbering its tables as the supervisor does."""

from __future__ import annotations

from typing import Any

import pytest

from tdproxy.cli import worker_count
from tdproxy.config import ConfigError, parse_config
from tdproxy.controlplane.reload import describe_changes, restart_only_changes
from tdproxy.dataplane.endpoints import Endpoints
from tdproxy.routing.router import Router

BACKENDS = [{"name": "blue", "url": "http://127.0.0.1:9001"}]


def config(**overrides: Any) -> Any:
    return parse_config({"backends": BACKENDS, **overrides})


def test_one_process_by_default() -> None:
    assert config().workers == 1
    assert worker_count(config()) == 1


@pytest.mark.parametrize("value", [1, 2, 64, "auto"])
def test_accepted_values(value: int | str) -> None:
    assert config(workers=value).workers == value


def test_auto_is_at_least_one() -> None:
    assert worker_count(config(workers="auto")) >= 1


@pytest.mark.parametrize("value", [0, -1, 1025, 2.5, True, "AUTO", "2", "many", None])
def test_refused_values_say_what_is_allowed(value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        config(workers=value)
    assert caught.value.errors == ["workers: must be a whole number from 1 to 1024, or auto"]


def test_a_reload_that_changes_workers_waits_for_the_next_start() -> None:
    old, new = config(workers=2), config(workers=4)
    assert restart_only_changes(old, new) == ["workers 2 -> 4"]
    assert describe_changes(old, new) == []


def test_a_router_can_start_at_the_supervisors_generation() -> None:
    router = Router(config(), Endpoints(), generation=7)
    assert router.generation == router.table.generation == 7
    table, commit = router.prepare(config(), 9)
    router.install(table, commit)
    assert router.generation == router.table.generation == 9


def test_every_refresh_and_install_is_announced() -> None:
    router = Router(config(), Endpoints())
    seen: list[int] = []
    router.on_refresh = lambda: seen.append(router.table.generation)
    router.refresh()
    router.apply(config())
    assert seen == [1, 2]
