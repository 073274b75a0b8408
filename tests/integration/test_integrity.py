"""Nothing mixed up, nothing lost: every response reaches the client that asked for it, bodies
arrive byte-exact, and a response cut short is never presented as complete.

Each request carries a unique ``X-Request-Id`` that the fake backend echoes in its response (and
``/echo`` also reports the target and the SHA-256 of the body it received), so a client can tell
its own response from anyone else's. The mixing test runs thirty concurrent clients, some of them
pipelining, while one backend is killed and restarted, reloads swap the weights, and some
requests make a backend reset its connection mid-response. Failures the clients are allowed to
see are bounded and named; a response with someone else's id is never allowed.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.fakes import client as http
from tests.fakes.bodies import split_pieces, stream_blocks, stream_sha256
from tests.fakes.client import IncompleteResponse, RawClient, Response, encode_request
from tests.fakes.process import (
    BackendProcess,
    ProxyProcess,
    proxy_config,
    start_backend,
    start_tdproxy,
    wait_until,
)

MB = 1024 * 1024
CLIENTS = 30
REQUESTS_PER_CLIENT = 100
PIPELINE_DEPTH = 4


def base_config(blue: BackendProcess, green: BackendProcess, weights: tuple[int, int]) -> Any:
    return proxy_config(
        [("blue", blue.url, weights[0]), ("green", green.url, weights[1])],
        access_log={"enabled": False},
    )


@pytest.fixture(scope="module")
def proxy(
    blue: BackendProcess, green: BackendProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    config = base_config(blue, green, (1, 1))
    with start_tdproxy(config, tmp_path_factory.mktemp("integrity"), wait_admin=True) as running:
        yield running


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# Many clients, keep-alive and pipelined, under kills, resets and reloads


@dataclass
class Planned:
    request_id: str
    kind: str  # "get", "post" or "reset"
    data: bytes
    body_sha256: str | None = None


@dataclass
class Tally:
    """What every client saw, request by request."""

    ok: Counter[str] = field(default_factory=Counter)  # kind -> complete, correct responses
    generated: Counter[str] = field(default_factory=Counter)  # kind -> 502/503/504 by the proxy
    cut: Counter[str] = field(default_factory=Counter)  # kind -> connection closed instead
    wrong: list[str] = field(default_factory=list)  # responses that were someone else's
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def completed(self) -> int:
        return sum(self.ok.values()) + sum(self.generated.values()) + sum(self.cut.values())


def plan(client_number: int, sequence: int, rng: random.Random, authority: str) -> Planned:
    request_id = f"c{client_number}-r{sequence}-{rng.getrandbits(32):08x}"
    headers = [("X-Request-Id", request_id)]
    roll = rng.random()
    if roll < 0.04:
        data = encode_request("GET", "/reset-body?bytes=20000", host=authority, headers=headers)
        return Planned(request_id, "reset", data)
    if roll < 0.3:
        body = rng.randbytes(rng.choice([0, 1, 700, 5000, 70_000]))
        data = encode_request(
            "POST", f"/echo?id={request_id}", host=authority, headers=headers, body=body
        )
        return Planned(request_id, "post", data, sha256(body))
    data = encode_request("GET", f"/echo?id={request_id}", host=authority, headers=headers)
    return Planned(request_id, "get", data, sha256(b""))


def check(response: Response, planned: Planned) -> str:
    """'ok' for the right complete response, 'generated' for the proxy's own 5xx; raises
    AssertionError for anything else (above all, a response meant for another request)."""
    if response.header("X-Backend") is None:
        assert response.status in (502, 503, 504), (response.status, response.body[:200])
        assert response.header("X-Request-Id") is None
        return "generated"
    echoed = response.header("X-Request-Id")
    assert echoed == planned.request_id, f"got {echoed}'s response instead of {planned.request_id}"
    assert planned.kind != "reset", "a response cut by a reset was presented as complete"
    assert response.status == 200
    description = response.json()
    assert description["path"] == f"/echo?id={planned.request_id}"
    assert description["body_sha256"] == planned.body_sha256
    return "ok"


def run_client(
    proxy: ProxyProcess,
    client_number: int,
    tally: Tally,
    chaos_done: threading.Event,
) -> None:
    """Keep-alive requests (every third client pipelines them four at a time) until both this
    client's quota is reached and the chaos is over; reconnect whenever the proxy closes."""
    rng = random.Random(client_number)
    pipelining = client_number % 3 == 0
    sent = 0
    client: RawClient | None = None
    try:
        while sent < REQUESTS_PER_CLIENT or not chaos_done.is_set():
            if client is None:
                client = RawClient(proxy.host, proxy.port, timeout=15)
            batch = [plan(client_number, sent, rng, client.authority)]
            if pipelining and batch[0].kind != "reset":
                while len(batch) < PIPELINE_DEPTH:
                    planned = plan(client_number, sent + len(batch), rng, client.authority)
                    if planned.kind != "reset":  # a reset takes the connection down: alone
                        batch.append(planned)
            try:
                client.send(b"".join(planned.data for planned in batch))
            except OSError:  # closed by the proxy since the last answer: nothing was sent
                client.close()
                client = None
                continue
            sent += len(batch)
            for index, planned in enumerate(batch):
                try:
                    response = client.read_response()
                except (IncompleteResponse, ConnectionResetError):
                    with tally.lock:
                        for lost in batch[index:]:
                            tally.cut[lost.kind] += 1
                    client.close()
                    client = None
                    break
                outcome = check(response, planned)
                with tally.lock:
                    (tally.ok if outcome == "ok" else tally.generated)[planned.kind] += 1
                if "close" in (response.header("Connection") or "").lower():
                    with tally.lock:
                        for lost in batch[index + 1 :]:
                            tally.cut[lost.kind] += 1
                    client.close()
                    client = None
                    break
    except Exception as exc:  # a wrong answer, or a hang: reported by the test
        with tally.lock:
            tally.wrong.append(f"client {client_number}: {exc!r}")
    finally:
        if client is not None:
            client.close()


