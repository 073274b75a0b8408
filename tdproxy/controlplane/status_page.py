"""The status page: one self-contained HTML document (inline CSS and JS, no external assets).

The server renders it complete, numbers included, so it is useful without JavaScript (a
``<noscript>`` refresh reloads it). With JavaScript it fetches ``/api/v1/status`` every few
seconds and fills the same elements in place.

The structure is defined once, here: every value sits in an element with
``data-field="<key of the status JSON>"`` (``last_reload.ok`` for nested keys), inside a
``<tr data-backend="NAME">`` for per-backend values, and carries the raw JSON value in
``data-value`` beside its formatted text. The script fills any ``[data-field]`` it finds using
:data:`FIELD_KINDS`, which it receives from Python, and formats each kind exactly as
:func:`format_value` does, so a browser test can compare the page with the JSON.

Below the backends, the ``#history`` section holds the observed split of the last 15 minutes as
an inline SVG chart (:mod:`.status_chart`) and the latest change-log entries. The server draws
both; the script replaces the section with the one of a freshly fetched page every 10 s.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from html import escape
from typing import TYPE_CHECKING, Any

from tdproxy.controlplane.changes import Change, percent
from tdproxy.controlplane.split_history import HISTORY_SECONDS, Point
from tdproxy.controlplane.status_chart import Mark, render_split_chart

if TYPE_CHECKING:
    from tdproxy.controlplane.admin import StatusDoc

REFRESH_MS = 2500
HISTORY_REFRESH_MS = 10000  # the chart and the change log: as often as the split is sampled
CHANGES_SHOWN = 20
BLANK = "\u2013"  # en dash, shown for "no value"

# How each field is shown; the script gets this same table.
FIELD_KINDS: dict[str, str] = {
    # per backend
    "name": "text",
    "url": "text",
    "backup": "backup",
    "weight": "int",
    "configured_share": "share",
    "observed_share": "share",
    "healthy": "updown",
    "health_changed_at": "since",
    "health_reason": "text",
    "in_flight": "int",
    "request_rate": "rate",
    "error_rate": "ratio",
    "p95_latency_seconds": "latency",
    "requests": "int",
    "errors": "int",
    # the whole distributor
    "version": "text",
    "time": "time",
    "method": "text",
    "when_all_down": "text",
    "config_path": "text",
    "generation": "int",
    "ready": "ready",
    "uptime_seconds": "age",
    "connections_active": "int",
    "unrouted_requests": "counts",
    "last_reload.time": "since",
    "last_reload.ok": "result",
    "last_reload.trigger": "text",
    "last_reload.summary": "text",
    "last_reload.errors": "lines",
    "last_reload.pending_restart": "lines",
}


# -- formatting (mirrored by the script's fmt()) -------------------------------------------


def _fixed(value: float, digits: int) -> str:
    """Like JavaScript's ``toFixed``: exact decimal rounding, ties upwards."""
    try:
        quantum = Decimal(1).scaleb(-digits)
        return str(Decimal(value).quantize(quantum, rounding=ROUND_HALF_UP))
    except InvalidOperation:
        return f"{value:.{digits}f}"


def _age(seconds: float) -> str:
    s = max(0, math.floor(seconds))
    if s < 60:
        return f"{s}s"
    m = s // 60
    if m < 60:
        return f"{m}m {s % 60}s"
    h = m // 60
    if h < 24:
        return f"{h}h {m % 60}m"
    return f"{h // 24}d {h % 24}h"


