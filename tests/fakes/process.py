"""Run fake backends and tdproxy as real processes, and wait on conditions with deadlines.

Every wait here polls a condition until a deadline and fails loudly with what it saw; nothing
sleeps a fixed time and hopes. Every process started here is reaped, and every pipe and file
closed, by ``stop()``/``kill()`` or by leaving its ``with`` block.

Child processes run with ``PYTHONUNBUFFERED=1`` so their output (the access log, for one) reaches
the capture files line by line rather than when a buffer fills.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, Protocol, Self, TypeVar, overload

import yaml

from tests.fakes import client

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCALHOST = "127.0.0.1"
STOP_TIMEOUT = 10.0

T = TypeVar("T")


class ProcessFailed(RuntimeError):
    """A child process exited, or never became ready, when it should have been serving."""


# ---------------------------------------------------------------------------------------------
# Ports and waiting

_ports_handed_out: set[int] = set()


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port that is free now and was not handed out before in this test run.

    The port is released before returning, so another process could take it first; the
    ephemeral range is large enough that this does not happen in practice.
    """
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in _ports_handed_out:
            _ports_handed_out.add(port)
            return port
    raise RuntimeError("no fresh free port found")


def port_is_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if a TCP connection to ``host:port`` succeeds (it is closed again at once)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.02,
    *,
    message: str = "condition",
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Call ``predicate`` until it returns something truthy and return that; ``TimeoutError``
    after ``timeout`` seconds. Exceptions of the ``ignore`` types count as a falsy result.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            result = predicate()
            if result:
                return result
            last = result
        except ignore as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{message} not met within {timeout}s (last result: {last!r})")
        time.sleep(interval)


@overload
async def async_wait_until(
    predicate: Callable[[], Awaitable[T]],
    timeout: float = ...,
    interval: float = ...,
    *,
    message: str = ...,
    ignore: tuple[type[BaseException], ...] = ...,
) -> T: ...


@overload
async def async_wait_until(
    predicate: Callable[[], T],
    timeout: float = ...,
    interval: float = ...,
    *,
    message: str = ...,
    ignore: tuple[type[BaseException], ...] = ...,
) -> T: ...