def reload_to(proxy: ProxyProcess, config: Any) -> None:
    before = http.request(proxy.admin_url + "/api/v1/status").json()["generation"]
    proxy.write_config(config)
    response = http.request(proxy.admin_url + "/api/v1/reload", "POST")
    assert response.status == 200, response.text
    wait_until(
        lambda: http.request(proxy.admin_url + "/api/v1/status").json()["generation"] > before,
        timeout=10,
        message="the reload took effect",
    )


def test_every_response_reaches_the_client_that_asked_for_it(
    proxy: ProxyProcess, blue: BackendProcess, green: BackendProcess
) -> None:
    tally = Tally()
    chaos_done = threading.Event()
    total = CLIENTS * REQUESTS_PER_CLIENT

    def progressed(fraction: float) -> bool:
        return tally.completed >= fraction * total or bool(tally.wrong)

    threads = [
        threading.Thread(target=run_client, args=(proxy, number, tally, chaos_done))
        for number in range(CLIENTS)
    ]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: progressed(0.15), timeout=60, message="traffic before the kill")
        blue.kill()
        wait_until(lambda: progressed(0.3), timeout=60, message="traffic while blue is dead")
        blue.start(port=blue.port)
        wait_until(lambda: progressed(0.45), timeout=60, message="traffic after the restart")
        reload_to(proxy, base_config(blue, green, (3, 1)))
        wait_until(lambda: progressed(0.6), timeout=60, message="traffic after a reload")
        reload_to(proxy, base_config(blue, green, (1, 3)))
        wait_until(lambda: progressed(0.75), timeout=60, message="traffic after a reload")
        reload_to(proxy, base_config(blue, green, (1, 1)))
    finally:
        chaos_done.set()
        for thread in threads:
            thread.join(60)
    assert not any(thread.is_alive() for thread in threads)

    assert tally.wrong == []
    # GETs are retried when a backend dies before answering: none may fail. A POST caught in
    # flight by the kill (at most one per client, or one on a pooled connection the kill has
    # just broken) may get a 502 or a closed connection; a reset mid-body always closes.
    assert tally.generated["get"] == tally.cut["get"] == 0, tally
    assert tally.generated["post"] + tally.cut["post"] <= 2 * CLIENTS, tally
    assert tally.ok["reset"] == tally.generated["reset"] == 0, tally
    assert tally.cut["reset"] > 0
    assert tally.ok["get"] > total * 0.5 and tally.ok["post"] > total * 0.1, tally
    # Both backends served, blue before and after its restart.
    assert blue.stats()["requests_total"] > 0


# ---------------------------------------------------------------------------------------------
# Bodies of every size, both framings, both directions, concurrently


def chunked_pieces(size: int, seed: int, piece: int) -> Iterator[bytes]:
    for data in split_pieces(stream_blocks(size, seed), piece):
        yield b"%x\r\n%b\r\n" % (len(data), data)
    yield b"0\r\n\r\n"


