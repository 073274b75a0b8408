"""Command line: ``tdproxy run``, ``check``, ``weights``, ``demo``, ``demo-backend``."""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
from typing import Any

from tdproxy import __version__, weights
from tdproxy.config.loader import (
    ConfigError,
    parse_config_text,
    read_config_text,
    resolve_path,
)
from tdproxy.config.model import Config
from tdproxy.config.writer import NotWritable, replace_file
from tdproxy.config.yaml_edit import EditError
from tdproxy.controlplane import status_client
from tdproxy.controlplane.signals import EarlySignals, ignore_all
from tdproxy.observability import log_output

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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check":
        return _check(resolve_path(args.config))
    if args.command == "weights":
        return _weights(args)
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


def load_and_build(path: str) -> tuple[str, Config]:
    """Read, parse and validate the file, and build its routing table once, as a reload does:
    every failure, expected or not, is a :class:`ConfigError` that says what went wrong."""
    text = read_config_text(path)
    return text, check_text(text, path)


def check_text(text: str, path: str) -> Config:
    """Parse and validate ``text`` and build its routing table once, as :func:`load_and_build`."""
    from tdproxy.dataplane.endpoints import Endpoints
    from tdproxy.routing.router import Router

    config = parse_config_text(text, path)
    try:
        Router(config, Endpoints())
    except Exception as exc:
        raise ConfigError(path, [f"cannot build the routing table: {exc}"]) from None
    return config


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
        new_text = _edit_checked(path, text, config, new)
    except ConfigError as exc:
        print(exc.describe(), file=sys.stderr)
        return EXIT_INVALID_CONFIG
    except (weights.WeightsError, EditError) as exc:
        print(f"{path}: {exc}; the file is unchanged", file=sys.stderr)
        return EXIT_INVALID_CONFIG
    return _write_weights(args, path, text, new_text, config, new)


def _edit_checked(path: str, text: str, config: Config, new: dict[str, int]) -> str:
    """The file's text with the new weights, validated as ``tdproxy check`` would."""
    new_text = weights.edited_text(text, config, new)
    try:
        after = check_text(new_text, path)
    except ConfigError as exc:
        raise weights.WeightsError(
            "the new weights would make the config invalid: " + "; ".join(exc.errors)
        ) from None
    problems = weights.side_effects(config, after, new)
    if problems:
        raise weights.WeightsError("; ".join(problems))
    return new_text


def _write_weights(
    args: argparse.Namespace,
    path: str,
    text: str,
    new_text: str,
    config: Config,
    new: dict[str, int],
) -> int:
    lines = "\n".join(weights.change_lines(config, new))
    if new_text == text:
        print(lines + "\nno change: the file is left as it is")
        return 0
    url = status_client.status_url(config.admin)
    before = status_client.fetch_status(url) if url else None
    try:
        replace_file(path, new_text)
    except NotWritable as exc:
        _explain_not_writable(args, exc)
        return EXIT_CANNOT_WRITE
    print(lines)
    _report_proxy(url, before, {**weights.weights_of(config), **new})
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
