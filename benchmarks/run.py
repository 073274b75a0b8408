#!/usr/bin/env python3
"""Benchmark tdproxy side by side with nginx and HAProxy, scenario by scenario.

Each scenario (small responses over 50 or 1,000 keep-alive connections, a new connection per
request, 1 MiB responses, TLS, a TLS handshake per request, the access log, 1 vs 2 workers,
HTTP/2) measures its variants - the backend nginx hit directly, nginx and HAProxy as weighted
proxies, tdproxy - with wrk or h2load in alternating rounds, and prints medians and ratios. Then
tdproxy's RSS is read with many idle keep-alive client connections open.
Stdlib only; run as ``python3 benchmarks/run.py --help``. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import report
import scenarios as sc
from idle import (
    IdleResult,
    Profile,
    format_idle,
    format_profile,
    idle_connection_test,
    profile_tdproxy,
    rss_kib,
)
from measure import Endpoint, RunResult, check_serves, cpu_busy_percent, describe, run_load
from processes import Children, tdproxy_source
from servers import (
    REPO_ROOT,
    Backend,
    BenchmarkError,
    Certificate,
    Unsupported,
    make_certificate,
    nginx_version,
    start_backend,
    start_server,
    tdproxy_env,
    tls_resumes,
)

NOFILE_WANTED = 65536
STOP_TIMEOUT = 5.0
# Debian packages for the tools, by the command that must be on PATH.
PACKAGES = {
    "nginx": "nginx-light",
    "wrk": "wrk",
    "haproxy": "haproxy",
    "h2load": "nghttp2-client",
    "openssl": "openssl",
}


def log(message: str) -> None:
    print(message, flush=True)


# --------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scenarios",
        default=",".join(sc.SCENARIO_KEYS),
        help=f"comma-separated subset of {','.join(sc.SCENARIO_KEYS)} (default: all)",
    )
    parser.add_argument("-t", "--threads", type=int, default=1, help="wrk threads (default 1)")
    parser.add_argument(
        "-c", "--connections", type=int, default=50, help="keep-alive connections (default 50)"
    )
    parser.add_argument("-d", "--duration", type=int, default=5, help="seconds per measured run")
    parser.add_argument("-r", "--rounds", type=int, default=3, help="rounds over all variants")
    parser.add_argument("--warmup", type=int, default=1, help="unrecorded seconds per variant")
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s, 1 s warm-up")
    parser.add_argument(
        "--targets",
        default=",".join(sc.KINDS),
        help=f"comma-separated subset of {','.join(sc.KINDS)} (default: all)",
    )
    parser.add_argument(
        "--tls-key",
        choices=("rsa", "ec"),
        default="rsa",
        help="key of the throwaway certificate: RSA 2048 or ECDSA P-256",
    )
    parser.add_argument(
        "--idle-connections", type=int, default=10000, help="for the RSS test (0 = skip)"
    )
    parser.add_argument(
        "--profile-seconds",
        type=int,
        default=0,
        help="also profile tdproxy under wrk load with py-spy for this long (0 = off)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="also write the results as Markdown")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 2, 1
    if min(args.rounds, args.duration, args.connections, args.threads) < 1 or args.warmup < 0:
        parser.error("--rounds, --duration, --connections and --threads must be at least 1")
    try:
        args.scenarios = sc.parse_scenarios(args.scenarios)
    except ValueError as exc:
        parser.error(f"--scenarios: {exc}")
    args.targets = _parse_targets(parser, args.targets)
    return args


def _parse_targets(parser: argparse.ArgumentParser, value: str) -> list[str]:
    wanted = [t.strip() for t in value.split(",") if t.strip()]
    unknown = sorted(set(wanted) - set(sc.KINDS))
    if unknown or not wanted:
        parser.error(f"--targets: unknown {unknown}; choose from {', '.join(sc.KINDS)}")
    return [t for t in sc.KINDS if t in wanted]


def planned_scenarios(args: argparse.Namespace) -> list[sc.Scenario]:
    built = sc.build_scenarios(args.connections)
    chosen = [sc.select_variants(built[key], args.targets) for key in args.scenarios]
    return [s for s in chosen if s.variants]


# --------------------------------------------------------------------------- tools


def _on_path(command: str) -> bool:
    if not shutil.which(command) and Path(f"/usr/sbin/{command}").exists():
        os.environ["PATH"] += f"{os.pathsep}/usr/sbin"  # not on PATH for non-root users
    return shutil.which(command) is not None


def _apt_get(*argv: str) -> bool:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        return subprocess.run(["apt-get", *argv], env=env, check=False).returncode == 0
    except OSError as exc:
        raise BenchmarkError(f"apt-get is not available ({exc}): install the tools") from exc


def needed_commands(plan: list[sc.Scenario]) -> list[str]:
    variants = [v for s in plan for v in s.variants]
    needed = {"nginx", "openssl"}  # the backend always runs, and always has its TLS ports
    needed |= {v.load.tool for v in variants}
    needed |= {"haproxy" for v in variants if v.kind == "haproxy"}
    return [c for c in PACKAGES if c in needed]


def ensure_tools(commands: list[str]) -> None:
    """Install the missing tools from Debian's packages."""
    missing = [c for c in commands if not _on_path(c)]
    if not missing:
        return
    packages = [PACKAGES[c] for c in missing]
    log(f"{', '.join(missing)} missing: installing the Debian packages {', '.join(packages)}")
    install = ("install", "-y", "--no-install-recommends", *packages)
    if not _apt_get(*install):
        log("apt-get install failed: running apt-get update, then retrying")
        if not (_apt_get("update") and _apt_get(*install)):
            raise BenchmarkError(f"apt-get could not install {' '.join(packages)} (run as root?)")
    still = [c for c in missing if not _on_path(c)]
    if still:
        raise BenchmarkError(f"{', '.join(still)} still not on PATH after apt-get install")