def upload(proxy: ProxyProcess, size: int, seed: int, chunked: bool) -> tuple[int, str]:
    with RawClient(proxy.host, proxy.port, timeout=60) as client:
        framing = ("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(size))
        client.send(encode_request("POST", "/upload", host=client.authority, headers=[framing]))
        pieces: Iterable[bytes] = (
            chunked_pieces(size, seed, 10_007) if chunked else stream_blocks(size, seed)
        )
        for data in pieces:
            client.send(data)
        response = client.read_response()
    assert response.status == 200
    result = response.json()
    return result["body_len"], result["body_sha256"]


def download(proxy: ProxyProcess, size: int, seed: int, chunked: bool) -> tuple[int, str]:
    with RawClient(proxy.host, proxy.port, timeout=60) as client:
        target = f"/stream?bytes={size}&seed={seed}&chunked={int(chunked)}&chunk=9973"
        response = client.request("GET", target)
    assert response.status == 200
    if chunked:
        assert response.header("Transfer-Encoding") == "chunked"
    else:
        assert response.header("Content-Length") == str(size)
    assert response.header("X-Body-Sha256") == stream_sha256(size, seed)
    return len(response.body), sha256(response.body)


SIZES = [0, 1, 64 * 1024 - 1, 64 * 1024, 64 * 1024 + 1, 3 * MB]


def test_bodies_of_every_size_arrive_byte_exact_under_concurrency(proxy: ProxyProcess) -> None:
    jobs = [
        (direction, size, seed, chunked)
        for seed, (direction, size, chunked) in enumerate(
            itertools.product(("up", "down"), SIZES, (False, True))
        )
    ]
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = {
            job: pool.submit(upload if job[0] == "up" else download, proxy, *job[1:])
            for job in jobs
        }
        results = {job: future.result(timeout=120) for job, future in futures.items()}
    for (_, size, seed, _), result in results.items():
        assert result == (size, stream_sha256(size, seed))


def test_200_mb_each_way_at_once_arrive_byte_exact(proxy: ProxyProcess) -> None:
    size = 200 * MB

    def big_download() -> tuple[int, str]:
        digest = hashlib.sha256()
        received = 0
        with RawClient(proxy.host, proxy.port, timeout=60) as client:
            client.send_request("GET", f"/stream?bytes={size}&seed=200")
            head = client.read_head()
            assert head.header("Content-Length") == str(size)
            while received < size:
                data = client.read_exactly(min(MB, size - received))
                digest.update(data)
                received += len(data)
            assert client.request("GET", "/").status == 200  # and the connection goes on
        return received, digest.hexdigest()

    with ThreadPoolExecutor(max_workers=2) as pool:
        up = pool.submit(upload, proxy, size, 201, True)
        down = pool.submit(big_download)
        assert down.result(timeout=120) == (size, stream_sha256(size, 200))
        assert up.result(timeout=120) == (size, stream_sha256(size, 201))


# ---------------------------------------------------------------------------------------------
# A backend dying mid-response


def upstream_error_count(proxy: ProxyProcess, backend: str, kind: str) -> float:
    metrics = http.request(proxy.admin_url + "/metrics").text
    pattern = (
        r"^tdproxy_upstream_errors_total\{"
        + rf'backend="{backend}",kind="{kind}"'
        + r"\} ([0-9.e+]+)$"
    )
    match = re.search(pattern, metrics, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_a_reset_mid_response_closes_the_client_and_is_counted(
    proxy: ProxyProcess, blue: BackendProcess
) -> None:
    before = {name: upstream_error_count(proxy, name, "reset") for name in ("blue", "green")}
    with RawClient(proxy.host, proxy.port) as client:
        client.send_request("GET", "/reset-body?bytes=30000")
        head = client.read_head()
        assert head.status == 200
        promised = int(head.header("Content-Length") or 0)
        with pytest.raises((IncompleteResponse, ConnectionResetError)):
            client.read_exactly(promised)
    served_by = head.header("X-Backend")
    assert served_by in before
    wait_until(
        lambda: upstream_error_count(proxy, served_by, "reset") == before[served_by] + 1,
        timeout=5,
        message="the reset was counted",
    )
    with RawClient(proxy.host, proxy.port) as client:  # and the proxy serves on
        assert client.request("GET", "/").status == 200


def test_a_backend_killed_mid_download_never_looks_complete(tmp_path: Path) -> None:
    with start_backend("victim") as victim:
        config = proxy_config([("victim", victim.url, 1)], access_log={"enabled": False})
        with start_tdproxy(config, tmp_path, wait_admin=True) as proxy:
            for chunked in (True, False):
                if not victim.running:
                    victim.start(port=victim.port)
                before = upstream_error_count(proxy, "victim", "reset")
                with RawClient(proxy.host, proxy.port, timeout=20) as client:
                    target = f"/stream?bytes={100 * MB}&seed=1&chunked={int(chunked)}"
                    client.send_request("GET", target)
                    head = client.read_head()
                    assert head.status == 200
                    client.read_exactly(MB)  # the download is under way
                    victim.kill()
                    # Reading on: the body stops short of its end, and the connection closes.
                    with pytest.raises((IncompleteResponse, ConnectionResetError, ValueError)):
                        client.read_body(head)
                wait_until(
                    lambda before=before: upstream_error_count(proxy, "victim", "reset") > before,
                    timeout=5,
                    message="the failure was counted",
                )
