"""Command line: ``tdproxy run``, ``check``, ``weights``, ``rollout``, ``demo``,
``demo-backend``."""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
from typing import Any

from tdproxy import __version__, weights
from tdproxy.config.loader import ConfigError, resolve_path
from tdproxy.config.model import Config
from tdproxy.config.writer import NotWritable
from tdproxy.config.yaml_edit import EditError
from tdproxy.controlplane import status_client
from tdproxy.controlplane.signals import EarlySignals, ignore_all
from tdproxy.observability import log_output
from tdproxy.weights_file import WeightEdit, check_text, load_and_build, prepare_weights

__all__ = ["check_text", "load_and_build", "main"]

EXIT_CANNOT_WRITE = 1
EXIT_INVALID_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tdproxy", description="Traffic Distributor: a weighted HTTP reverse proxy."
    )
    parser.add_argument("--version", action="version", version=f"tdproxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    config_help = "config file (default: $TDPROXY_CONFIG, else config/tdproxy.yaml)"
    run = commands.add_parser("run", help="run the distributor")
    run.add_argument("--config", "-c", help=config_help)
    check = commands.add_parser("check", help="validate a config file and exit")
    check.add_argument("--config", "-c", help=config_help)
    _add_weights(commands, config_help)
    _add_rollout(commands, config_help)
    demo = commands.add_parser("demo", help="two demo environments behind the distributor")
    demo.add_argument("--port", type=int, default=8080, help="entrypoint port (default 8080)")
    demo.add_argument("--admin-port", type=int, default=9901, help="admin port (default 9901)")
    demo.add_argument("--host", default="127.0.0.1", help="address to listen on")
    demo.add_argument(
        "--config-out",
        metavar="PATH",
        help="write the demo's (live) config here (default: a new temporary directory)",
    )
    backend = commands.add_parser("demo-backend", help="one demo environment on its own")
    backend.add_argument("--name", default="blue")
    backend.add_argument("--host", default="0.0.0.0")
    backend.add_argument("--port", type=int, default=8081)
    return parser


def _add_weights(commands: Any, config_help: str) -> None:
    weights = commands.add_parser(
        "weights", help="show the backends' weights and shares, or change them in the file"
    )
    weights.add_argument("--config", "-c", help=config_help)
    actions = weights.add_subparsers(dest="action", metavar="{set,swap}")
    change = actions.add_parser("set", help="set weights: NAME=W [NAME=W ...]")
    change.add_argument("assignments", nargs="+", metavar="NAME=W")
    swap = actions.add_parser("swap", help="exchange the weights of the two non-backup backends")
    for sub in (change, swap):  # SUPPRESS: an absent --config must not hide the parent's
        sub.add_argument("--config", "-c", help=config_help, default=argparse.SUPPRESS)


def _add_rollout(commands: Any, config_help: str) -> None:
    rollout = commands.add_parser(
        "rollout",
        help="move traffic to one backend step by step, judged on the proxy's metrics",
        description="Move traffic to --to in --steps, each held for --interval and judged on "
        "the running proxies' own metrics for it; roll back to the weights before the first "
        "step on failure. Exit 0 promoted, 3 rolled back, 2 invalid, 1 cannot write the file, "
        "130/143 interrupted (rolled back).",
    )
    rollout.add_argument("--to", required=True, metavar="NAME", help="the backend to promote")
    rollout.add_argument(
        "--from",
        dest="sources",
        action="append",
        metavar="NAME",
        help="a backend to take traffic from (repeatable; default: every other non-backup one)",
    )
    rollout.add_argument(
        "--steps", required=True, help="to's percentage at each step, ending at 100: 5,25,50,100"
    )
    rollout.add_argument("--interval", required=True, help="how long each step lasts: 2m, 30s")
    rollout.add_argument(
        "--max-error-rate", default="0.01", help="a step over this fails (default 0.01 = 1%%)"
    )
    rollout.add_argument(
        "--max-p99", default="800ms", help="a step with a slower p99 fails; off: not judged"
    )
    rollout.add_argument(
        "--min-requests",
        type=int,
        default=100,
        help="requests a step needs to be judged (default 100); fewer extend it",
    )
    rollout.add_argument("--config", "-c", help=config_help)
    rollout.add_argument(
        "--admin",
        action="append",
        metavar="URL",
        help="a proxy's admin url (repeatable, metrics summed; default: the config's admin)",
    )
    rollout.add_argument("--token", help="admin token (default: the config's admin token)")
    rollout.add_argument(
        "--dry-run", action="store_true", help="print the plan and exit; nothing written or asked"
    )
    rollout.add_argument("--json", action="store_true", help="one JSON object per event line")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check":
        return _check(resolve_path(args.config))
    if args.command == "weights":
        return _weights(args)
    if args.command == "rollout":
        from tdproxy.rollout import runner

        return runner.main(args)
    if args.command == "run":
        return _run(resolve_path(args.config))
    from tdproxy import demo

    if args.command == "demo":
        return demo.run_demo(args.host, args.port, args.admin_port, args.config_out)
    return demo.run_backend(args.name, args.host, args.port)


async def _serve(config: Config, path: str, text: str, early: EarlySignals) -> None:
    from tdproxy.app import App

    workers = worker_count(config)
    if workers == 1:
        await App(config, path, text).serve(early.received)
        return
    from tdproxy.workers.supervisor import Supervisor

    await Supervisor(config, workers, path, text).serve(early.received)


def worker_count(config: Config) -> int:
    """``workers`` as a number: ``auto`` is the CPUs this process may use."""
    if config.workers == "auto":
        from tdproxy.workers.cpus import available_cpus

        return available_cpus()
    return config.workers


def _check(path: str) -> int:
    try:
        _, config = load_and_build(path)
    except ConfigError as exc:
        print(exc.describe(), file=sys.stderr)
        return EXIT_INVALID_CONFIG
    names = ", ".join(f"{b.name} ({b.weight})" for b in config.backends)
    print(f"{path}: valid - {config.routing.method} over {names}")
    return 0


def _run(path: str) -> int:
    from tdproxy.app import install_event_loop_policy, setup_logging

    early = EarlySignals()
    early.install()  # before anything else: no signal may meet Python's defaults
    setup_logging()
    try:
        text, config = load_and_build(path)
    except ConfigError as exc:
        print(exc.describe(), file=sys.stderr)
        return EXIT_INVALID_CONFIG
    install_event_loop_policy()
    try:
        asyncio.run(_serve(config, path, text, early))
    except OSError as exc:
        log_output.close_all()
        print(f"tdproxy: cannot start: {exc}", file=sys.stderr)
        return 1
    finally:
        ignore_all()
    log_output.close_all()
    return 0


# -- tdproxy weights ----------------------------------------------------------------------------


def _weights(args: argparse.Namespace) -> int:
    path = resolve_path(args.config)
    try:
        text, config = load_and_build(path)
        if args.action is None:
            print("\n".join(weights.show_lines(config)))
            return 0
        if args.action == "swap":
            new = weights.swapped(config)
        else:
            new = weights.parse_assignments(args.assignments, config)
        edit = prepare_weights(path, new, text=text, config=config)
    except ConfigError as exc:
        print(exc.describe(), file=sys.stderr)
        return EXIT_INVALID_CONFIG
    except (weights.WeightsError, EditError) as exc:
        print(f"{path}: {exc}; the file is unchanged", file=sys.stderr)
        return EXIT_INVALID_CONFIG
    return _write_weights(args, edit)


def _write_weights(args: argparse.Namespace, edit: WeightEdit) -> int:
    lines = "\n".join(weights.change_lines(edit.config, edit.new))
    if not edit.changed:
        print(lines + "\nno change: the file is left as it is")
        return 0
    url = status_client.status_url(edit.config.admin)
    before = status_client.fetch_status(url) if url else None
    try:
        edit.write()
    except NotWritable as exc:
        _explain_not_writable(args, exc)
        return EXIT_CANNOT_WRITE
    print(lines)
    _report_proxy(url, before, edit.after)
    return 0


def _explain_not_writable(args: argparse.Namespace, exc: NotWritable) -> None:
    words = ["tdproxy", "weights", args.action, *getattr(args, "assignments", [])]
    hint = weights.configmap_hint(
        os.path.basename(exc.path), shlex.join(words), certain=exc.configmap
    )
    print("\n".join([f"tdproxy: {exc}; nothing was written.", *hint]), file=sys.stderr)


def _report_proxy(url: str | None, before: dict[str, Any] | None, new: dict[str, int]) -> None:
    if url is None or before is None:
        where = f" at {url.removesuffix('/api/v1/status')}" if url else ""
        print(
            f"no tdproxy answers{where}: a running tdproxy applies the file by itself "
            "once it has been unchanged for 1 s"
        )
        return
    document = status_client.wait_for_weights(url, int(before["generation"]), new)
    if document is not None:
        print(f"applied by the running proxy (generation {document['generation']})")
    else:
        print(
            f"the proxy at {url} has not reported the new weights within "
            f"{status_client.WAIT_SECONDS:.0f} s (it may run another file): see its log"
        )