def _time(epoch: float) -> str:
    return datetime.fromtimestamp(math.floor(epoch), UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def format_value(kind: str, value: Any, now: float) -> str:
    """The text shown for a value of a given kind (``now`` is the status document's time)."""
    if value is None:
        return BLANK
    if kind == "int":
        return str(int(value))
    if kind == "share":
        return _fixed(value * 100, 1) + "%"
    if kind == "ratio":
        return _fixed(value * 100, 2) + "%"
    if kind == "rate":
        return _fixed(value, 2) + "/s"
    if kind == "latency":
        return _fixed(value * 1000, 1) + " ms" if value < 1 else _fixed(value, 3) + " s"
    if kind == "time":
        return _time(value)
    if kind == "since":
        return f"{_time(value)} ({_age(now - value)} ago)"
    if kind == "age":
        return _age(value)
    if kind == "updown":
        return "up" if value else "down"
    if kind == "ready":
        return "ready" if value else "not ready"
    if kind == "result":
        return "ok" if value else "failed"
    if kind == "backup":
        return "backup" if value else ""
    if kind == "lines":
        return "\n".join(value)
    if kind == "counts":  # {"503": 7, ...}: the keys come sorted, as JavaScript orders them
        return ", ".join(f"{key}: {count}" for key, count in value.items()) or "none"
    return str(value)


def _raw(value: Any) -> str:
    """The ``data-value`` attribute: the JSON value as text (what the script's raw() gives)."""
    if value is None:
        return ""
    if isinstance(value, list):
        return "\n".join(value)
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))  # as JSON.stringify writes it
    if isinstance(value, float):
        return _js_number(value)
    return json.dumps(value) if isinstance(value, bool | int) else str(value)


def _js_number(value: float) -> str:
    """A float as JavaScript's ``String(number)`` writes it (integral values without ".0",
    positional notation from 1e-7 up to 1e21)."""
    if not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if value.is_integer() and abs(value) < 1e21:
        return str(int(value))
    text = repr(value)
    if "e" in text and 1e-7 <= abs(value) < 1e21:
        return format(Decimal(text), "f")
    return text.replace("e-0", "e-").replace("e+0", "e+")


def _lookup(doc: Mapping[str, Any], field: str) -> Any:
    value: Any = doc
    for key in field.split("."):
        value = value.get(key) if isinstance(value, Mapping) else None
    return value


def _field(tag: str, field: str, doc: Mapping[str, Any], now: float, cls: str = "") -> str:
    value = _lookup(doc, field)
    text = format_value(FIELD_KINDS[field], value, now)
    cls_attr = f' class="{cls}"' if cls else ""
    return (
        f'<{tag}{cls_attr} data-field="{field}" data-value="{escape(_raw(value))}">'
        f"{escape(text)}</{tag}>"
    )


# -- the page --------------------------------------------------------------------------------

_STYLE = """
:root { --ok: #1a7f37; --bad: #cf222e; --muted: #656d76; --line: #d0d7de; --bar: #0969da; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5rem;
  color: #1f2328; background: #fff; }
h1 { font-size: 1.3rem; margin: 0 0 .25rem; }
h1 small { color: var(--muted); font-weight: normal; font-size: .85rem; }
.badge { display: inline-block; padding: 0 .5em; border-radius: 1em; font-size: .8rem;
  color: #fff; background: var(--ok); vertical-align: middle; }
.badge[data-value="false"], .bad { background: var(--bad); }
dl { display: grid; grid-template-columns: max-content 1fr; gap: .15rem 1rem; margin: 1rem 0; }
dt { color: var(--muted); }
dd { margin: 0; }
.lines { white-space: pre-wrap; font-family: ui-monospace, monospace; color: var(--bad); }
.lines.pending { color: var(--muted); }
.lines.pending[data-value=""]::before { content: "none"; }
.result[data-value="false"] { color: var(--bad); font-weight: 600; }
.result[data-value="true"] { color: var(--ok); font-weight: 600; }
table { border-collapse: collapse; width: 100%; margin-top: 1rem; }
th, td { text-align: left; padding: .4rem .6rem; border-bottom: 1px solid var(--line);
  vertical-align: top; }
th { font-weight: 600; color: var(--muted); font-size: .8rem; text-transform: uppercase; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.url, .reason, .since { color: var(--muted); font-size: .85rem; }
.tag { font-size: .75rem; color: var(--muted); border: 1px solid var(--line);
  border-radius: .3em; padding: 0 .3em; }
.tag:empty { display: none; }
.health[data-value="true"] { color: var(--ok); font-weight: 600; }
.health[data-value="false"] { color: var(--bad); font-weight: 600; }
.bar { position: relative; width: 12rem; height: .8rem; background: #eaeef2;
  border-radius: .2rem; overflow: hidden; margin-top: .2rem; }
.bar .fill { position: absolute; left: 0; top: 0; bottom: 0; background: var(--bar); }
.bar .mark { position: absolute; top: 0; bottom: 0; width: 2px; background: #1f2328; }
tr.down td { background: #fff5f5; }
footer { margin-top: 1rem; color: var(--muted); font-size: .8rem; }
#stale:empty { display: none; }
#stale { color: var(--bad); }
h2 { font-size: 1.05rem; margin: 1.5rem 0 .25rem; }
.chart { margin: .5rem 0 0; }
.chart svg { display: block; max-width: 100%; height: auto; }
.chart figcaption { color: var(--muted); font-size: .8rem; }
.key { margin-right: 1rem; white-space: nowrap; }
.swatch { display: inline-block; width: .8rem; height: .8rem; border-radius: .15rem;
  vertical-align: -.1rem; margin-right: .3rem; }
.swatch.mark { width: 0; border-left: 1px dashed #57606a; border-radius: 0; }
tr.change-health td.summary { color: var(--bad); }
td.when { white-space: nowrap; color: var(--muted); font-size: .85rem; }
"""

