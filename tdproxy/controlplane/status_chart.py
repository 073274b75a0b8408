"""The status page's chart of the observed split over time: server-rendered inline SVG.

No script and no external asset draws it: the page carries the finished ``<svg>``. One polyline
per backend (``data-backend``, and ``data-last`` holding the share its last point shows, which is
the current observed share), the share on the y axis (0-100 %), the last ``span`` seconds on the
x axis ending now, and a dashed vertical mark (``data-kind`` config or health, the summary as its
tooltip) for each change-log entry in that time.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from tdproxy.controlplane.split_history import Point

WIDTH, HEIGHT = 720, 180
LEFT, RIGHT, TOP, BOTTOM = 44, 10, 10, 22  # margins around the plot area
PLOT_W, PLOT_H = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

# A backend named like a colour is drawn in it (blue-green deploys read at a glance);
# the others take the palette in order.
NAMED_COLOURS = {
    "blue": "#0969da",
    "green": "#1a7f37",
    "red": "#cf222e",
    "orange": "#e16f24",
    "purple": "#8250df",
    "yellow": "#bf8700",
}
PALETTE = ("#0969da", "#e16f24", "#1a7f37", "#8250df", "#cf222e", "#1b7c83", "#bf3989")
MARK_COLOURS = {"config": "#57606a", "health": "#cf222e"}


class Mark:
    """A change-log entry drawn on the chart."""

    __slots__ = ("kind", "summary", "time")

    def __init__(self, time: float, kind: str, summary: str) -> None:
        self.time = time
        self.kind = kind
        self.summary = summary

    def __repr__(self) -> str:
        return f"<Mark {self.kind} at {self.time:.0f}: {self.summary}>"


def colours(names: Sequence[str]) -> dict[str, str]:
    """A colour per backend: its own name when it is one, else the first palette colour free."""
    chosen = {name: NAMED_COLOURS[name.lower()] for name in names if name.lower() in NAMED_COLOURS}
    free = [colour for colour in PALETTE if colour not in chosen.values()] or list(PALETTE)
    for index, name in enumerate(n for n in names if n not in chosen):
        chosen[name] = free[index % len(free)]
    return {name: chosen[name] for name in names}


def _x(t: float, now: float, span: float) -> float:
    return LEFT + PLOT_W * (1 - (now - t) / span)


def _y(share: float) -> float:
    return TOP + PLOT_H * (1 - min(1.0, max(0.0, share)))


def _num(value: float) -> str:
    return f"{value:.1f}"


def _series(points: Sequence[Point], name: str, now: float, span: float) -> list[str]:
    return [
        f"{_num(_x(t, now, span))},{_num(_y(shares[name]))}"
        for t, shares in points
        if name in shares
    ]


def render_split_chart(
    points: Sequence[Point],
    marks: Sequence[Mark],
    names: Sequence[str],
    now: float,
    span: float,
) -> str:
    """The ``<figure>``: the SVG and its legend. ``names`` are the current backends in table
    order (drawn first, in that order); backends seen only earlier in ``points`` follow."""
    seen = list(names) + sorted({n for _, shares in points for n in shares} - set(names))
    palette = colours(seen)
    parts = [
        f'<svg id="split-chart" width="{WIDTH}" '
        f'height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="observed share per backend over the last {span / 60:g} minutes">',
        _axes(span),
    ]
    for mark in marks:
        if now - span <= mark.time <= now:
            x = _num(_x(mark.time, now, span))
            colour = MARK_COLOURS.get(mark.kind, MARK_COLOURS["config"])
            parts.append(
                f'<line class="change-mark" data-kind="{escape(mark.kind)}" x1="{x}" x2="{x}" '
                f'y1="{TOP}" y2="{TOP + PLOT_H}" stroke="{colour}" stroke-width="1" '
                f'stroke-dasharray="4 3"><title>{escape(mark.summary)}</title></line>'
            )
    last = points[-1][1] if points else {}
    for name in seen:
        coords = _series(points, name, now, span)
        if not coords:
            continue
        colour = palette[name]
        share = last.get(name)
        last_attr = f' data-last="{share!r}"' if share is not None else ""
        parts.append(
            f'<polyline data-backend="{escape(name)}"{last_attr} points="{" ".join(coords)}" '
            f'fill="none" stroke="{colour}" stroke-width="2.5" stroke-linejoin="round"/>'
        )
        end_x, end_y = coords[-1].split(",")
        parts.append(f'<circle cx="{end_x}" cy="{end_y}" r="3.5" fill="{colour}"/>')
    parts.append("</svg>")
    legend = "".join(
        f'<span class="key"><span class="swatch" style="background:{palette[name]}"></span>'
        f"{escape(name)}</span>"
        for name in seen
    )
    return (
        '<figure class="chart">' + "".join(parts) + f"<figcaption>{legend} "
        '<span class="key"><span class="swatch mark"></span>change-log entry</span>'
        "</figcaption></figure>"
    )


def _axes(span: float) -> str:
    lines = []
    for share in (0.0, 0.5, 1.0):
        y = _num(_y(share))
        lines.append(
            f'<line x1="{LEFT}" x2="{LEFT + PLOT_W}" y1="{y}" y2="{y}" stroke="#d0d7de" '
            'stroke-width="1"/>'
            f'<text x="{LEFT - 6}" y="{y}" text-anchor="end" dominant-baseline="middle" '
            f'font-size="11" fill="#656d76">{share * 100:.0f}%</text>'
        )
    minutes = span / 60
    step = 5 if minutes > 10 else 1
    for ago in range(int(minutes), -1, -step):
        x = _num(LEFT + PLOT_W * (1 - ago * 60 / span))
        label = "now" if ago == 0 else f"-{ago} min"
        anchor = "end" if ago == 0 else ("start" if ago * 60 >= span else "middle")
        lines.append(
            f'<text x="{x}" y="{HEIGHT - 6}" text-anchor="{anchor}" font-size="11" '
            f'fill="#656d76">{label}</text>'
        )
    return "".join(lines)