async def async_wait_until(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    interval: float = 0.02,
    *,
    message: str = "condition",
    ignore: tuple[type[BaseException], ...] = (),
) -> Any:
    """:func:`wait_until` for async tests: never blocks the event loop; ``predicate`` may be
    a plain function or a coroutine function.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: object = None
    while True:
        try:
            result = predicate()
            if isinstance(result, Awaitable):
                result = await result
            if result:
                return result
            last = result
        except ignore as exc:
            last = exc
        if loop.time() >= deadline:
            raise TimeoutError(f"{message} not met within {timeout}s (last result: {last!r})")
        await asyncio.sleep(interval)


def wait_for_port(
    host: str,
    port: int,
    timeout: float = 10.0,
    *,
    alive: Callable[[], bool] | None = None,
) -> None:
    """Wait until ``host:port`` accepts connections. If ``alive`` turns False first (the process
    that should listen has died), raise ``ProcessFailed`` at once instead of waiting on.
    """
    deadline = time.monotonic() + timeout
    while not port_is_open(host, port, timeout=0.5):
        if alive is not None and not alive():
            raise ProcessFailed(f"process exited before {host}:{port} accepted connections")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{host}:{port} did not accept connections within {timeout}s")
        time.sleep(0.02)


def _child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def _reap(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM, then SIGKILL if the process has not exited within ``timeout``; returns the code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


# ---------------------------------------------------------------------------------------------
# Fake backends


def _backend_args(name: str, host: str, port: int, flags: Mapping[str, Any]) -> list[str]:
    """The command line: ``accept_then_close=True`` adds ``--accept-then-close``, and
    ``keepalive_timeout=0.5`` adds ``--keepalive-timeout 0.5``.
    """
    args = [
        sys.executable,
        "-m",
        "tests.fakes.backend",
        "--name",
        name,
        "--host",
        host,
        "--port",
        str(port),
        "--exit-on-stdin-eof",
    ]
    for key, value in flags.items():
        option = "--" + key.replace("_", "-")
        if value is True:
            args.append(option)
        elif value is not False and value is not None:
            args += [option, str(value)]
    return args


class BackendProcess:
    """A running ``tests.fakes.backend``; ``restart()`` brings it back on the same port."""

    def __init__(self, name: str, host: str, flags: Mapping[str, Any]) -> None:
        self.name = name
        self.host = host
        self.flags = dict(flags)
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._stderr_saved = ""

    def __repr__(self) -> str:
        return f"<BackendProcess {self.name} {self.url} pid={self.pid}>"

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self, port: int = 0, timeout: float = 10.0) -> Self:
        """Start the process and wait for its ``LISTENING <port>`` line."""
        if self.running:
            raise RuntimeError(f"{self!r} is already running")
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed by _release()
        self._proc = subprocess.Popen(
            _backend_args(self.name, self.host, port, self.flags),
            cwd=REPO_ROOT,
            env=_child_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        try:
            self.port = self._read_listening_line(timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def _read_listening_line(self, timeout: float) -> int:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        output = b""
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while b"\n" not in output:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"backend {self.name} printed no LISTENING line within {timeout}s; "
                        f"stdout={output!r} stderr={self.stderr_text()!r}"
                    )
                if selector.select(remaining):
                    chunk = os.read(fd, 4096)
                    if not chunk:
                        self._proc.wait(timeout=STOP_TIMEOUT)
                        raise ProcessFailed(
                            f"backend {self.name} exited with {self._proc.returncode} before "
                            f"listening; stderr:\n{self.stderr_text()}"
                        )
                    output += chunk
        word, _, port = output.partition(b"\n")[0].partition(b" ")
        if word != b"LISTENING" or not port.strip().isdigit():
            raise ProcessFailed(f"backend {self.name} printed {output!r} instead of LISTENING")
        return int(port)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM and wait (SIGKILL after ``timeout``); returns the exit code. Idempotent."""
        code = None if self._proc is None else _reap(self._proc, timeout)
        self._release()
        return code

    def kill(self) -> None:
        """SIGKILL: the backend vanishes without closing anything cleanly. Idempotent."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
        self._release()

    def restart(self, timeout: float = 10.0) -> Self:
        """Stop if running, then start again on the same port (so the proxy's url still fits)."""
        port = self.port
        self.stop()
        return self.start(port=port, timeout=timeout)

    def _release(self) -> None:
        """Close the pipes; keep stderr's text (for messages) and close its file."""
        if self._proc is not None:
            for pipe in (self._proc.stdin, self._proc.stdout):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
        if self._stderr is not None:
            self._stderr_saved = self.stderr_text()
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- facts --------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stderr_text(self) -> str:
        """What the backend wrote to stderr (tracebacks of handler bugs land here)."""
        if self._stderr is None:
            return self._stderr_saved
        self._stderr.seek(0)
        return self._stderr.read().decode("utf-8", "replace")

    # -- the control API ----------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """``/_control/stats``: requests_total, requests_by_path, connections_open,
        connections_total, request_ids (control traffic is never counted)."""
        result: dict[str, Any] = client.request(self.url + "/_control/stats").json()
        return result

    def reset_stats(self) -> None:
        client.request(self.url + "/_control/reset", "POST")

    def set_health(self, status: int | None = None, *, hang: bool | None = None) -> None:
        """Change what ``/health`` answers: its status, or whether it hangs."""
        query = []
        if status is not None:
            query.append(f"status={status}")
        if hang is not None:
            query.append(f"hang={int(hang)}")
        response = client.request(self.url + "/_control/health?" + "&".join(query), "POST")
        if response.status != 200:
            raise RuntimeError(f"health control failed: {response.status} {response.text}")

    def set_faults(self, *, fail_every: int = 0, status: int = 500, delay_ms: int = 0) -> None:
        """Every ``fail_every``-th answer on ``/`` gets ``status`` (0: none); each waits
        ``delay_ms`` first."""
        query = f"fail_every={fail_every}&status={status}&delay_ms={delay_ms}"
        response = client.request(self.url + "/_control/faults?" + query, "POST")
        if response.status != 200:
            raise RuntimeError(f"faults control failed: {response.status} {response.text}")

    def saw_request_id(self, request_id: str) -> bool:
        return request_id in self.stats()["request_ids"]


def start_backend(
    name: str,
    *,
    host: str = LOCALHOST,
    port: int = 0,
    timeout: float = 10.0,
    **flags: Any,
) -> BackendProcess:
    """Start ``python -m tests.fakes.backend --name NAME`` and wait until it listens.

    ``flags`` become CLI options: ``accept_then_close=True``, ``garbage=True``,
    ``keepalive_timeout=0.5``.
    """
    return BackendProcess(name, host, flags).start(port=port, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# tdproxy


def _plain(value: Any) -> Any:
    """Tuples to lists, recursively, so ``yaml.safe_dump`` accepts the structure."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def deep_merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in: mappings merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in overrides.items():
        current = merged.get(key)
        if isinstance(current, Mapping) and isinstance(value, Mapping):
            merged[key] = deep_merge(current, value)
        else:
            merged[key] = value
    return merged


BackendSpec = tuple[str, str, int] | Mapping[str, Any]


def proxy_config(backends: Sequence[BackendSpec], **overrides: Any) -> dict[str, Any]:
    """A config dict: entrypoint and admin on fresh 127.0.0.1 ports, health checks off.

    ``backends`` items are ``(name, url, weight)`` or full backend mappings (for ``backup``,
    ``host_header``...). ``overrides`` are deep-merged, e.g.
    ``proxy_config(bs, routing={"method": "sticky"}, timeouts={"connect": "1s"})``.
    """
    backend_list = [
        dict(spec)
        if isinstance(spec, Mapping)
        else {"name": spec[0], "url": spec[1], "weight": spec[2]}
        for spec in backends
    ]
    base = {
        "entrypoint": {"address": LOCALHOST, "port": free_port()},
        "routing": {"method": "round_robin"},
        "backends": backend_list,
        "health_check": {"enabled": False},
        "admin": {"address": LOCALHOST, "port": free_port()},
    }
    return deep_merge(base, overrides)


def _connect_host(address: str) -> str:
    """Where to connect to reach a server bound to ``address``."""
    return {"0.0.0.0": LOCALHOST, "": LOCALHOST, "::": "::1"}.get(address, address)


def _unique_path(directory: Path, stem: str, suffix: str) -> Path:
    path = directory / f"{stem}{suffix}"
    number = 2
    while path.exists():
        path = directory / f"{stem}-{number}{suffix}"
        number += 1
    return path


Stream = Literal["stdout", "stderr", "both"]


class ProxyProcess:
    """A running ``python -m tdproxy run``; output is captured to files in ``tmp_path``."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        config: Mapping[str, Any],
        config_path: Path,
        stdout_path: Path,
        stderr_path: Path,
        files: Sequence[IO[bytes]],
    ) -> None:
        self._proc = proc
        self._files = list(files)
        self.config_path = config_path
        self.stdout_path = stdout_path
        self.stderr_path = stderr_path
        entrypoint = config.get("entrypoint") or {}
        admin = config.get("admin") or {}
        self.host = _connect_host(str(entrypoint.get("address", "0.0.0.0")))
        self.port = int(entrypoint.get("port", 8080))
        self.scheme = "https" if entrypoint.get("tls") else "http"
        self.admin_host = _connect_host(str(admin.get("address", LOCALHOST)))
        self.admin_port = int(admin.get("port", 9901))

    def __repr__(self) -> str:
        return f"<ProxyProcess {self.url} pid={self.pid} returncode={self.returncode}>"

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.poll()

    @property
    def running(self) -> bool:
        return self._proc.poll() is None

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://{self.admin_host}:{self.admin_port}"

    # -- output -------------------------------------------------------------------------------

    def stdout_text(self) -> str:
        return self.stdout_path.read_text(encoding="utf-8", errors="replace")

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def output_text(self, stream: Stream = "both") -> str:
        if stream == "stdout":
            return self.stdout_text()
        if stream == "stderr":
            return self.stderr_text()
        return self.stdout_text() + self.stderr_text()

    def wait_for_output(self, text: str, timeout: float = 10.0, stream: Stream = "both") -> str:
        """Wait until ``text`` appears in the captured output; returns the first line holding it."""

        def found() -> str:
            lines = self.output_text(stream).splitlines()
            return next((line for line in lines if text in line), "")

        return wait_until(found, timeout, message=f"{text!r} in tdproxy's {stream}")

    # -- config -------------------------------------------------------------------------------

    def write_config(self, config: Mapping[str, Any] | str) -> None:
        """Replace the config file atomically (write a sibling, then rename over it)."""
        text = (
            config if isinstance(config, str) else yaml.safe_dump(_plain(config), sort_keys=False)
        )
        partial = self.config_path.with_suffix(".yaml.partial")
        partial.write_text(text, encoding="utf-8")
        partial.replace(self.config_path)

    # -- lifecycle ----------------------------------------------------------------------------

    def wait_ready(self, timeout: float = 15.0, *, wait_admin: bool = False) -> None:
        """Wait until the entrypoint (and with ``wait_admin`` the admin port) accepts
        connections; on failure stop the process and raise ``ProcessFailed`` with its output.
        """
        try:
            wait_for_port(self.host, self.port, timeout, alive=lambda: self.running)
            if wait_admin:
                wait_for_port(self.admin_host, self.admin_port, timeout, alive=lambda: self.running)
        except (ProcessFailed, TimeoutError) as exc:
            self.stop()
            raise ProcessFailed(
                f"tdproxy did not become ready ({exc}); exit code {self.returncode}\n"
                f"--- stderr ---\n{self.stderr_text()}\n--- stdout ---\n{self.stdout_text()}"
            ) from None

    def send_signal(self, signum: int) -> None:
        if self.running:
            self._proc.send_signal(signum)

    def terminate(self) -> None:
        """SIGTERM: ask for a graceful drain and exit."""
        self.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """Wait for the process to exit and return its code (``subprocess.TimeoutExpired``)."""
        return self._proc.wait(timeout)

    def kill(self) -> None:
        if self.running:
            self._proc.kill()
        self._proc.wait()
        self._close_files()

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, SIGKILL after ``timeout``; closes the capture files. Idempotent."""
        code = _reap(self._proc, timeout)
        self._close_files()
        return code

    def _close_files(self) -> None:
        for file in self._files:
            file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_tdproxy(
    config: Mapping[str, Any] | str,
    tmp_path: Path,
    *,
    timeout: float = 15.0,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    wait_admin: bool = False,
) -> ProxyProcess:
    """Write ``config`` to ``tmp_path/tdproxy.yaml`` (``tdproxy-2.yaml``... if taken), run
    ``python -m tdproxy run --config PATH``, and wait until the entrypoint port accepts
    connections (and the admin port too with ``wait_admin``).

    Raises ``ProcessFailed``, with tdproxy's stderr, if it exits or is not ready in time.
    """
    text = config if isinstance(config, str) else yaml.safe_dump(_plain(config), sort_keys=False)
    parsed = yaml.safe_load(text) if isinstance(config, str) else config
    if not isinstance(parsed, Mapping):
        parsed = {}
    config_path = _unique_path(tmp_path, "tdproxy", ".yaml")
    config_path.write_text(text, encoding="utf-8")
    stem = config_path.stem
    stdout_path = tmp_path / f"{stem}.stdout.log"
    stderr_path = tmp_path / f"{stem}.stderr.log"
    stdout = stdout_path.open("wb")
    stderr = stderr_path.open("wb")
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tdproxy", "run", "--config", str(config_path), *args],
            cwd=REPO_ROOT,
            env=_child_env(env),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
        )
    except BaseException:
        stdout.close()
        stderr.close()
        raise
    proxy = ProxyProcess(proc, parsed, config_path, stdout_path, stderr_path, [stdout, stderr])
    proxy.wait_ready(timeout, wait_admin=wait_admin)
    return proxy


def run_tdproxy(
    *args: str, timeout: float = 30.0, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m tdproxy ARGS`` to completion (for ``check`` and bad-config tests)."""
    return subprocess.run(
        [sys.executable, "-m", "tdproxy", *args],
        cwd=REPO_ROOT,
        env=_child_env(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# ---------------------------------------------------------------------------------------------
# Fixture signatures (the factories in tests/conftest.py)


class BackendFactory(Protocol):
    def __call__(
        self, name: str = ..., *, host: str = ..., port: int = ..., **flags: Any
    ) -> BackendProcess: ...


class ProxyFactory(Protocol):
    def __call__(
        self,
        config: Mapping[str, Any] | str,
        *,
        timeout: float = ...,
        args: Sequence[str] = ...,
        env: Mapping[str, str] | None = ...,
        wait_admin: bool = ...,
    ) -> ProxyProcess: ...
