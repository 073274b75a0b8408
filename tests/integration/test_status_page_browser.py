"""The status page rendered by a real browser: Debian's headless ``chromium``, no extra Python deps.

Chromium loads ``/status`` with a virtual-time budget, so the page's script runs its refreshes
(every 2.5 s of virtual time) before ``--dump-dom`` prints the DOM as the script left it. The DOM
is parsed with :mod:`html.parser`: every value sits in an element with ``data-field="<status JSON
key>"`` (raw value in ``data-value``, formatted value as text), per backend inside
``tr[data-backend=NAME]``, and is compared with ``/api/v1/status`` fetched right after.

To prove the script itself renders (the server renders the same numbers into the HTML), the second
load goes through a relay that holds the page's first ``/api/v1/status`` fetch until the test has
applied a reload: the HTML arrived with the old generation, so the new weights and the added
backend in the dumped DOM can only come from the script. A screenshot is saved to
``test-artifacts/status-page.png``.

Chromium comes from Debian's ``chromium`` package (``scripts/system-deps`` installs it); without it
the test skips when not root and fails as root.
"""

from __future__ import annotations

import contextlib
import copy
import json
import socket
import threading
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pytest

from tdproxy.controlplane import status_chart as chart
from tests.fakes import client
from tests.fakes.browser import CHROMIUM_TIMEOUT, Chromium, dump_dom, require_chromium
from tests.fakes.client import RawClient
from tests.fakes.process import (
    LOCALHOST,
    REPO_ROOT,
    BackendFactory,
    ProxyFactory,
    ProxyProcess,
    free_port,
    proxy_config,
    wait_until,
)

ARTIFACTS = REPO_ROOT / "test-artifacts"
VOID_TAGS = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}
)
SHARE_TOLERANCE = 0.02  # observed shares may move a little between the page and the JSON


def take_screenshot(binary: str, profile: Path, url: str, name: str, height: int) -> Path:
    """A 1280-pixel-wide screenshot of ``url``, saved as ``test-artifacts/<name>``."""
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / name
    screenshot.unlink(missing_ok=True)
    with Chromium(
        binary, profile, url, f"--screenshot={screenshot}", f"--window-size=1280,{height}"
    ) as run:
        run.output()
    return screenshot


# -- reading the rendered page ---------------------------------------------------------------


@dataclass
class Rendered:
    """One ``[data-field]`` element: its raw ``data-value`` and its visible text."""

    value: str
    text: str