_SCRIPT_TEMPLATE = """
"use strict";
(function () {
  const KINDS = __KINDS__;
  const BLANK = "\\u2013";
  function fixed(x, d) { return x.toFixed(d); }
  function age(sec) {
    const s = Math.max(0, Math.floor(sec));
    if (s < 60) return s + "s";
    const m = Math.floor(s / 60);
    if (m < 60) return m + "m " + (s % 60) + "s";
    const h = Math.floor(m / 60);
    if (h < 24) return h + "h " + (m % 60) + "m";
    return Math.floor(h / 24) + "d " + (h % 24) + "h";
  }
  function time(t) {
    return new Date(Math.floor(t) * 1000).toISOString().slice(0, 19).replace("T", " ") + " UTC";
  }
  function fmt(kind, v, now) {
    if (v === null || v === undefined) return BLANK;
    switch (kind) {
      case "int": return String(Math.trunc(v));
      case "share": return fixed(v * 100, 1) + "%";
      case "ratio": return fixed(v * 100, 2) + "%";
      case "rate": return fixed(v, 2) + "/s";
      case "latency": return v < 1 ? fixed(v * 1000, 1) + " ms" : fixed(v, 3) + " s";
      case "time": return time(v);
      case "since": return time(v) + " (" + age(now - v) + " ago)";
      case "age": return age(v);
      case "updown": return v ? "up" : "down";
      case "ready": return v ? "ready" : "not ready";
      case "result": return v ? "ok" : "failed";
      case "backup": return v ? "backup" : "";
      case "lines": return v.join("\\n");
      case "counts": {
        const parts = Object.keys(v).map((key) => key + ": " + v[key]);
        return parts.length ? parts.join(", ") : "none";
      }
      default: return String(v);
    }
  }
  function raw(v) {
    if (v === null || v === undefined) return "";
    if (Array.isArray(v)) return v.join("\\n");
    return typeof v === "object" ? JSON.stringify(v) : String(v);
  }
  function lookup(obj, field) {
    let v = obj;
    for (const key of field.split(".")) v = (v !== null && typeof v === "object") ? v[key] : null;
    return v;
  }
  function fill(root, obj, now, skipRows) {
    for (const el of root.querySelectorAll("[data-field]")) {
      if (skipRows && el.closest("[data-backend]")) continue;
      const field = el.dataset.field;
      const v = lookup(obj, field);
      el.textContent = fmt(KINDS[field] || "text", v, now);
      el.dataset.value = raw(v);
    }
    for (const el of root.querySelectorAll("[data-bar]")) {
      if (skipRows && el.closest("[data-backend]")) continue;
      el.style.width = fixed(Math.min(1, lookup(obj, el.dataset.bar) || 0) * 100, 1) + "%";
    }
    for (const el of root.querySelectorAll("[data-mark]")) {
      if (skipRows && el.closest("[data-backend]")) continue;
      el.style.left = fixed(Math.min(1, lookup(obj, el.dataset.mark) || 0) * 100, 1) + "%";
    }
  }
  function render(doc) {
    fill(document.body, doc, doc.time, true);
    const body = document.getElementById("backends");
    const template = document.getElementById("row-template");
    const keep = new Set(doc.backends.map(b => b.name));
    for (const tr of Array.from(body.querySelectorAll("tr[data-backend]"))) {
      if (!keep.has(tr.dataset.backend)) tr.remove();
    }
    for (const b of doc.backends) {
      let tr = Array.from(body.children).find(r => r.dataset.backend === b.name);
      if (!tr) tr = template.content.firstElementChild.cloneNode(true);
      tr.dataset.backend = b.name;
      tr.classList.toggle("down", !b.healthy);
      fill(tr, b, doc.time, false);
      body.appendChild(tr);
    }
    document.getElementById("stale").textContent = "";
  }
  async function refresh() {
    try {
      const response = await fetch("/api/v1/status", { cache: "no-store" });
      if (!response.ok) throw new Error("HTTP " + response.status);
      render(await response.json());
    } catch (err) {
      document.getElementById("stale").textContent =
        "not updated since the last refresh: " + err.message;
    } finally {
      setTimeout(refresh, __REFRESH_MS__);
    }
  }
  setTimeout(refresh, __REFRESH_MS__);
  // The chart and the change log are drawn by the server: take them from a fresh page.
  async function refreshHistory() {
    try {
      const response = await fetch("/status", { cache: "no-store" });
      if (response.ok) {
        const page = new DOMParser().parseFromString(await response.text(), "text/html");
        const fresh = page.getElementById("history");
        const shown = document.getElementById("history");
        if (fresh && shown) shown.replaceWith(document.importNode(fresh, true));
      }
    } catch (err) {
      // refresh() reports an unreachable server; the chart just stays as it was.
    } finally {
      setTimeout(refreshHistory, __HISTORY_MS__);
    }
  }
  setTimeout(refreshHistory, __HISTORY_MS__);
})();
"""

