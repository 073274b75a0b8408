"""Medians over rounds, the ratios between variants, and the text and Markdown reports.

Pure (no I/O): ``tests/unit/test_benchmark_report.py`` checks it. Standard library only.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any

from measure import OTHER_CPU_WARN, RunResult, describe
from scenarios import Scenario, ratio, scaling_share

# Issue targets for tdproxy/nginx req/s, by scenario (printed as met / not met).
REQUESTS_TARGETS = {"keepalive": 0.75, "newconn": 0.7, "tls": 0.7}
P99_TARGETS = {"keepalive": 1.5}
ACCESS_LOG_MAX_COST = 0.10
WORKERS_MIN_SHARE = 0.9


@dataclasses.dataclass
class Summary:
    target: str
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    non_2xx_3xx: int
    socket_errors: int
    max_other_cpu_percent: float
    cpu_us_per_request: float


@dataclasses.dataclass
class Compared:
    label: str
    numerator: str
    denominator: str
    requests_per_s: float  # ratio of the medians
    p99: float
    cpu_per_request: float
    round_median: float  # the req/s ratio computed within each round: median and lowest
    round_min: float


@dataclasses.dataclass
class ScenarioReport:
    key: str
    title: str
    note: str
    loads: dict[str, str]  # variant -> what load it got
    unsupported: dict[str, str]  # variant -> why it was not measured
    rounds: list[RunResult]
    summary: list[Summary]
    compared: list[Compared]
    verdicts: list[str]
    extras: dict[str, Any]  # scenario-specific facts (TLS resumption, ...)
    error: str | None = None  # the scenario stopped with this error


def summarize(results: list[RunResult], names: list[str]) -> list[Summary]:
    summaries = []
    for name in names:
        mine = [r for r in results if r.target == name]
        if not mine:
            continue
        summaries.append(
            Summary(
                target=name,
                requests_per_s=statistics.median(r.requests_per_s for r in mine),
                p50_ms=statistics.median(r.p50_ms for r in mine),
                p99_ms=statistics.median(r.p99_ms for r in mine),
                non_2xx_3xx=sum(r.non_2xx_3xx for r in mine),
                socket_errors=sum(sum(r.socket_errors.values()) for r in mine),
                max_other_cpu_percent=max(r.other_cpu_percent for r in mine),
                cpu_us_per_request=statistics.median(r.cpu_us_per_request for r in mine),
            )
        )
    return summaries


def _round_ratios(results: list[RunResult], numerator: str, denominator: str) -> list[float]:
    """numerator/denominator req/s round by round (the two ran back to back in each round)."""
    by_round = {(r.target, r.round): r.requests_per_s for r in results}
    rounds = sorted({r.round for r in results})
    return [
        by_round[(numerator, n)] / by_round[(denominator, n)]
        for n in rounds
        if by_round.get((denominator, n)) and (numerator, n) in by_round
    ]


def compare(
    scenario: Scenario, summaries: list[Summary], results: list[RunResult]
) -> list[Compared]:
    by_name = {s.target: s for s in summaries}
    compared = []
    for c in scenario.comparisons:
        num, den = by_name.get(c.numerator), by_name.get(c.denominator)
        per_round = _round_ratios(results, c.numerator, c.denominator)
        if num is None or den is None or not per_round:
            continue
        compared.append(
            Compared(
                label=c.label,
                numerator=c.numerator,
                denominator=c.denominator,
                requests_per_s=ratio(num.requests_per_s, den.requests_per_s) or 0.0,
                p99=ratio(num.p99_ms, den.p99_ms) or 0.0,
                cpu_per_request=ratio(num.cpu_us_per_request, den.cpu_us_per_request) or 0.0,
                round_median=statistics.median(per_round),
                round_min=min(per_round),
            )
        )
    return compared


def _yes_no(value: bool | None) -> str:
    return "unknown (the probe failed)" if value is None else ("yes" if value else "no")


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def verdicts(
    key: str,
    summaries: list[Summary],
    extras: dict[str, Any],
    unsupported: dict[str, str] | None = None,
    compared: list[Compared] | None = None,
) -> list[str]:
    """The lines that judge a scenario against its target or rule."""
    s = {x.target: x for x in summaries}
    lines = []
    if key in REQUESTS_TARGETS and "tdproxy" in s and "nginx" in s:
        got = s["tdproxy"].requests_per_s / s["nginx"].requests_per_s
        want = REQUESTS_TARGETS[key]
        line = f"target tdproxy/nginx req/s >= {want:.2f}: {got:.2f} ({_met(got >= want)})"
        if key in P99_TARGETS:
            p99, most = s["tdproxy"].p99_ms / s["nginx"].p99_ms, P99_TARGETS[key]
            line += f"; p99 <= {most:.1f}x: {p99:.2f}x ({_met(p99 <= most)})"
        lines.append(line)
    if key == "accesslog":
        for kind in ("tdproxy", "nginx"):
            on, off = s.get(f"{kind}-log"), s.get(kind)
            if on and off:
                cost = 1.0 - on.requests_per_s / off.requests_per_s
                cpu = on.cpu_us_per_request / off.cpu_us_per_request - 1.0
                line = f"{kind}'s access log costs {100 * cost:.1f} % of req/s, CPU per request "
                line += f"{100 * cpu:+.1f} %"
                if kind == "tdproxy":
                    line += f" (target <= {100 * ACCESS_LOG_MAX_COST:.0f} %: req/s "
                    line += f"{_met(cost <= ACCESS_LOG_MAX_COST)}, CPU per request "
                    line += f"{_met(cpu <= ACCESS_LOG_MAX_COST)})"
                lines.append(line)
    if key == "workers":
        lines += _workers_verdicts(s, unsupported or {}, compared or [])
    if key == "h2" and "tdproxy" in s and "tdproxy-h1" in s:
        rule = s["tdproxy"].requests_per_s / s["tdproxy-h1"].requests_per_s
        lines.append(
            f"http2 default rule: tdproxy h2 (1 connection x 50 streams) / tdproxy HTTP/1.1 "
            f"(50 connections) = {rule:.2f} -> "
            + ("http2 may default to true" if rule >= 1.0 else "http2 stays false by default")
        )
    if key == "tls-handshake" and extras.get("tls_resumption"):
        resumed = ", ".join(
            f"{name} {_yes_no(offered)}" for name, offered in extras["tls_resumption"].items()
        )
        lines.append(
            f"TLS session resumption offered to a returning client: {resumed} (wrk resumes "
            "sessions when the server offers it, so these are mostly abbreviated handshakes)"
        )
    return lines


def _workers_verdicts(
    s: dict[str, Summary], unsupported: dict[str, str], compared: list[Compared]
) -> list[str]:
    lines = []
    if all(k in s for k in ("nginx-w1", "nginx-w2", "tdproxy-w1", "tdproxy-w2")):
        by_medians = scaling_share(
            s["nginx-w1"].requests_per_s,
            s["nginx-w2"].requests_per_s,
            s["tdproxy-w1"].requests_per_s,
            s["tdproxy-w2"].requests_per_s,
        )
        # The gains measured within each round (1 and 2 workers back to back) drift less with
        # the machine than the medians of separate runs do.
        gains = {c.numerator: c.round_median for c in compared}
        by_rounds = None
        if "nginx-w2" in gains and "tdproxy-w2" in gains:
            by_rounds = scaling_share(1.0, gains["nginx-w2"], 1.0, gains["tdproxy-w2"])
        if by_medians is None and by_rounds is None:
            lines.append("nginx gained nothing from a second worker here: no scaling share")
        else:
            shown = by_rounds if by_rounds is not None else by_medians
            assert shown is not None
            line = f"tdproxy's gain from 1 to 2 workers is {shown:.2f} of nginx's"
            line += " (by the round-by-round gains" if by_rounds is not None else " (by medians"
            if by_rounds is not None and by_medians is not None:
                line += f"; by medians {by_medians:.2f}"
            line += f"; target >= {WORKERS_MIN_SHARE:.1f}: {_met(shown >= WORKERS_MIN_SHARE)})"
            lines.append(line)
    elif "tdproxy-w2" in unsupported:
        lines.append(f"tdproxy with 2 workers: {unsupported['tdproxy-w2']}")
    for kind in ("nginx", "tdproxy"):
        one = s.get(f"{kind}-w1")
        if one and one.cpu_us_per_request > 0:
            lines.append(
                f"{kind} per core of CPU (1 / CPU per request, 1 worker): "
                f"{1e6 / one.cpu_us_per_request:,.0f} req/s; with N idle cores about N times "
                "that, until the backend or the load generator is the limit"
            )
    return lines


def shared_machine_percent(reports: list[ScenarioReport]) -> float:
    """The most CPU that other processes took in any measured run."""
    return max((r.other_cpu_percent for rep in reports for r in rep.rounds), default=0.0)


# --------------------------------------------------------------------------- formatting


def format_table(summaries: list[Summary], rounds: int) -> str:
    head = (
        f"{'target':<12} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8} "
        f"{'sock err':>8} {'other CPU':>9} {'CPU us/req':>10}"
    )
    lines = [f"medians over {rounds} round(s):", head, "-" * len(head)]
    for s in summaries:
        lines.append(
            f"{s.target:<12} {s.requests_per_s:>9.0f} {s.p50_ms:>8.2f} {s.p99_ms:>8.2f} "
            f"{s.non_2xx_3xx:>8} {s.socket_errors:>8} {s.max_other_cpu_percent:>8.0f}% "
            f"{s.cpu_us_per_request:>10.1f}"
        )
    return "\n".join(lines)


def format_compared(c: Compared) -> str:
    return (
        f"{c.label}: req/s {c.requests_per_s:.2f}x (round by round: median "
        f"{c.round_median:.2f}x, lowest {c.round_min:.2f}x), p99 {c.p99:.2f}x, "
        f"CPU per request {c.cpu_per_request:.2f}x"
    )


def format_scenario(rep: ScenarioReport, rounds: int) -> str:
    lines = [f"--- {rep.key}: {rep.title}"]
    if rep.note:
        lines.append(f"({rep.note})")
    loads = sorted(set(rep.loads.values()))
    if len(loads) == 1:
        lines.append(f"load: {loads[0]}")
    else:
        lines += [f"load {name}: {load}" for name, load in rep.loads.items()]
    for name, why in rep.unsupported.items():
        lines.append(f"{name}: {why}")
    if rep.error:
        lines.append(f"!! scenario stopped: {rep.error}")
    if rep.summary:
        lines.append(format_table(rep.summary, rounds))
    lines += [format_compared(c) for c in rep.compared]
    lines += rep.verdicts
    return "\n".join(lines)


def _short(value: float) -> str:
    return f"{value / 1000:.1f}k" if value >= 10_000 else f"{value:,.0f}"


def overview_rows(reports: list[ScenarioReport]) -> list[list[str]]:
    """One row per scenario: every variant's median req/s (p99 for the proxies) and the first
    comparison, for the table at the top of the report."""
    rows = []
    for rep in reports:
        cells = []
        for s in rep.summary:
            cell = f"{s.target} {_short(s.requests_per_s)}"
            if s.target != "backend":
                cell += f" (p99 {s.p99_ms:.2f} ms, {s.cpu_us_per_request:.1f} us/req)"
            cells.append(cell)
        cells += [f"{name}: {why}" for name, why in rep.unsupported.items()]
        head = rep.compared[0] if rep.compared else None
        ratio_text = (
            f"{head.label} {head.requests_per_s:.2f} "
            f"(p99 {head.p99:.2f}x, CPU {head.cpu_per_request:.2f}x)"
            if head
            else (f"stopped: {rep.error}" if rep.error else "")
        )
        rows.append([rep.title, "; ".join(cells), ratio_text])
    return rows


def format_overview(reports: list[ScenarioReport]) -> str:
    lines = ["=== overview (medians: req/s, and for proxies p99 and their own CPU per request) ==="]
    for title, cells, ratio_text in overview_rows(reports):
        lines.append(f"{title}:\n    {cells}\n    {ratio_text}")
    for rep in reports:
        lines += [f"{rep.key}: {v}" for v in rep.verdicts]
    return "\n".join(lines)


def markdown_overview(reports: list[ScenarioReport]) -> str:
    lines = ["| scenario | medians | ratio |", "| --- | --- | --- |"]
    lines += [f"| {t} | {c} | {r} |" for t, c, r in overview_rows(reports)]
    return "\n".join(lines)


def format_rounds(rep: ScenarioReport) -> list[str]:
    return [f"round {r.round}: {r.target:<11} {describe(r)}" for r in rep.rounds]


def flag_shared(percent: float) -> str | None:
    if percent <= OTHER_CPU_WARN:
        return None
    return (
        f"!! measured while the machine was shared: other processes used up to {percent:.0f}% "
        "of the CPUs during some runs; rerun on an idle machine"
    )
