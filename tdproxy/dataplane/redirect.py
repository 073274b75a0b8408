"""The optional plain-HTTP port that sends every request to the HTTPS entrypoint."""

from __future__ import annotations

import logging

from aiohttp import web

log = logging.getLogger("tdproxy.entrypoint")


def https_location(host: str, path_qs: str, https_port: int) -> str:
    """``https://`` + the request's host name + its target.

    The port: a client that reached the default port 80 (no port in ``Host``, or ``:80``) is
    sent to the default HTTPS port 443 too; that also holds behind a port mapping such as
    ``80 -> 8080``, ``443 -> 8443``. A client that named another port reached tdproxy's ports as
    they are, so it is sent to the entrypoint's own port."""
    if host.endswith("]") or ":" not in host:
        name, named_port = host, False  # no port (an IPv6 literal ends with "]")
    else:
        name, given = host.rsplit(":", 1)
        named_port = given != "80"
    if not name:
        name = "localhost"
    port = "" if not named_port or https_port == 443 else f":{https_port}"
    return f"https://{name}{port}{path_qs}"


class RedirectServer:
    def __init__(
        self, address: str, port: int, https_port: int, *, reuse_port: bool = False
    ) -> None:
        self.reuse_port = reuse_port  # worker processes each listen on the same port
        self.address = address
        self.port = port
        self.https_port = https_port
        self._runner: web.AppRunner | None = None

    async def _redirect(self, request: web.Request) -> web.Response:
        location = https_location(request.host, request.path_qs, self.https_port)
        # 301 is what browsers expect for GET/HEAD; 308 keeps the method and body for others.
        status = 301 if request.method in ("GET", "HEAD") else 308
        return web.Response(status=status, headers={"Location": location}, text=location + "\n")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._redirect)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, self.address, self.port, reuse_port=self.reuse_port or None
        )
        await site.start()
        log.info("redirecting http://%s:%d to https", self.address, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
