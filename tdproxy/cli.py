"""Command line: ``tdproxy run``, ``tdproxy check``, ``tdproxy demo``, ``tdproxy demo-backend``."""

from __future__ import annotations

import argparse
import asyncio
import sys

from tdproxy import __version__
from tdproxy.config.loader import (
    ConfigError,
    parse_config_text,
    read_config_text,
    resolve_path,
)
from tdproxy.config.model import Config
from tdproxy.controlplane.signals import EarlySignals, ignore_all
from tdproxy.observability import log_output

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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check":
        return _check(resolve_path(args.config))
    if args.command == "run":
        return _run(resolve_path(args.config))
    from tdproxy import demo

    if args.command == "demo":
        return demo.run_demo(args.host, args.port, args.admin_port, args.config_out)
    return demo.run_backend(args.name, args.host, args.port)


async def _serve(config: Config, path: str, text: str, early: EarlySignals) -> None:
    from tdproxy.app import App

    await App(config, path, text).serve(early.received)


def load_and_build(path: str) -> tuple[str, Config]:
    """Read, parse and validate the file, and build its routing table once, as a reload does:
    every failure, expected or not, is a :class:`ConfigError` that says what went wrong."""
    from tdproxy.dataplane.endpoints import Endpoints
    from tdproxy.routing.router import Router

    text = read_config_text(path)
    config = parse_config_text(text, path)
    try:
        Router(config, Endpoints())
    except Exception as exc:
        raise ConfigError(path, [f"cannot build the routing table: {exc}"]) from None
    return text, config


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
