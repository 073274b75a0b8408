"""What benchmarks/loadgen.py reads from wrk and h2load, and how benchmarks/report.py judges it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = str(Path(__file__).resolve().parents[2] / "benchmarks")
if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)

import loadgen  # noqa: E402
import report  # noqa: E402
import scenarios as sc  # noqa: E402
from measure import RunResult  # noqa: E402

WRK = """Running 5s test @ http://127.0.0.1:8080/
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.02ms  312.45us   8.12ms   89.21%
    Req/Sec    48.12k     2.01k   51.30k    80.00%
  Latency Distribution
     50%  980.00us
     75%    1.10ms
     90%    1.30ms
     99%    2.05ms
  240615 requests in 5.00s, 35.56MB read
  Socket errors: connect 0, read 3, write 0, timeout 2
  Non-2xx or 3xx responses: 7
Requests/sec:  48110.52
Transfer/sec:      7.11MB
"""

H2LOAD = """starting benchmark...
TLS Protocol: TLSv1.3
Cipher: TLS_AES_256_GCM_SHA384
Application protocol: h2
finished in 2.01s, 32092.00 req/s, 2.11MB/s
requests: 64184 total, 64234 started, 64184 done, 64180 succeeded, 4 failed, 0 errored, 0 timeout
status codes: 64180 2xx, 0 3xx, 0 4xx, 4 5xx
traffic: 4.22MB (4428745) total, 2.94MB (3080832) headers (space savings 51%), 188KB (192540) data
                     min         max         mean         sd        +/- sd
