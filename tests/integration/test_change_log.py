"""The change log of a real ``tdproxy run``: ``GET /api/v1/changes`` after a start, a file edit,
SIGHUP, the reload API, a refused edit, and a backend going down and up by its health checks.

SIGHUP and the API get a change the file watcher cannot see (same size, inode and mtime), so
the entry's trigger is theirs and not the watcher's.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Mapping
from typing import Any

from tests.fakes import client
from tests.fakes.process import BackendFactory, ProxyFactory, ProxyProcess, proxy_config, wait_until
from tests.integration.test_reload import (
    dump,
    post_reload,
    rewrite_unseen,
    wait_generation,
    wait_reloads,
)

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|\+00:00)$")
DEADLINE = 10.0


def changes(proxy: ProxyProcess) -> list[dict[str, Any]]:
    response = client.request(proxy.admin_url + "/api/v1/changes")
    assert response.status == 200, response.text
    document: dict[str, Any] = response.json()
    assert list(document) == ["changes"]
    entries: list[dict[str, Any]] = document["changes"]
    for entry in entries:
        assert list(entry) == [
            "time",
            "kind",
            "trigger",
            "generation",
            "summary",
            "weights",
            "shares",
        ]
        assert ISO_UTC.match(entry["time"]), entry
    return entries


def wait_changes(proxy: ProxyProcess, count: int) -> list[dict[str, Any]]:
    return wait_until(
        lambda: len(entries := changes(proxy)) >= count and entries,
        DEADLINE,
        0.05,
        message=f"{count} change-log entries",
    )


def weighted(config: Mapping[str, Any], **weights: int) -> dict[str, Any]:
    new = dict(config)
    new["backends"] = [dict(b, weight=weights[b["name"]]) for b in config["backends"]]
    return new


def test_start_file_sighup_and_api_each_record_one_entry(
    backend_factory: BackendFactory, proxy_factory: ProxyFactory
) -> None:
    blue, green = backend_factory("blue"), backend_factory("green")
    config = proxy_config([("blue", blue.url, 70), ("green", green.url, 30)])
    proxy = proxy_factory(config, wait_admin=True)

    [start] = changes(proxy)
    assert start["kind"] == "config" and start["trigger"] == "start"
    assert start["generation"] == 1
    assert start["summary"] == "started: blue 70%, green 30%"
    assert start["weights"] == {"blue": 70, "green": 30}
    assert start["shares"] == {"blue": 0.7, "green": 0.3}

    proxy.write_config(weighted(config, blue=10, green=90))
    file_entry = wait_changes(proxy, 2)[0]
    assert file_entry["trigger"] == "file" and file_entry["generation"] == 2
    assert file_entry["summary"] == "blue 70% -> 10%, green 30% -> 90%"
    assert file_entry["weights"] == {"blue": 10, "green": 90}
    assert file_entry["shares"] == {"blue": 0.1, "green": 0.9}
    line = proxy.wait_for_output("change: config (file), generation 2", stream="stderr")
    assert " INFO tdproxy: " in line and "blue 70% -> 10%, green 30% -> 90%" in line

    rewrite_unseen(proxy.config_path, dump(weighted(config, blue=40, green=60)))
    proxy.send_signal(signal.SIGHUP)
    wait_generation(proxy, 3)
    sighup = wait_changes(proxy, 3)[0]
    assert (sighup["trigger"], sighup["generation"]) == ("sighup", 3)
    assert sighup["summary"] == "blue 10% -> 40%, green 90% -> 60%"

    rewrite_unseen(proxy.config_path, dump(weighted(config, blue=50, green=50)))
    assert post_reload(proxy).status == 200
    api = wait_changes(proxy, 4)[0]
    assert (api["trigger"], api["generation"]) == ("api", 4)
    assert api["summary"] == "blue 40% -> 50%, green 60% -> 50%"

    # Neither a reload of an unchanged file nor a refused one applies a generation.
    assert post_reload(proxy).status == 200
    proxy.write_config(weighted(config, blue=-1, green=50))
    wait_reloads(proxy, success=4, failure=1)
    entries = changes(proxy)
    assert [(e["trigger"], e["generation"]) for e in entries] == [
        ("api", 4),
        ("sighup", 3),
        ("file", 2),
        ("start", 1),
    ]
    assert all(e["kind"] == "config" for e in entries)


def test_health_transitions_are_recorded(
    backend_factory: BackendFactory, proxy_factory: ProxyFactory
) -> None:
    blue, green = backend_factory("blue"), backend_factory("green")
    config = proxy_config(
        [("blue", blue.url, 50), ("green", green.url, 50)],
        health_check={
            "enabled": True,
            "path": "/health",
            "interval": "200ms",
            "timeout": "500ms",
            "fall": 3,
            "rise": 3,
        },
    )
    proxy = proxy_factory(config, wait_admin=True)
    assert [e["trigger"] for e in changes(proxy)] == ["start"]

    green.set_health(503)
    down = wait_changes(proxy, 2)[0]
    assert (down["kind"], down["trigger"], down["generation"]) == ("health", "health", 1)
    assert down["summary"] == "green down: 3 failed checks (HTTP 503)"
    assert down["weights"] == {"blue": 50, "green": 50}
    assert down["shares"] == {"blue": 0.5, "green": 0.5}  # configured, as in /api/v1/status
    proxy.wait_for_output("change: health (health), generation 1: green down", stream="stderr")

    green.set_health(200)
    up = wait_changes(proxy, 3)[0]
    assert (up["kind"], up["summary"]) == ("health", "green up: 3 successful checks")
    assert [e["summary"].split(":")[0] for e in changes(proxy)] == [
        "green up",
        "green down",
        "started",
    ]