_SCRIPT = (
    _SCRIPT_TEMPLATE.replace("__KINDS__", json.dumps(FIELD_KINDS))
    .replace("__REFRESH_MS__", str(REFRESH_MS))
    .replace("__HISTORY_MS__", str(HISTORY_REFRESH_MS))
)


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


# Only this page's own inline script may run, and it may only talk to this server.
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; script-src {_sha256(_SCRIPT)}; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)

_COLUMNS = (
    ("Backend", ""),
    ("Weight", "num"),
    ("Configured", "num"),
    ("Observed share (60 s)", ""),
    ("Health", ""),
    ("In flight", "num"),
    ("Requests", "num"),
    ("Rate", "num"),
    ("Error rate", "num"),
    ("p95 latency", "num"),
)


def _percent(value: Any) -> str:
    share = min(1.0, float(value or 0.0))
    return _fixed(share * 100, 1) + "%"


def render_row(backend: Mapping[str, Any], now: float) -> str:
    """One ``<tr data-backend=...>``; also the template the script clones for new backends."""
    name = escape(str(backend.get("name") or ""))
    down = ' class="down"' if backend.get("healthy") is False else ""
    observed = _percent(backend.get("observed_share"))
    configured = _percent(backend.get("configured_share"))

    def f(field: str, cls: str = "") -> str:
        return _field("span", field, backend, now, cls)

    def num(field: str) -> str:
        return _field("td", field, backend, now, "num")

    return (
        f'<tr data-backend="{name}"{down}>'
        f"<td><strong>{f('name')}</strong> {f('backup', 'tag')}<br>{f('url', 'url')}</td>"
        f"{num('weight')}{num('configured_share')}"
        f"<td>{f('observed_share')}"
        f'<div class="bar" title="bar: observed share; line: configured share">'
        f'<span class="fill" data-bar="observed_share" style="width:{observed}"></span>'
        f'<span class="mark" data-mark="configured_share" style="left:{configured}"></span>'
        f"</div></td>"
        f"<td>{f('healthy', 'health')}<br>{f('health_changed_at', 'since')}<br>"
        f"{f('health_reason', 'reason')}</td>"
        f'{num("in_flight")}<td class="num">{f("requests")}<br>'
        f"<small>errors {f('errors')}</small></td>"
        f"{num('request_rate')}{num('error_rate')}{num('p95_latency_seconds')}"
        "</tr>"
    )