class StatusDom(HTMLParser):
    """The page's ``[data-field]`` values: top-level ones and per ``tr[data-backend]`` (rows
    inside the ``<template>`` the script clones are skipped), and the ``#stale`` warning."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.page: dict[str, Rendered] = {}
        self.backends: dict[str, dict[str, Rendered]] = {}
        self.row_order: list[str] = []
        self.stale = ""
        self._open: list[tuple[str, dict[str, str], list[str]]] = []  # tag, attributes, text
        self._template_depth = 0
        self._row: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {key: value or "" for key, value in attrs}
        if tag == "template":
            self._template_depth += 1
        if tag in VOID_TAGS:
            return
        self._open.append((tag, attributes, []))
        if tag == "tr" and "data-backend" in attributes and not self._template_depth:
            self._row = attributes["data-backend"]
            self.row_order.append(self._row)
            self.backends[self._row] = {}

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in VOID_TAGS:
            self.handle_starttag(tag, attrs)
            self.handle_endtag(tag)

    def handle_data(self, data: str) -> None:
        for _, _, text in self._open:
            text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID_TAGS:
            return
        while self._open:
            open_tag, attributes, text = self._open.pop()
            self._close(open_tag, attributes, "".join(text))
            if open_tag == tag:
                break
        if tag == "template":
            self._template_depth -= 1

    def _close(self, tag: str, attributes: dict[str, str], text: str) -> None:
        if self._template_depth:
            return
        if attributes.get("id") == "stale":
            self.stale = text
        if tag == "tr" and "data-backend" in attributes:
            self._row = None
        name = attributes.get("data-field")
        if name is None:
            return
        rendered = Rendered(attributes.get("data-value", ""), text)
        if self._row is None:
            self.page[name] = rendered
        else:
            self.backends[self._row][name] = rendered


def parse_dom(html: str) -> StatusDom:
    dom = StatusDom()
    dom.feed(html)
    dom.close()
    assert dom.backends, f"no tr[data-backend] rows in the rendered page:\n{html[:2000]}"
    return dom


def percent(text: str) -> float:
    assert text.endswith("%"), text
    return float(text[:-1]) / 100


def assert_page_matches(dom: StatusDom, doc: Mapping[str, Any]) -> None:
    """The rendered numbers against a status document fetched just after the page."""
    assert dom.stale == "", f"the page's script reported a failed refresh: {dom.stale}"
    for key in ("method", "generation", "config_path"):
        assert dom.page[key].value == str(doc[key]), (key, dom.page[key], doc[key])
        assert dom.page[key].text == str(doc[key]), (key, dom.page[key], doc[key])
    assert dom.page["ready"].value == str(doc["ready"]).lower()
    assert dom.page["last_reload.ok"].value == str(doc["last_reload"]["ok"]).lower()
    unrouted = doc["unrouted_requests"]
    assert dom.page["unrouted_requests"].value == json.dumps(unrouted, separators=(",", ":"))
    assert dom.page["unrouted_requests"].text == (
        ", ".join(f"{code}: {count}" for code, count in unrouted.items()) or "none"
    )
    assert dom.row_order == [b["name"] for b in doc["backends"]]
    for backend in doc["backends"]:
        row = dom.backends[backend["name"]]
        where = f"backend {backend['name']}: {row}"
        assert (row["name"].text, row["url"].text) == (backend["name"], backend["url"]), where
        assert row["weight"].value == row["weight"].text == str(backend["weight"]), where
        configured = backend["configured_share"]
        assert float(row["configured_share"].value) == configured, where
        assert row["configured_share"].text == f"{configured * 100:.1f}%", where
        observed = float(row["observed_share"].value)
        assert observed == pytest.approx(backend["observed_share"], abs=SHARE_TOLERANCE), where
        assert percent(row["observed_share"].text) == pytest.approx(observed, abs=0.0006), where
        healthy = backend["healthy"]
        assert row["healthy"].value == str(healthy).lower(), where
        assert row["healthy"].text == ("up" if healthy else "down"), where
        requests = int(row["requests"].value)
        assert row["requests"].text == str(requests), where
        assert 0 <= backend["requests"] - requests <= 5, where


def status(proxy: ProxyProcess) -> dict[str, Any]:
    response = client.request(proxy.admin_url + "/api/v1/status")
    assert response.status == 200, response.text
    document: dict[str, Any] = response.json()
    return document


def hits(proxy: ProxyProcess, count: int) -> list[str]:
    with RawClient(proxy.host, proxy.port) as raw:
        return [raw.request("GET", "/").header("X-Backend") or "?" for _ in range(count)]


# -- holding the page's first refresh --------------------------------------------------------


class HoldingRelay:
    """A TCP relay to ``target`` that holds the first request for ``marker`` (the page's
    refresh) until :meth:`release`; everything else passes straight through."""

    def __init__(self, target: tuple[str, int], marker: bytes) -> None:
        self.target = target
        self.marker = marker
        self.held = threading.Event()
        self._released = threading.Event()
        self._closing = threading.Event()
        self._server = socket.create_server((LOCALHOST, 0))
        self._server.settimeout(0.1)
        self.url = f"http://{LOCALHOST}:{self._server.getsockname()[1]}"
        self._sockets: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, name="relay-accept")]

    def __enter__(self) -> Self:
        self._threads[0].start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._released.set()
        self._closing.set()
        self._threads[0].join(10)
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads[1:]:
            thread.join(10)
        for sock in self._sockets:
            sock.close()
        self._server.close()

    def release(self) -> None:
        self._released.set()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                downstream, _ = self._server.accept()
            except TimeoutError:
                continue
            downstream.settimeout(None)
            upstream = socket.create_connection(self.target)
            self._sockets += [downstream, upstream]
            for source, sink, watch in (
                (downstream, upstream, True),
                (upstream, downstream, False),
            ):
                pump = threading.Thread(target=self._pump, args=(source, sink, watch))
                self._threads.append(pump)
                pump.start()

    def _pump(self, source: socket.socket, sink: socket.socket, watch: bool) -> None:
        try:
            while data := source.recv(65536):
                if watch and self.marker in data and not self._released.is_set():
                    self.held.set()
                    self._released.wait(60)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)


# -- the test --------------------------------------------------------------------------------


@pytest.fixture
def chromium() -> str:
    return require_chromium()


def backend_list(urls: Mapping[str, str], weights: Mapping[str, int]) -> list[dict[str, Any]]:
    return [{"name": name, "url": urls[name], "weight": w} for name, w in weights.items()]


def test_status_page_in_chromium_shows_the_status_api_numbers(
    chromium: str,
    backend_factory: BackendFactory,
    proxy_factory: ProxyFactory,
    tmp_path: Path,
) -> None:
    urls = {name: backend_factory(name).url for name in ("blue", "green", "red")}
    urls["grey"] = f"http://{LOCALHOST}:{free_port()}"  # nothing listens: health check fails
    initial = {"blue": 3, "green": 1, "grey": 1}
    config = proxy_config(
        [(name, urls[name], weight) for name, weight in initial.items()],
        health_check={
            "enabled": True,
            "path": "/health",
            "interval": "200ms",
            "timeout": "200ms",
            "fall": 1,
            "rise": 1,
        },
    )
    proxy = proxy_factory(config, wait_admin=True)
    wait_until(
        lambda: [b["healthy"] for b in status(proxy)["backends"]] == [True, True, False],
        message="grey marked down, blue and green up",
    )
    assert sorted(hits(proxy, 40)) == ["blue"] * 30 + ["green"] * 10
    for _ in range(2):  # refused before any backend: shown as "400: 2"
        with RawClient(proxy.host, proxy.port) as raw:
            raw.send(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
            assert raw.read_response().status == 400

    # 1. The page as the browser shows it after its script ran, against the JSON.
    dom = parse_dom(dump_dom(chromium, tmp_path / "first", proxy.admin_url + "/status"))
    assert_page_matches(dom, status(proxy))
    assert dom.backends["grey"]["healthy"].text == "down"
    assert dom.backends["blue"]["observed_share"].text == "75.0%"
    assert dom.page["unrouted_requests"].text == "400: 2"

    # 2. A reload that changes weights and adds a backend, applied while the page's first
    # refresh is held: the DOM can only show it if the script fetched and rendered it.
    changed = copy.deepcopy(config)
    changed["backends"] = backend_list(urls, {"blue": 1, "green": 1, "grey": 1, "red": 2})
    admin = (proxy.admin_host, proxy.admin_port)
    with (
        HoldingRelay(admin, b"GET /api/v1/status ") as relay,
        Chromium(chromium, tmp_path / "second", relay.url + "/status", "--dump-dom") as run,
    ):
        assert relay.held.wait(CHROMIUM_TIMEOUT), "the page never asked for /api/v1/status"
        assert status(proxy)["generation"] == 1  # the HTML went out before the reload
        proxy.write_config(changed)
        wait_until(lambda: status(proxy)["generation"] == 2, 10, 0.05, message="reload")
        relay.release()
        html = run.output()
    dom = parse_dom(html)
    doc = status(proxy)
    assert_page_matches(dom, doc)
    assert dom.page["generation"].value == "2"
    assert {name: row["weight"].text for name, row in dom.backends.items()} == {
        "blue": "1",
        "green": "1",
        "grey": "1",
        "red": "2",
    }
    assert dom.backends["red"]["configured_share"].text == "40.0%"
    assert dom.backends["red"]["healthy"].text == "up"

    # 3. A screenshot for people to look at.
    screenshot = take_screenshot(
        chromium, tmp_path / "screenshot", proxy.admin_url + "/status", "status-page.png", 900
    )
    data = screenshot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n"), data[:16]
    assert len(data) > 10 * 1024, f"screenshot is only {len(data)} bytes"


# -- the split chart ---------------------------------------------------------------------------


class ChartDom(HTMLParser):
    """The chart's polylines (``data-backend`` -> attributes), its change marks and the rows of
    the change-log table."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.svg: dict[str, str] | None = None
        self.polylines: dict[str, dict[str, str]] = {}
        self.marks: list[str] = []
        self.change_rows: list[list[str]] = []
        self._cells: list[str] | None = None
        self._in_changes = False
        self._in_cell = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {key: value or "" for key, value in attrs}
        if tag == "svg" and attributes.get("id") == "split-chart":
            self.svg = attributes
        elif tag == "polyline":
            self.polylines[attributes["data-backend"]] = attributes
        elif tag == "line" and attributes.get("class") == "change-mark":
            self.marks.append(attributes["data-kind"])
        elif tag == "table" and attributes.get("id") == "changes":
            self._in_changes = True
        elif tag == "tr" and self._in_changes and "data-kind" in attributes:
            self._cells = []
            self.change_rows.append(self._cells)
        elif tag == "td" and self._cells is not None:
            self._in_cell = True
            self._cells.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._in_changes = False
        elif tag == "td":
            self._in_cell = False

    def handle_data(self, data: str) -> None:
        if self._in_cell and self._cells is not None:
            self._cells[-1] += data


