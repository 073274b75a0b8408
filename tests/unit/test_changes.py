"""The change log and its summaries, without a process."""

from __future__ import annotations

import itertools
import logging

import pytest

from tdproxy.controlplane.changes import (
    MAX_CHANGES,
    ChangeLog,
    change_trigger,
    checks_cause,
    config_summary,
    health_summary,
    iso_time,
    passive_cause,
    percent,
    share_changes,
    start_summary,
)

# -- summaries ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("share", "text"),
    [
        (0.7, "70%"),
        (0.0, "0%"),
        (1.0, "100%"),
        (1 / 3, "33.3%"),
        (2 / 3, "66.7%"),
        (0.125, "12.5%"),
    ],
)
def test_percent(share: float, text: str) -> None:
    assert percent(share) == text


def test_a_weight_change_is_summarized_as_share_moves() -> None:
    summary = config_summary(
        {"blue": 70, "green": 30},
        {"blue": 0.7, "green": 0.3},
        {"blue": 0, "green": 100},
        {"blue": 0.0, "green": 1.0},
        ["blue weight 70 -> 0", "green weight 30 -> 100"],
    )
    assert summary == "blue 70% -> 0%, green 30% -> 100%"


def test_weights_that_keep_the_shares_are_named() -> None:
    summary = config_summary(
        {"blue": 70, "green": 30},
        {"blue": 0.7, "green": 0.3},
        {"blue": 7, "green": 3},
        {"blue": 0.7, "green": 0.3},
        ["blue weight 70 -> 7", "green weight 30 -> 3"],
    )
    assert summary == "blue weight 70 -> 7; green weight 30 -> 3"


def test_added_and_removed_backends_move_from_and_to_zero() -> None:
    summary = config_summary(
        {"blue": 1, "red": 1},
        {"blue": 0.5, "red": 0.5},
        {"blue": 1, "green": 1},
        {"blue": 0.5, "green": 0.5},
        ["backend red removed", "backend green added (http://g:80, weight 1)"],
    )
    assert summary == (
        "green 0% -> 50%, red 50% -> 0%; backend red removed; "
        "backend green added (http://g:80, weight 1)"
    )


def test_other_changes_and_pending_ones() -> None:
    same = ({"blue": 1}, {"blue": 1.0}, {"blue": 1}, {"blue": 1.0})
    assert config_summary(*same) == "no live change"
    assert config_summary(*same, ["timeouts changed"]) == "timeouts changed"
    assert (
        config_summary(*same, [], ["admin 127.0.0.1:1 -> 127.0.0.1:2"])
        == "no live change; at the next start: admin 127.0.0.1:1 -> 127.0.0.1:2"
    )


def test_share_changes_ignore_float_noise() -> None:
    assert share_changes({"a": 0.1 + 0.2}, {"a": 0.3}) == []


def test_start_summary_names_backends_found_down() -> None:
    assert start_summary({"blue": 0.7, "green": 0.3}) == "started: blue 70%, green 30%"
    assert (
        start_summary({"blue": 1.0, "grey": 0.0}, {"grey": "initial check: connect refused"})
        == "started: blue 100%, grey 0%; grey down (initial check: connect refused)"
    )


def test_health_summaries() -> None:
    assert health_summary("green", False, checks_cause(3, False)) == "green down: 3 failed checks"
    assert (
        health_summary("green", False, checks_cause(3, False, "HTTP 503"))
        == "green down: 3 failed checks (HTTP 503)"
    )
    assert (
        health_summary("green", True, checks_cause(3, True, "HTTP 200"))
        == "green up: 3 successful checks"
    )
    assert checks_cause(1, False) == "1 failed check"
    assert (
        health_summary("blue", False, passive_cause(3, "connect"))
        == "blue down: 3 connect failures on live traffic"
    )


def test_reload_triggers_map_to_the_contract_names() -> None:
    assert [change_trigger(t) for t in ("start", "file", "signal", "api")] == [
        "start",
        "file",
        "sighup",
        "api",
    ]


def test_iso_time_is_utc() -> None:
    assert iso_time(0.125) == "1970-01-01T00:00:00.125Z"


# -- the log -----------------------------------------------------------------------------------


def test_change_log_is_newest_first_and_keeps_the_last_100(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ticks = itertools.count(1000)
    changes = ChangeLog(clock=lambda: float(next(ticks)))
    with caplog.at_level(logging.INFO, logger="tdproxy"):
        for generation in range(1, MAX_CHANGES + 21):
            changes.record("config", "file", generation, f"g{generation}", {"a": 1}, {"a": 1.0})
    assert len(changes) == MAX_CHANGES
    latest = changes.latest()
    assert [c.generation for c in latest] == list(range(MAX_CHANGES + 20, 20, -1))
    assert [c.generation for c in changes.latest(3)] == [120, 119, 118]
    assert changes.latest(0) == []
    assert len(changes.latest(500)) == MAX_CHANGES
    # one INFO line on "tdproxy" per record
    lines = [r for r in caplog.records if r.name == "tdproxy" and r.levelno == logging.INFO]
    assert len(lines) == MAX_CHANGES + 20
    assert lines[-1].getMessage() == "change: config (file), generation 120: g120 [weights a=1]"


def test_change_json_matches_the_contract() -> None:
    changes = ChangeLog(clock=lambda: 1_700_000_000.5)
    change = changes.record(
        "health", "health", 4, "green down: 3 failed checks", {"blue": 7, "green": 3},
        {"blue": 0.7, "green": 0.3},
    )  # fmt: skip
    assert change.to_json() == {
        "time": "2023-11-14T22:13:20.500Z",
        "kind": "health",
        "trigger": "health",
        "generation": 4,
        "summary": "green down: 3 failed checks",
        "weights": {"blue": 7, "green": 3},
        "shares": {"blue": 0.7, "green": 0.3},
    }
