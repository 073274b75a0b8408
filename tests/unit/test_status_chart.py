"""The split history and the status page's chart of it, without a process."""

from __future__ import annotations

import re

import pytest

from tdproxy.controlplane.changes import ChangeLog
from tdproxy.controlplane.split_history import SplitHistory
from tdproxy.controlplane.status_chart import (
    HEIGHT,
    PLOT_H,
    TOP,
    Mark,
    colours,
    render_split_chart,
)
from tdproxy.controlplane.status_page import render_status_page


def test_split_history_keeps_15_minutes_and_ends_with_the_current_value() -> None:
    history = SplitHistory(span=900, interval=10)
    for t in range(0, 2000, 10):
        history.sample(float(t), {"a": t / 2000})
    points = history.points(2000.0, {"a": 0.99})
    assert points[0][0] >= 2000 - 900
    assert points[-1] == (2000.0, {"a": 0.99})
    assert len(history) <= 900 / 10 + 8


def polyline(svg: str, name: str) -> tuple[str, list[tuple[float, float]]]:
    match = re.search(rf'<polyline data-backend="{name}" data-last="([^"]*)" points="([^"]*)"', svg)
    assert match, svg
    points = [tuple(float(v) for v in pair.split(",")) for pair in match.group(2).split()]
    return match.group(1), points  # type: ignore[return-value]


def test_chart_draws_one_polyline_per_backend_ending_at_the_current_share() -> None:
    points = [
        (100.0, {"blue": 1.0, "green": 0.0}),
        (400.0, {"blue": 0.5, "green": 0.5}),
        (1000.0, {"blue": 0.25, "green": 0.75}),
    ]
    marks = [Mark(500.0, "config", "blue 100% -> 25% <x>"), Mark(10.0, "health", "too old")]
    svg = render_split_chart(points, marks, ["blue", "green"], now=1000.0, span=900.0)
    last, coords = polyline(svg, "green")
    assert float(last) == 0.75
    assert len(coords) == 3
    assert coords[-1][1] == pytest.approx(TOP + PLOT_H * 0.25, abs=0.05)
    assert coords[0][1] == pytest.approx(TOP + PLOT_H, abs=0.05)
    assert polyline(svg, "blue")[0] == "0.25"
    assert svg.count('class="change-mark"') == 1  # the mark older than the window is left out
    assert "blue 100% -&gt; 25% &lt;x&gt;" in svg
    assert f'height="{HEIGHT}"' in svg
    assert "<script" not in svg


def test_backends_named_like_colours_get_them() -> None:
    assert colours(["blue", "green"]) == {"blue": "#0969da", "green": "#1a7f37"}
    picked = colours(["primary-env", "second-env", "blue"])
    assert picked["blue"] == "#0969da"
    assert len(set(picked.values())) == 3


def test_status_page_shows_the_chart_and_the_latest_20_changes() -> None:
    changes = ChangeLog(clock=lambda: 1000.0)
    for generation in range(1, 31):
        changes.record("config", "file", generation, f"change {generation}", {"a": 1}, {"a": 1.0})
    status = {"time": 1000.0, "backends": [{"name": "a", "observed_share": 1.0}]}
    page = render_status_page(status, changes.latest(), [(1000.0, {"a": 1.0})])
    table = page[page.index('<table id="changes">') :]
    assert table.count('<tr class="change-config"') == 20
    assert table.index("change 30<") < table.index("change 11<") and "change 10<" not in table
    assert '<svg id="split-chart"' in page and 'data-backend="a" data-last="1.0"' in page
    assert render_status_page(status).count("no changes yet") == 1