def ensure_py_spy() -> str:
    found = shutil.which("py-spy")
    if found:
        return found
    log("py-spy missing: pip install py-spy")
    subprocess.run([sys.executable, "-m", "pip", "install", "py-spy"], check=True)
    found = shutil.which("py-spy")
    if not found:
        raise BenchmarkError("py-spy still not on PATH after pip install")
    return found


def check_tdproxy_importable() -> None:
    code = (
        "import importlib.util, sys, tdproxy.cli, tdproxy.app\n"
        "sys.exit(0 if importlib.util.find_spec('tdproxy.__main__') else 3)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=tdproxy_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode == 3:
        raise BenchmarkError("tdproxy/__main__.py is missing: `python3 -m tdproxy` cannot run")
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-6:])
        raise BenchmarkError(
            f"tdproxy is not importable yet (`import tdproxy.cli, tdproxy.app` failed):\n{tail}\n"
            "Run with --targets backend,nginx,haproxy to benchmark the others alone."
        )


def raise_nofile_limit() -> int:
    """Raise RLIMIT_NOFILE for this process and so for every child it starts."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < NOFILE_WANTED:
        try:  # root may raise the hard limit too
            resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE_WANTED, NOFILE_WANTED))
            return NOFILE_WANTED
        except (ValueError, OSError):
            pass
    target = NOFILE_WANTED if hard == resource.RLIM_INFINITY else min(hard, NOFILE_WANTED)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def check_machine_idle() -> float:
    busy = cpu_busy_percent()
    if busy > 10.0:
        log(f"!! warning: the CPUs are already {busy:.0f}% busy; results will be noisy")
    return busy


# --------------------------------------------------------------------------- machine


def _output(argv: list[str]) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError as exc:
        return f"unavailable ({exc})"
    return (result.stdout + result.stderr).strip()


def _first_line(argv: list[str]) -> str:
    text = _output(argv)
    return text.splitlines()[0] if text else "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_description(commands: list[str]) -> dict[str, str]:
    versions = {
        "nginx": ["nginx", "-v"],
        "haproxy": ["haproxy", "-v"],
        "wrk": ["wrk", "-v"],
        "h2load": ["h2load", "--version"],
        "openssl": ["openssl", "version"],
    }
    machine = {
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
    }
    machine |= {c: _first_line(argv) for c, argv in versions.items() if c in commands}
    machine["tdproxy"] = tdproxy_source()
    machine["note"] = "the load generator, the backend and the proxy under test share these cores"
    return machine


def format_machine(machine: dict[str, str]) -> str:
    return "\n".join(f"  {key:<8} {value}" for key, value in machine.items())


# --------------------------------------------------------------------------- one scenario


@dataclasses.dataclass
class Rig:
    """What every scenario shares: the backend, the certificate, the children to account."""

    args: argparse.Namespace
    children: Children
    tmp: Path
    backend: Backend
    cert: Certificate
    nginx_v: str


def start_endpoints(
    rig: Rig, scenario: sc.Scenario, children: Children
) -> tuple[list[Endpoint], dict[str, str]]:
    """Start the scenario's servers; the variants whose server cannot run here are returned
    with the reason instead."""
    running, unsupported = {}, {}
    tmp = rig.tmp / scenario.key  # configs and logs of this scenario's servers
    tmp.mkdir(mode=0o755)
    for server in scenario.servers():
        try:
            running[server.key] = start_server(
                children, tmp, server, rig.backend, rig.cert, rig.nginx_v
            )
        except Unsupported as exc:
            unsupported[server.key] = str(exc)
    endpoints, skipped = [], {}
    for v in scenario.variants:
        if v.kind == "backend":
            endpoints.append(Endpoint(v, rig.backend.child, rig.backend.port_for(v.server)))
        elif v.server.key in running:
            endpoints.append(Endpoint(v, running[v.server.key].child, running[v.server.key].port))
        else:
            skipped[v.name] = unsupported[v.server.key]
    return endpoints, skipped


def run_rounds(
    rig: Rig, key: str, endpoints: list[Endpoint], ours: frozenset[int]
) -> list[RunResult]:
    args = rig.args
    if args.warmup > 0:
        for e in endpoints:
            log(f"warm-up: {e.variant.name} ({args.warmup} s)")
            run_load(e, key, args.warmup, 0, ours, args.threads)
    results = []
    for round_no in range(1, args.rounds + 1):
        for e in endpoints:
            result = run_load(e, key, args.duration, round_no, ours, args.threads)
            log(f"{key} round {round_no}/{args.rounds}: {e.variant.name:<11} {describe(result)}")
            results.append(result)
    return results


def measure_scenario(rig: Rig, scenario: sc.Scenario) -> tuple[sc.Scenario, dict[str, Any]]:
    """Run one scenario; returns what the report needs (and the keep-alive tdproxy's extras)."""
    log(f"\n=== {scenario.key}: {scenario.title}")
    children = Children(STOP_TIMEOUT, log)
    state: dict[str, Any] = {"results": [], "unsupported": {}, "extras": {}, "error": None}
    try:
        endpoints, state["unsupported"] = start_endpoints(rig, scenario, children)
        for name, why in state["unsupported"].items():
            log(f"{name}: {why}")
        for e in endpoints:
            check_serves(e)
            log(
                f"{e.variant.name}: serves ({e.variant.load.describe()}), pid "
                f"{e.child.proc.pid}, port {e.port}"
            )
        if scenario.key == "tls-handshake":
            state["extras"]["tls_resumption"] = {
                e.variant.name: tls_resumes(e.port) for e in endpoints
            }
        ours = rig.children.sessions() | children.sessions()
        state["results"] = run_rounds(rig, scenario.key, endpoints, ours)
        if scenario.key == "keepalive":
            state["extras"] |= tdproxy_extras(rig, endpoints, children)
    except BenchmarkError as exc:
        log(f"!! {scenario.key}: {exc}")
        state["error"] = str(exc).splitlines()[0]
    finally:
        children.stop_all()
    return scenario, state


def tdproxy_extras(rig: Rig, endpoints: list[Endpoint], children: Children) -> dict[str, Any]:
    """RSS at start, with many idle connections, and the optional profile (keep-alive only)."""
    endpoint = next((e for e in endpoints if e.variant.kind == "tdproxy"), None)
    if endpoint is None:
        return {}
    extras: dict[str, Any] = {"tdproxy_rss_kib": rss_kib(endpoint.child)}
    if rig.args.idle_connections > 0:
        idle = idle_connection_test(endpoint.child, endpoint.port, rig.args.idle_connections, log)
        extras["idle"] = dataclasses.asdict(idle)
    if rig.args.profile_seconds > 0:
        profile = profile_tdproxy(
            ensure_py_spy(), children, endpoint, rig.tmp, rig.args.profile_seconds, log
        )
        extras["profile"] = dataclasses.asdict(profile)
    return extras


def scenario_report(scenario: sc.Scenario, state: dict[str, Any]) -> report.ScenarioReport:
    names = [v.name for v in scenario.variants]
    summary = report.summarize(state["results"], names)
    compared = report.compare(scenario, summary, state["results"])
    return report.ScenarioReport(
        key=scenario.key,
        title=scenario.title,
        note=scenario.note,
        loads={v.name: v.load.describe() for v in scenario.variants},
        unsupported=state["unsupported"],
        rounds=state["results"],
        summary=summary,
        compared=compared,
        verdicts=report.verdicts(
            scenario.key, summary, state["extras"], state["unsupported"], compared
        ),
        extras=state["extras"],
        error=state["error"],
    )


# --------------------------------------------------------------------------- the whole run


def format_plan(plan: list[sc.Scenario], args: argparse.Namespace) -> str:
    extra = 15.0 + (10.0 if args.idle_connections else 0.0) + args.profile_seconds
    seconds = sc.planned_seconds(plan, args.rounds, args.duration, args.warmup, extra)
    runs = sum(len(s.variants) for s in plan)
    lines = [
        f"plan: {len(plan)} scenario(s), {runs} variants x ({args.rounds} round(s) of "
        f"{args.duration} s + {args.warmup} s warm-up): about {seconds / 60:.0f} min "
        f"({seconds:.0f} s)"
    ]
    lines += [f"  {s.key}: {', '.join(v.name for v in s.variants)}" for s in plan]
    return "\n".join(lines)


def report_text(rep: dict[str, Any], reports: list[report.ScenarioReport]) -> str:
    lines = [
        "machine:",
        format_machine(rep["machine"]),
        f"CPU busy before the run (other processes): {rep['cpu_busy_before_percent']}%",
        f"settings: {rep['settings']['rounds']} round(s) x {rep['settings']['duration_s']} s, "
        f"{rep['settings']['warmup_s']} s warm-up, certificate {rep['settings']['tls_key']}",
    ]
    shared = report.flag_shared(rep["other_cpu_max_percent"])
    if shared:
        lines.append(shared)
    lines += [report.format_scenario(r, rep["settings"]["rounds"]) for r in reports]
    keepalive = next((r for r in reports if r.key == "keepalive"), None)
    if keepalive and keepalive.extras.get("tdproxy_rss_kib"):
        lines.append(
            f"tdproxy RSS: {keepalive.extras['tdproxy_rss_kib'] / 1024:.1f} MiB "
            "after the keep-alive rounds"
        )
    if keepalive and keepalive.extras.get("idle"):
        lines.append(format_idle(IdleResult(**keepalive.extras["idle"])))
    lines.append(report.format_overview(reports))
    return "\n".join(lines)


def report_markdown(rep: dict[str, Any], reports: list[report.ScenarioReport]) -> str:
    parts = [
        f"# tdproxy benchmark results\n\nRun {rep['date']} with `python3 benchmarks/run.py "
        f"{rep['settings']['argv']}`.\n",
        report.markdown_overview(reports) + "\n",
        f"```\n{report_text(rep, reports)}\n```\n",
        "## Every round\n\n```",
        *(line for r in reports for line in report.format_rounds(r)),
        "```\n",
    ]
    keepalive = next((r for r in reports if r.key == "keepalive"), None)
    if keepalive and keepalive.extras.get("profile"):
        profile = Profile(**keepalive.extras["profile"])
        parts.append(f"## Profile\n\n```\n{format_profile(profile)}\n```\n")
    return "\n".join(parts)


@contextmanager
def sigterm_as_exit() -> Iterator[None]:
    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def benchmark(
    args: argparse.Namespace,
    plan: list[sc.Scenario],
    commands: list[str],
    children: Children,
    tmp: Path,
) -> tuple[dict[str, Any], list[report.ScenarioReport]]:
    busy_before = check_machine_idle()
    nginx_v = subprocess.run(["nginx", "-V"], capture_output=True, text=True).stderr
    cert = make_certificate(tmp / "certificate", args.tls_key)
    backend = start_backend(children, tmp, cert, nginx_version(nginx_v))
    log(
        f"backend: pid {backend.child.proc.pid}, ports {backend.port} (http), "
        f"{backend.tls_port} (https), {backend.h2_port} (h2)"
    )
    rig = Rig(args, children, tmp, backend, cert, nginx_v)
    reports = [scenario_report(*measure_scenario(rig, s)) for s in plan]
    rep = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": machine_description(commands),
        "cpu_busy_before_percent": round(busy_before, 1),
        "other_cpu_max_percent": report.shared_machine_percent(reports),
        "settings": {
            "rounds": args.rounds,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "threads": args.threads,
            "tls_key": "RSA 2048" if args.tls_key == "rsa" else "ECDSA P-256",
            "argv": " ".join(sys.argv[1:]),
        },
        "scenarios": [dataclasses.asdict(r) for r in reports],
    }
    log(f"\n=== results ===\n{report_text(rep, reports)}")
    return rep, reports


