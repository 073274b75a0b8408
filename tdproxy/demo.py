"""``tdproxy demo``: two small demo environments (blue and green) behind the distributor.

The demo's config is a real file (in a temporary directory, or where ``--config-out`` says),
served exactly as ``tdproxy run`` serves one: edit it, or change it with ``tdproxy weights``,
and the running demo picks the change up.
"""

from __future__ import annotations

import asyncio
import html
import os
import shlex
import socket
import tempfile
from pathlib import Path

from aiohttp import web

from tdproxy.app import App, install_event_loop_policy, setup_logging
from tdproxy.config.loader import ConfigError, parse_config_text
from tdproxy.controlplane.signals import EarlySignals, ignore_all
from tdproxy.observability import log_output

_COLORS = {"blue": "#1f6feb", "green": "#2da44e"}

# The inline icon keeps browsers from asking for /favicon.ico: that second request would go
# through the split too, and with 50/50 alternation every page view would land on one colour.
_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{name} environment</title>
<link rel="icon" href="data:,">
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


_CONFIG = """\
# tdproxy demo: two environments behind the distributor. This file is live: edit a weight and
# save, or run `tdproxy weights set blue=90 green=10 --config {path}`, and the running demo
# applies it within a couple of seconds.
entrypoint:
  address: {host}
  port: {port}
routing:
  method: round_robin
backends:
  - name: blue
    url: http://{host}:{blue}
    weight: 50
  - name: green
    url: http://{host}:{green}
    weight: 50
health_check:
  path: /health
admin:
  address: {host}
  port: {admin_port}
timeouts:
  shutdown_grace: 5s
"""


def demo_config_text(
    host: str, port: int, admin_port: int, ports: dict[str, int], path: str
) -> str:
    return _CONFIG.format(
        host=host,
        port=port,
        admin_port=admin_port,
        blue=ports["blue"],
        green=ports["green"],
        path=path,
    )


def _config_path(config_out: str | None) -> Path:
    if config_out:
        return Path(config_out).resolve()
    return Path(tempfile.mkdtemp(prefix="tdproxy-demo-")) / "tdproxy.yaml"


async def _demo(host: str, port: int, admin_port: int, path: Path, early: EarlySignals) -> None:
    ports = {name: _free_port(host) for name in ("blue", "green")}
    text = demo_config_text(host, port, admin_port, ports, str(path))
    config = parse_config_text(text, str(path))
    path.write_text(text, encoding="utf-8")
    runners = [await _start_backend(name, host, p) for name, p in ports.items()]
    app = App(config, str(path), text)
    quoted = shlex.quote(str(path))
    lines = [
        f"tdproxy demo: blue on :{ports['blue']}, green on :{ports['green']}, 50/50",
        f"  entrypoint:  http://{host}:{port}/   (try: curl http://{host}:{port}/)",
        f"  status page: http://{host}:{admin_port}/status",
        f"  config:      {path}   (live: edit it, or try the commands below)",
        f"    tdproxy weights --config {quoted}",
        f"    tdproxy weights set blue=90 green=10 --config {quoted}",
        f"    tdproxy weights swap --config {quoted}",
        "Press Ctrl-C to stop.",
    ]
    try:
        serving = asyncio.get_running_loop().create_task(app.serve(early.received))
        while not serving.done() and app.phase != "running":
            await asyncio.sleep(0.05)
        if app.phase == "running":
            print("\n".join(lines), flush=True)
        await serving
    finally:
        for runner in runners:
            await runner.cleanup()


def run_demo(host: str, port: int, admin_port: int, config_out: str | None = None) -> int:
    early = EarlySignals()
    early.install()  # Ctrl-C at any moment stops the demo cleanly
    setup_logging()
    install_event_loop_policy()
    path = _config_path(config_out)
    try:
        asyncio.run(_demo(host, port, admin_port, path, early))
    except (OSError, ConfigError) as exc:
        print(f"tdproxy demo: cannot start: {exc}")
        return 1
    finally:
        ignore_all()
        log_output.close_all()
    return 0


def run_backend(name: str, host: str, port: int) -> int:
    install_event_loop_policy()
    web.run_app(demo_backend_app(name), host=host, port=port, print=None, access_log=None)
    return 0