def read_png(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB bytes) of an 8-bit, non-interlaced RGB or RGBA PNG."""
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    offset, idat, header = 8, b"", b""
    while offset < len(data):
        length = int.from_bytes(data[offset : offset + 4], "big")
        kind = data[offset + 4 : offset + 8]
        body = data[offset + 8 : offset + 8 + length]
        header = body if kind == b"IHDR" else header
        idat += body if kind == b"IDAT" else b""
        offset += 12 + length
    width, height = int.from_bytes(header[0:4], "big"), int.from_bytes(header[4:8], "big")
    depth, colour_type, interlace = header[8], header[9], header[12]
    assert depth == 8 and colour_type in (2, 6) and interlace == 0, header
    channels = 3 if colour_type == 2 else 4
    stride = width * channels
    raw = zlib.decompress(idat)
    rows: list[bytes] = []
    previous = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up = previous[i]
            corner = previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                guess = left + up - corner
                pa, pb, pc = abs(guess - left), abs(guess - up), abs(guess - corner)
                best = left if pa <= pb and pa <= pc else (up if pb <= pc else corner)
                line[i] = (line[i] + best) & 0xFF
        previous = line
        rows.append(bytes(b for x in range(width) for b in line[x * channels : x * channels + 3]))
    return width, height, rows


def pixels_near(rows: list[bytes], colour: str, tolerance: int = 60) -> list[tuple[int, int]]:
    """(x, y) of the pixels within ``tolerance`` (per channel sum) of ``#rrggbb``."""
    target = bytes.fromhex(colour[1:])
    found = []
    for y, row in enumerate(rows):
        for x in range(0, len(row), 3):
            if sum(abs(a - b) for a, b in zip(row[x : x + 3], target, strict=True)) <= tolerance:
                found.append((x // 3, y))
    return found


def test_status_page_charts_the_observed_split_and_lists_the_changes(
    chromium: str,
    backend_factory: BackendFactory,
    proxy_factory: ProxyFactory,
    tmp_path: Path,
) -> None:
    # Named like colours that appear nowhere else on the page, so the screenshot can find them.
    orange, purple = backend_factory("orange"), backend_factory("purple")
    config = proxy_config([("orange", orange.url, 50), ("purple", purple.url, 50)])
    proxy = proxy_factory(config, wait_admin=True)
    assert sorted(hits(proxy, 10)) == ["orange"] * 5 + ["purple"] * 5
    changed = copy.deepcopy(config)
    changed["backends"] = backend_list(
        {"orange": orange.url, "purple": purple.url}, {"orange": 9, "purple": 1}
    )
    proxy.write_config(changed)
    wait_until(lambda: status(proxy)["generation"] == 2, 10, 0.05, message="reload")
    assert sorted(hits(proxy, 10)) == ["orange"] * 9 + ["purple"]  # 14 : 6 in the last minute

    # 1. The chart in the DOM: one polyline per backend whose last point is the observed share
    # that /api/v1/status gives (no traffic in between, so the two agree exactly).
    dom = ChartDom()
    dom.feed(dump_dom(chromium, tmp_path / "dom", proxy.admin_url + "/status"))
    observed = {b["name"]: b["observed_share"] for b in status(proxy)["backends"]}
    assert observed == {"orange": 0.7, "purple": 0.3}
    assert dom.svg is not None and int(dom.svg["width"]) > 0 and int(dom.svg["height"]) > 0
    assert set(dom.polylines) == {"orange", "purple"}
    for name, line in dom.polylines.items():
        assert float(line["data-last"]) == pytest.approx(observed[name], abs=SHARE_TOLERANCE)
        last_x, last_y = (float(v) for v in line["points"].split()[-1].split(","))
        assert last_x == pytest.approx(chart.LEFT + chart.PLOT_W, abs=0.1)
        assert last_y == pytest.approx(chart.TOP + chart.PLOT_H * (1 - observed[name]), abs=0.1)
    assert dom.marks == ["config", "config"]  # the start and the reload
    assert [row[1:4] for row in dom.change_rows] == [
        ["config", "file", "2"],
        ["config", "start", "1"],
    ]
    assert dom.change_rows[0][4] == "orange 50% -> 90%, purple 50% -> 10%"

    # 2. The screenshot shows both series, their last points as far apart as the shares are.
    screenshot = take_screenshot(
        chromium,
        tmp_path / "screenshot",
        proxy.admin_url + "/status",
        "status-page-chart.png",
        1400,
    )
    _, _, rows = read_png(screenshot.read_bytes())
    ends = {}
    for name, colour in chart.colours(["orange", "purple"]).items():
        found = pixels_near(rows, colour)
        assert len(found) > 100, f"{name}'s line ({colour}) is not in the screenshot"
        right = max(x for x, _ in found)
        circle = [y for x, y in found if x >= right - 1]  # right of the line: the end marker
        ends[name] = (right, sum(circle) / len(circle))
    assert abs(ends["orange"][0] - ends["purple"][0]) <= 1, ends
    gap = ends["purple"][1] - ends["orange"][1]  # y grows downwards
    assert gap == pytest.approx(chart.PLOT_H * (0.7 - 0.3), abs=3), ends
