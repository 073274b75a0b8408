"""The servers ``run.py`` measures: their configurations and how they are started.

The backend nginx is started once per run. nginx and HAProxy as proxies, and tdproxy, are
started per scenario from a :class:`scenarios.Server` and stopped when the scenario ends. Every
process is a child of the script (see ``processes.Children``) listening on a free port of
127.0.0.1. Rendering a configuration is pure (``render_*``, ``tdproxy_config``, checked by
``tests/unit/test_benchmark_servers.py``); ``start_*`` runs processes. Standard library only.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from string import Template

from processes import Child, Children
from scenarios import LARGE_PATH, LARGE_SIZE, SMALL_BODY, Server

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
HOST = "127.0.0.1"
READY_TIMEOUT = 20.0


class BenchmarkError(Exception):
    """A failure with a message meant for the person running the benchmark."""


class Unsupported(BenchmarkError):
    """The software under test cannot do what a variant needs (reported, not fatal)."""


@dataclasses.dataclass(frozen=True)
class Certificate:
    cert: Path
    key: Path
    combined: Path  # certificate then key, as HAProxy's `crt` wants it
    kind: str


@dataclasses.dataclass
class Backend:
    child: Child
    port: int  # plain HTTP
    tls_port: int  # HTTPS, HTTP/1.1 only
    h2_port: int  # HTTPS with h2 offered by ALPN

    def port_for(self, server: Server) -> int:
        if not server.tls:
            return self.port
        return self.h2_port if server.http2 else self.tls_port


@dataclasses.dataclass
class Running:
    """A started proxy: its process and the port it listens on."""

    server: Server
    child: Child
    port: int


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_for_port(child: Child, port: int, timeout: float = READY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise BenchmarkError(
                f"{child.name} exited with code {child.proc.returncode} before listening on "
                f"{HOST}:{port}; its log ({child.log_path}):\n{child.log_tail()}"
            )
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise BenchmarkError(
        f"{child.name} did not accept connections on {HOST}:{port} within {timeout:.0f} s; "
        f"its log ({child.log_path}):\n{child.log_tail()}"
    )


def make_certificate(directory: Path, kind: str = "rsa") -> Certificate:
    """A throwaway self-signed certificate for 127.0.0.1 (RSA 2048 or ECDSA P-256)."""
    directory.mkdir(mode=0o755, exist_ok=True)
    cert, key = directory / "cert.pem", directory / "key.pem"
    newkey = ["-newkey", "rsa:2048"] if kind == "rsa" else ["-newkey", "ec"]
    if kind != "rsa":
        newkey += ["-pkeyopt", "ec_paramgen_curve:P-256"]
    argv = ["openssl", "req", "-x509", *newkey, "-nodes", "-days", "2", "-subj", "/CN=tdbench"]
    argv += ["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"]
    argv += ["-keyout", str(key), "-out", str(cert)]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    except OSError as exc:
        raise BenchmarkError(f"openssl is needed for the TLS scenarios: {exc}") from exc
    if result.returncode != 0:
        raise BenchmarkError(f"openssl req failed:\n{result.stderr}")
    key.chmod(0o644)  # nginx workers run as nobody when the script runs as root
    combined = directory / "combined.pem"
    combined.write_text(cert.read_text() + key.read_text())
    return Certificate(cert, key, combined, kind)


def nginx_version(nginx_v_output: str) -> tuple[int, ...]:
    match = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", nginx_v_output)
    return tuple(int(p) for p in match.groups()) if match else (0, 0, 0)


# --------------------------------------------------------------------------- nginx


def nginx_tls_settings(cert: Certificate | None) -> str:
    if cert is None:
        return ""
    # TLS 1.3 explicitly: nginx before 1.23.4 offers only up to 1.2 by default, and every other
    # server here (HAProxy, tdproxy through Python's ssl) offers 1.3.
    return (
        f"    ssl_certificate {cert.cert};\n"
        f"    ssl_certificate_key {cert.key};\n"
        "    ssl_protocols TLSv1.2 TLSv1.3;\n"
    )


def nginx_listen(port: int, tls: bool, http2: bool, version: tuple[int, ...]) -> str:
    """The listen line(s) for a server block; ``http2 on`` from nginx 1.25.1, before that the
    ``http2`` parameter of ``listen``."""
    params = " ssl" if tls else ""
    if http2 and version < (1, 25, 1):
        return f"listen {HOST}:{port}{params} http2 backlog=4096;"
    line = f"listen {HOST}:{port}{params} backlog=4096;"
    return f"{line}\n        http2 on;" if http2 else line


# The fields of tdproxy's JSON access log line, as an nginx log_format.
NGINX_JSON_LOG = (
    "log_format tdjson escape=json '{"
    '"time":"$time_iso8601","remote":"$remote_addr","method":"$request_method",'
    '"target":"$request_uri","version":"$server_protocol","host":"$http_host",'
    '"status":$status,"bytes":$body_bytes_sent,"duration_ms":$request_time,'
    '"backend":"$upstream_addr","user_agent":"$http_user_agent"'
    "}';"
)


def nginx_access_log(prefix: Path, enabled: bool) -> str:
    if not enabled:
        return "access_log off;"
    return f"{NGINX_JSON_LOG}\n    access_log {prefix}/access.log tdjson buffer=64k flush=1s;"


def render_nginx_proxy(
    prefix: Path,
    server: Server,
    port: int,
    backend_port: int,
    cert: Certificate | None,
    version: tuple[int, ...],
) -> str:
    return Template((HERE / "nginx-proxy.conf.tmpl").read_text()).substitute(
        prefix=prefix,
        port=port,
        backend_port=backend_port,
        workers=server.workers,
        listen=nginx_listen(port, server.tls, server.http2, version),
        tls_settings=nginx_tls_settings(cert if server.tls else None),
        access_log=nginx_access_log(prefix, server.access_log),
    )


def render_backend(
    prefix: Path,
    port: int,
    tls_port: int,
    h2_port: int,
    cert: Certificate,
    version: tuple[int, ...],
) -> str:
    return Template((HERE / "nginx-backend.conf.tmpl").read_text()).substitute(
        prefix=prefix,
        port=port,
        tls_port=tls_port,
        h2_listen=nginx_listen(h2_port, True, True, version),
        tls_settings=nginx_tls_settings(cert),
    )


def _start_nginx(children: Children, prefix: Path, name: str, text: str, port: int) -> Child:
    conf = prefix / "nginx.conf"
    conf.write_text(text)
    argv = ["nginx", "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    child = children.start(name, argv, prefix / "stdout.log")
    wait_for_port(child, port)
    return child


def start_backend(
    children: Children, tmp: Path, cert: Certificate, version: tuple[int, ...]
) -> Backend:
    prefix = tmp / "backend"
    (prefix / "www").mkdir(mode=0o755, parents=True)
    large = prefix / "www" / LARGE_PATH.lstrip("/")
    large.write_bytes(os.urandom(LARGE_SIZE))
    large.chmod(0o644)
    port, tls_port, h2_port = free_port(), free_port(), free_port()
    text = render_backend(prefix, port, tls_port, h2_port, cert, version)
    child = _start_nginx(children, prefix, "backend", text, port)
    for p in (tls_port, h2_port):
        wait_for_port(child, p)
    return Backend(child, port, tls_port, h2_port)


def nginx_has_http2(nginx_v_output: str) -> bool:
    return "--with-http_v2_module" in nginx_v_output


def start_nginx_proxy(
    children: Children,
    tmp: Path,
    server: Server,
    backend: Backend,
    cert: Certificate | None,
    nginx_v: str,
) -> Running:
    if server.http2 and not nginx_has_http2(nginx_v):
        raise Unsupported("this nginx is built without the http2 module")
    prefix = tmp / server.key
    prefix.mkdir(mode=0o755)
    port = free_port()
    text = render_nginx_proxy(prefix, server, port, backend.port, cert, nginx_version(nginx_v))
    return Running(server, _start_nginx(children, prefix, server.key, text, port), port)


# --------------------------------------------------------------------------- HAProxy


def render_haproxy(
    prefix: Path, server: Server, port: int, backend_port: int, cert: Certificate | None
) -> str:
    bind = ""
    if server.tls:
        assert cert is not None
        bind = f"ssl crt {cert.combined} alpn {'h2,' if server.http2 else ''}http/1.1"
    return Template((HERE / "haproxy.cfg.tmpl").read_text()).substitute(
        prefix=prefix,
        port=port,
        backend_port=backend_port,
        bind_options=bind,
        proto="https" if server.tls else "http",
    )


def start_haproxy(
    children: Children, tmp: Path, server: Server, backend: Backend, cert: Certificate | None
) -> Running:
    prefix = tmp / server.key
    prefix.mkdir(mode=0o755)
    port = free_port()
    conf = prefix / "haproxy.cfg"
    conf.write_text(render_haproxy(prefix, server, port, backend.port, cert))
    argv = ["haproxy", "-db", "-f", str(conf)]
    child = children.start(server.key, argv, prefix / "stdout.log")
    wait_for_port(child, port)
    return Running(server, child, port)


# --------------------------------------------------------------------------- tdproxy


def tdproxy_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    pythonpath = f"{REPO_ROOT}{os.pathsep}{path}" if path else str(REPO_ROOT)
    return {**os.environ, "PYTHONPATH": pythonpath}


def tdproxy_config(
    server: Server, port: int, admin_port: int, backend_port: int, cert: Certificate | None
) -> str:
    """tdproxy's YAML: backends a and b (both the backend) at 50/50, round robin, health
    checks off (as nginx and HAProxy run without them), the access log as the server asks."""
    backends = "".join(
        f"  - name: {name}\n    url: http://{HOST}:{backend_port}\n    weight: 50\n"
        for name in ("a", "b")
    )
    text = f"workers: {server.workers}\n" if server.workers != 1 else ""
    text += f"entrypoint:\n  address: {HOST}\n  port: {port}\n"
    if server.tls:
        assert cert is not None
        text += f"  tls:\n    certificate: {cert.cert}\n    key: {cert.key}\n"
        if server.http2:
            text += "  http2: true\n"
    text += (
        "routing:\n  method: round_robin\n"
        f"backends:\n{backends}"
        "health_check:\n  enabled: false\n"
        f"admin:\n  address: {HOST}\n  port: {admin_port}\n"
        f"access_log:\n  enabled: {'true' if server.access_log else 'false'}\n"
    )
    if server.access_log:
        text += "  format: json\n"
    return text


def _config_problem(config: Path) -> str | None:
    """What `tdproxy check` says is wrong with a config (None when it is valid)."""
    argv = [sys.executable, "-m", "tdproxy", "check", "--config", str(config)]
    result = subprocess.run(
        argv, cwd=REPO_ROOT, env=tdproxy_env(), capture_output=True, text=True, check=False
    )
    if result.returncode == 0:
        return None
    return (result.stdout + result.stderr).strip() or f"exit code {result.returncode}"


def start_tdproxy(
    children: Children, tmp: Path, server: Server, backend: Backend, cert: Certificate | None
) -> Running:
    port = free_port()
    config = tmp / f"{server.key}.yaml"
    config.write_text(tdproxy_config(server, port, free_port(), backend.port, cert))
    problem = _config_problem(config)
    if problem is not None:
        if server.workers != 1 and "workers" in problem:
            first = " ".join(problem.splitlines()[-1].split())
            raise Unsupported(f"not supported by this build (tdproxy check: {first})")
        raise BenchmarkError(f"tdproxy rejects the benchmark's config {config}:\n{problem}")
    argv = [sys.executable, "-m", "tdproxy", "run", "--config", str(config)]
    log_path = tmp / f"{server.key}.log"
    child = children.start(server.key, argv, log_path, cwd=REPO_ROOT, env=tdproxy_env())
    wait_for_port(child, port)
    return Running(server, child, port)


def start_server(
    children: Children,
    tmp: Path,
    server: Server,
    backend: Backend,
    cert: Certificate | None,
    nginx_v: str,
) -> Running:
    if server.kind == "nginx":
        return start_nginx_proxy(children, tmp, server, backend, cert, nginx_v)
    if server.kind == "haproxy":
        return start_haproxy(children, tmp, server, backend, cert)
    if server.kind == "tdproxy":
        return start_tdproxy(children, tmp, server, backend, cert)
    raise ValueError(f"unknown server kind {server.kind!r}")


# --------------------------------------------------------------------------- checks


def client_tls_context() -> ssl.SSLContext:
    """For the checks: the throwaway certificate is self-signed, so no verification."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def check_http(name: str, port: int, path: str, tls: bool, close: bool, size: int) -> None:
    """One GET as the load generator sends it: a 200 with a body of ``size`` bytes."""
    url = f"{'https' if tls else 'http'}://{HOST}:{port}{path}"
    request = urllib.request.Request(url, headers={"Connection": "close"} if close else {})
    context = client_tls_context() if tls else None
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    except OSError as exc:
        raise BenchmarkError(f"{name}: GET {url} failed: {exc!r}") from exc
    if status != 200 or len(body) != size:
        raise BenchmarkError(
            f"{name}: GET {url} answered {status} with {len(body)} body bytes "
            f"{body[:60]!r}, not 200 with {size}"
        )
    if size == len(SMALL_BODY) and body != SMALL_BODY:
        raise BenchmarkError(f"{name}: GET {url} answered {body!r}, not {SMALL_BODY!r}")


def tls_resumes(port: int) -> bool | None:
    """Whether the server lets a second connection resume the first one's TLS session (as a
    client such as wrk does on reconnecting), which makes a "handshake" an abbreviated one;
    None when the probe itself failed."""
    context = client_tls_context()
    session = None
    request = f"GET / HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n".encode()
    try:
        for _ in range(2):
            with (
                socket.create_connection((HOST, port), timeout=10) as raw,
                context.wrap_socket(raw, server_hostname=HOST, session=session) as tls,
            ):
                tls.sendall(request)
                while tls.recv(65536):  # read to the end: TLS 1.3 tickets follow the handshake
                    pass
                if session is not None:
                    return bool(tls.session_reused)
                session = tls.session
    except OSError:  # ssl.SSLError included
        return None
    return False
