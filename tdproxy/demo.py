"""``tdproxy demo``: two small demo environments (blue and green) behind the distributor."""

from __future__ import annotations

import asyncio
import html
import os
import signal
import socket

from aiohttp import web

from tdproxy.app import App, install_event_loop_policy, setup_logging
from tdproxy.config.loader import parse_config
from tdproxy.observability import log_output

_COLORS = {"blue": "#1f6feb", "green": "#2da44e"}

_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{name} environment</title>
<style>body{{font-family:sans-serif;background:{color};color:white;text-align:center;
padding-top:15vh}}h1{{font-size:4em;margin:0}}</style></head>
<body><h1>{name}</h1><p>You are served by the <b>{name}</b> environment (pid {pid}).</p>
<p>Reload the page: tdproxy splits requests between the environments by weight.</p>
</body></html>
"""


def demo_backend_app(name: str) -> web.Application:
    color = _COLORS.get(name, "#6e7781")
    page = _PAGE.format(name=html.escape(name), color=color, pid=os.getpid())

    async def index(request: web.Request) -> web.Response:
        if "text/html" in request.headers.get("Accept", ""):
            return web.Response(text=page, content_type="text/html", headers={"X-Env": name})
        return web.Response(text=f"hello from {name}\n", headers={"X-Env": name})

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_route("*", "/{tail:.*}", index)
    return app


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


async def _start_backend(name: str, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(demo_backend_app(name), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


async def _demo(host: str, port: int, admin_port: int) -> None:
    ports = {name: _free_port(host) for name in ("blue", "green")}
    runners = [await _start_backend(name, host, p) for name, p in ports.items()]
    config = parse_config(
        {
            "entrypoint": {"address": host, "port": port},
            "backends": [
                {"name": name, "url": f"http://{host}:{p}", "weight": 50}
                for name, p in ports.items()
            ],
            "health_check": {"path": "/health"},
            "admin": {"address": host, "port": admin_port},
            "timeouts": {"shutdown_grace": "5s"},
        },
        "<demo>",
    )
    app = App(config)
    try:
        await app.start()
        print(f"tdproxy demo: blue on :{ports['blue']}, green on :{ports['green']}, 50/50")
        print(f"  entrypoint:  http://{host}:{port}/   (try: curl http://{host}:{port}/)")
        print(f"  status page: http://{host}:{admin_port}/status")
        print("Press Ctrl-C to stop.", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await app.stop()
        for runner in runners:
            await runner.cleanup()


def run_demo(host: str, port: int, admin_port: int) -> int:
    setup_logging()
    install_event_loop_policy()
    try:
        asyncio.run(_demo(host, port, admin_port))
    except OSError as exc:
        print(f"tdproxy demo: cannot start: {exc}")
        return 1
    finally:
        log_output.close_all()
    return 0


def run_backend(name: str, host: str, port: int) -> int:
    install_event_loop_policy()
    web.run_app(demo_backend_app(name), host=host, port=port, print=None, access_log=None)
    return 0