time for request:       39us     12.80ms      1.41ms      1.60ms    84.58%
"""


def test_wrk_output_gives_rate_latency_and_every_error() -> None:
    r = loadgen.parse_wrk(WRK)
    assert r.requests_per_s == 48110.52
    assert r.p50_ms == pytest.approx(0.98)
    assert r.p99_ms == pytest.approx(2.05)
    assert r.requests == 240615
    assert r.non_2xx_3xx == 7
    assert r.socket_errors == {"connect": 0, "read": 3, "write": 0, "timeout": 2}


def test_missing_lines_are_an_error_not_a_zero() -> None:
    with pytest.raises(loadgen.OutputError, match="Requests/sec"):
        loadgen.parse_wrk(WRK.replace("Requests/sec", "Req"))
    with pytest.raises(loadgen.OutputError, match="status codes"):
        loadgen.parse_h2load(H2LOAD.replace("status codes", "codes"))


def test_h2load_output_and_its_log_give_rate_errors_and_percentiles() -> None:
    log = "".join(f"1796600418{i:06d}\t200\t{t}\n" for i, t in enumerate(range(100, 200)))
    r = loadgen.h2load_result(H2LOAD, log + "garbage line\n")
    assert r.requests_per_s == 32092.0
    assert r.requests == 64180
    assert r.non_2xx_3xx == 4
    assert r.socket_errors == {"failed": 4}
    assert r.protocol == "h2"
    assert r.p50_ms == pytest.approx(0.149)
    assert r.p99_ms == pytest.approx(0.198)


def test_percentile_is_nearest_rank() -> None:
    values = list(range(1, 101))
    assert loadgen.percentile(values, 50) == 50
    assert loadgen.percentile(values, 99) == 99
    assert loadgen.percentile([7], 99) == 7
    assert loadgen.percentile([], 99) == 0.0


def test_a_serving_check_catches_protocol_status_and_size() -> None:
    ok = H2LOAD.replace("64180 succeeded, 4 failed", "4 succeeded, 0 failed").replace(
        "64180 2xx, 0 3xx, 0 4xx, 4 5xx", "4 2xx, 0 3xx, 0 4xx, 0 5xx"
    )
    assert loadgen.h2load_check(ok.replace("(192540) data", "(12) data"), 4, 3, "h2") is None
    assert "12 body bytes" in str(loadgen.h2load_check(ok.replace("(192540)", "(12)"), 4, 1, "h2"))
    assert "negotiated 'h2'" in str(loadgen.h2load_check(ok, 4, 3, "http/1.1"))
    assert "status codes" in str(loadgen.h2load_check(H2LOAD, 4, 3, "h2"))


def test_load_generator_command_lines() -> None:
    close = sc.Load(connections=50, close=True)
    argv = loadgen.wrk_argv(close, "https://127.0.0.1:1/", 5, threads=2)
    assert argv == [
        "wrk", "-t", "2", "-c", "50", "-d", "5s", "--latency",
        "-H", "Connection: close", "https://127.0.0.1:1/",
    ]  # fmt: skip
    h1 = sc.Load("h2load", connections=50, h1=True)
    argv = loadgen.h2load_argv(h1, "https://127.0.0.1:1/", seconds=5, log_file="/t")
    assert argv == [
        "h2load", "-t", "1", "-c", "50", "-m", "1", "--h1", "-D", "5", "--log-file=/t",
        "https://127.0.0.1:1/",
    ]  # fmt: skip


# --------------------------------------------------------------------------- report


def _run(target: str, round_no: int, rps: float, p99: float = 1.0, cpu: float = 20.0) -> RunResult:
    return RunResult("s", target, round_no, rps, 0.5, p99, int(rps), 0, {}, 0.0, 90.0, cpu)


def test_medians_and_ratios_round_by_round() -> None:
    results = [
        _run("nginx", 1, 100.0), _run("tdproxy", 1, 60.0, p99=2.0, cpu=40.0),
        _run("nginx", 2, 80.0), _run("tdproxy", 2, 60.0, p99=2.0, cpu=40.0),
        _run("nginx", 3, 120.0), _run("tdproxy", 3, 90.0, p99=3.0, cpu=30.0),
    ]  # fmt: skip
    summary = report.summarize(results, ["nginx", "tdproxy"])
    assert [s.requests_per_s for s in summary] == [100.0, 60.0]
    scenario = sc.build_scenarios()["keepalive"]
    (vs_nginx,) = report.compare(scenario, summary, results)  # no HAProxy rows: no ratio
    assert vs_nginx.requests_per_s == pytest.approx(0.6)
    assert vs_nginx.round_median == pytest.approx(0.75)
    assert vs_nginx.round_min == pytest.approx(0.6)
    assert vs_nginx.p99 == pytest.approx(2.0)
    assert vs_nginx.cpu_per_request == pytest.approx(2.0)


def _summary(target: str, rps: float, cpu: float = 20.0) -> report.Summary:
    return report.Summary(target, rps, 0.5, 1.0, 0, 0, 0.0, cpu)


@pytest.mark.parametrize(("h2", "verdict"), [(99.0, "stays false"), (101.0, "may default")])
def test_the_http2_rule_is_printed_with_its_ratio(h2: float, verdict: str) -> None:
    lines = report.verdicts("h2", [_summary("tdproxy", h2), _summary("tdproxy-h1", 100.0)], {})
    assert len(lines) == 1 and f"= {h2 / 100:.2f}" in lines[0] and verdict in lines[0]


def test_access_log_cost_is_judged_against_ten_percent() -> None:
    rows = [_summary("tdproxy", 100.0, 30.0), _summary("tdproxy-log", 73.0, 36.0)]
    (line,) = report.verdicts("accesslog", rows, {})
    assert "costs 27.0 % of req/s" in line and "+20.0 %" in line
    assert "req/s NOT met, CPU per request NOT met" in line
    rows = [_summary("tdproxy", 100.0, 30.0), _summary("tdproxy-log", 95.0, 33.6)]
    (line,) = report.verdicts("accesslog", rows, {})
    assert "req/s met, CPU per request NOT met" in line


def test_workers_share_or_why_there_is_none() -> None:
    rows = [_summary("nginx-w1", 100.0), _summary("nginx-w2", 150.0)]
    rows += [_summary("tdproxy-w1", 60.0), _summary("tdproxy-w2", 88.0)]
    lines = report.verdicts("workers", rows, {})
    assert "gain from 1 to 2 workers is 0.93 of nginx's (by medians" in lines[0]
    assert "met)" in lines[0] and "NOT" not in lines[0]
    gains = [
        report.Compared("n", "nginx-w2", "nginx-w1", 1.5, 1.0, 1.0, 1.2, 1.1),
        report.Compared("t", "tdproxy-w2", "tdproxy-w1", 1.45, 1.0, 1.0, 1.1, 1.0),
    ]
    lines = report.verdicts("workers", rows, {}, {}, gains)
    assert "is 0.50 of nginx's (by the round-by-round gains; by medians 0.93" in lines[0]
    assert "NOT met" in lines[0]
    unsupported = {"tdproxy-w2": "not supported by this build"}
    lines = report.verdicts("workers", rows[:3], {}, unsupported)
    assert lines[0] == "tdproxy with 2 workers: not supported by this build"


def test_a_shared_machine_is_flagged() -> None:
    assert report.flag_shared(3.0) is None
    assert "rerun on an idle machine" in str(report.flag_shared(40.0))