def _summary(status: Mapping[str, Any], now: float) -> str:
    def f(field: str, cls: str = "") -> str:
        return _field("span", field, status, now, cls)

    rows = (
        ("Routing method", f"{f('method')} (when all down: {f('when_all_down')})"),
        ("Config file", f"{f('config_path')} (generation {f('generation')})"),
        (
            "Last reload",
            f"{f('last_reload.time')} via {f('last_reload.trigger')}: "
            f"{f('last_reload.ok', 'result')} {BLANK} {f('last_reload.summary')}"
            f"{_field('div', 'last_reload.errors', status, now, 'lines')}",
        ),
        (
            "Pending restart",
            _field("div", "last_reload.pending_restart", status, now, "lines pending"),
        ),
        ("Connections", f("connections_active")),
        ("Answered without a backend", f("unrouted_requests")),
        ("Uptime", f"{f('uptime_seconds')} (version {f('version')})"),
    )
    return "<dl>" + "".join(f"<dt>{label}</dt><dd>{value}</dd>" for label, value in rows) + "</dl>"


def _split(shares: Mapping[str, float]) -> str:
    return " / ".join(f"{name} {percent(share)}" for name, share in shares.items())


def render_changes(changes: Sequence[Change]) -> str:
    """The change log table, newest first."""
    rows = "".join(
        f'<tr class="change-{escape(c.kind)}" data-kind="{escape(c.kind)}">'
        f'<td class="when">{escape(_time(c.time))}</td><td>{escape(c.kind)}</td>'
        f'<td>{escape(c.trigger)}</td><td class="num">{c.generation}</td>'
        f'<td class="summary">{escape(c.summary)}</td><td>{escape(_split(c.shares))}</td></tr>'
        for c in changes
    )
    if not rows:
        rows = '<tr><td colspan="6">no changes yet</td></tr>'
    head = "".join(
        f"<th>{label}</th>"
        for label in ("Time", "Kind", "Trigger", "Generation", "Summary", "Configured split")
    )
    return f'<table id="changes"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


def render_history(
    status: StatusDoc | Mapping[str, Any], changes: Sequence[Change], history: Sequence[Point]
) -> str:
    """The ``#history`` section: the split chart and the latest change-log entries."""
    now = float(status["time"])
    names = [str(b["name"]) for b in status["backends"]]
    marks = [Mark(c.time, c.kind, c.summary) for c in changes]
    chart = render_split_chart(history, marks, names, now, HISTORY_SECONDS)
    return (
        '<section id="history">'
        f"<h2>Observed split, last {HISTORY_SECONDS // 60} minutes</h2>{chart}"
        f"<h2>Change log</h2>{render_changes(changes[:CHANGES_SHOWN])}"
        "</section>"
    )


def render_status_page(
    status: StatusDoc | Mapping[str, Any],
    changes: Sequence[Change] = (),
    history: Sequence[Point] = (),
) -> str:
    """The complete page for one status document, with the change log (newest first) and the
    observed split over time (oldest first; its last point should be ``status``'s shares)."""
    now = float(status["time"])
    head = "".join(f'<th class="{cls}">{escape(label)}</th>' for label, cls in _COLUMNS)
    rows = "".join(render_row(backend, now) for backend in status["backends"])
    template = render_row({}, now)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>tdproxy status</title>
<link rel="icon" href="data:,">
<noscript><meta http-equiv="refresh" content="5"></noscript>
<style>{_STYLE}</style>
</head>
<body>
<h1>tdproxy <small>Traffic Distributor status</small>
{_field("span", "ready", status, now, "badge")}</h1>
{_summary(status, now)}
<table>
<thead><tr>{head}</tr></thead>
<tbody id="backends">{rows}</tbody>
</table>
<template id="row-template">{template}</template>
{render_history(status, changes, history)}
<footer>As of {_field("span", "time", status, now)}; refreshes every {REFRESH_MS / 1000:g} s.
<span id="stale"></span></footer>
<script>{_SCRIPT}</script>
</body>
</html>
"""