def run(args: argparse.Namespace, children: Children, tmp: Path) -> int:
    plan = planned_scenarios(args)
    if not plan:
        raise BenchmarkError("no variant left: --targets excludes every variant of --scenarios")
    log(format_plan(plan, args))
    if args.dry_run:
        return 0
    with sigterm_as_exit():
        commands = needed_commands(plan)
        ensure_tools(commands)
        if any(v.kind == "tdproxy" for s in plan for v in s.variants):
            check_tdproxy_importable()
        log(f"RLIMIT_NOFILE raised to {raise_nofile_limit()} (inherited by the children)")
        rep, reports = benchmark(args, plan, commands, children, tmp)
        if args.json:
            Path(args.json).write_text(json.dumps(rep, indent=2) + "\n")
            log(f"wrote {args.json}")
        if args.markdown:
            Path(args.markdown).write_text(report_markdown(rep, reports))
            log(f"wrote {args.markdown}")
    failed = [r.key for r in reports if r.error]
    if failed:
        log(f"!! scenario(s) that stopped with an error: {', '.join(failed)}")
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    children = Children(STOP_TIMEOUT, log)
    tmp = Path(tempfile.mkdtemp(prefix="tdbench-"))
    tmp.chmod(0o755)  # nginx workers run as nobody when started by root
    code = 1
    try:
        code = run(args, children, tmp)
    except BenchmarkError as exc:
        log(f"error: {exc}")
    except KeyboardInterrupt:
        log("interrupted")
        code = 130
    finally:
        children.stop_all()
        if args.keep_tmp or code != 0:
            log(f"logs and configs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
