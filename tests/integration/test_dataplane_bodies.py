"""Bodies and framing through tdproxy: uploads and downloads of every size and framing, streamed
with flat memory, and the responses that carry no body (HEAD, 204, 304) or come first (1xx).

Large bodies are generated and hashed piece by piece on both ends (the fake backend reports the
SHA-256 of what it received, and announces the SHA-256 of what it sends), so no test holds a
large body whole.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from tests.fakes.backend import HEAD_TEST_BODY
from tests.fakes.bodies import split_pieces, stream_blocks, stream_sha256
from tests.fakes.client import RawClient, Response, encode_chunked
from tests.fakes.process import (
    BackendProcess,
    ProxyProcess,
    proxy_config,
    start_tdproxy,
)

MB = 1024 * 1024


@pytest.fixture(scope="module")
def proxy(blue: BackendProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    config = proxy_config([("blue", blue.url, 1)], access_log={"enabled": False})
    with start_tdproxy(config, tmp_path_factory.mktemp("bodies")) as running:
        yield running


@pytest.fixture
def client(proxy: ProxyProcess) -> Iterator[RawClient]:
    with RawClient(proxy.host, proxy.port, timeout=20) as raw:
        yield raw


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def rss_bytes(pid: int) -> int:
    """The resident set size of process ``pid`` (Linux: VmRSS in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def read_fixed(client: RawClient, size: int, piece: int = MB) -> Iterator[bytes]:
    """A Content-Length body, read ``piece`` bytes at a time."""
    remaining = size
    while remaining:
        data = client.read_exactly(min(piece, remaining))
        remaining -= len(data)
        yield data


def read_chunked(client: RawClient) -> Iterator[bytes]:
    """A chunked body, chunk by chunk (trailers skipped); raises on a broken stream."""
    while True:
        size = int(client.read_until(b"\r\n")[:-2].split(b";", 1)[0], 16)
        if size == 0:
            break
        yield from read_fixed(client, size)
        assert client.read_exactly(2) == b"\r\n"
    while client.read_until(b"\r\n") != b"\r\n":
        pass


def digest(pieces: Iterable[bytes]) -> tuple[int, str]:
    hasher = hashlib.sha256()
    total = 0
    for piece in pieces:
        hasher.update(piece)
        total += len(piece)
    return total, hasher.hexdigest()


def upload_head(client: RawClient, headers: list[tuple[str, str]]) -> None:
    client.send_request("POST", "/upload", headers=headers)


# -- uploads -----------------------------------------------------------------------------------


def test_zero_byte_upload(client: RawClient) -> None:
    response = client.request("POST", "/echo", body=b"")
    assert response.status == 200
    echo = response.json()
    assert (echo["body_len"], echo["body_sha256"]) == (0, sha256(b""))
    names = {name.lower() for name, _ in echo["headers"]}
    assert "transfer-encoding" not in names


def test_zero_byte_chunked_upload(client: RawClient) -> None:
    response = client.request(
        "POST", "/echo", headers=[("Transfer-Encoding", "chunked")], body=encode_chunked([])
    )
    assert response.status == 200
    assert response.json()["body_len"] == 0


def test_small_upload_with_content_length(client: RawClient) -> None:
    body = b"hello, backend\n" * 100
    echo = client.request("PUT", "/echo", body=body).json()
    assert (echo["method"], echo["body_len"], echo["body_sha256"]) == (
        "PUT",
        len(body),
        sha256(body),
    )
    assert ["Content-Length", str(len(body))] in echo["headers"]


def test_small_chunked_upload_is_forwarded_chunked(client: RawClient) -> None:
    pieces = [b"a" * 10, b"b" * 70_000, b"c"]
    body = encode_chunked(pieces, trailers=[("X-Checksum", "abc")])
    response = client.request(
        "POST", "/echo", headers=[("Transfer-Encoding", "chunked")], body=body
    )
    echo = response.json()
    assert (echo["body_len"], echo["body_sha256"]) == (70_011, sha256(b"".join(pieces)))
    framing = [(name.lower(), value) for name, value in echo["headers"]]
    assert framing.count(("transfer-encoding", "chunked")) == 1
    assert "content-length" not in {name for name, _ in framing}


def test_large_upload_with_content_length(client: RawClient) -> None:
    size = 64 * MB
    upload_head(client, [("Content-Length", str(size))])
    for block in stream_blocks(size, 7):
        client.send(block)
    result = client.read_response().json()
    assert (result["body_len"], result["body_sha256"]) == (size, stream_sha256(size, 7))


def test_large_chunked_upload(client: RawClient) -> None:
    size = 16 * MB
    upload_head(client, [("Transfer-Encoding", "chunked")])
    # Odd chunk sizes, so the proxy's re-framing cannot line up with the client's by luck.
    for piece in split_pieces(stream_blocks(size, 8), 100_003):
        client.send(b"%x\r\n%b\r\n" % (len(piece), piece))
    client.send(b"0\r\n\r\n")
    result = client.read_response().json()
    assert (result["body_len"], result["body_sha256"]) == (size, stream_sha256(size, 8))


# -- downloads ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 100_000])
def test_fixed_length_download(client: RawClient, size: int) -> None:
    response = client.request("GET", f"/stream?bytes={size}&seed=3")
    assert response.header("Content-Length") == str(size)
    assert response.header("Transfer-Encoding") is None
    assert sha256(response.body) == stream_sha256(size, 3)


@pytest.mark.parametrize("size", [0, 1, 100_000])
def test_chunked_download(client: RawClient, size: int) -> None:
    response = client.request("GET", f"/stream?bytes={size}&seed=4&chunked=1&chunk=9999")
    assert response.header("Transfer-Encoding") == "chunked"
    assert response.header("Content-Length") is None
    assert sha256(response.body) == stream_sha256(size, 4)


def test_large_fixed_length_download(client: RawClient) -> None:
    size = 64 * MB
    client.send_request("GET", f"/stream?bytes={size}&seed=5")
    head = client.read_head()
    assert head.header("Content-Length") == str(size)
    assert digest(read_fixed(client, size)) == (size, stream_sha256(size, 5))
    assert client.request("GET", "/status/200").status == 200  # and the connection goes on


def test_large_chunked_download(client: RawClient) -> None:
    size = 16 * MB
    client.send_request("GET", f"/stream?bytes={size}&seed=6&chunked=1")
    head = client.read_head()
    assert head.header("Transfer-Encoding") == "chunked"
    assert digest(read_chunked(client)) == (size, stream_sha256(size, 6))
    assert client.request("GET", "/status/200").status == 200


def test_memory_stays_flat_while_a_slow_client_downloads(
    proxy: ProxyProcess, client: RawClient
) -> None:
    """Backpressure: the backend sends as fast as it can (a few hundred MB/s here), the client
    reads at well under 100 MB/s. Without pausing the upstream the proxy would buffer the
    difference, hundreds of MB; with it, its RSS barely moves."""
    size = 208 * MB
    assert client.request("GET", "/stream?bytes=1000000").status == 200  # warm up the pool
    baseline = rss_bytes(proxy.pid)
    client.send_request("GET", f"/stream?bytes={size}&seed=9")
    head = client.read_head()
    assert head.status == 200
    peak = baseline
    received = 0
    for piece in read_fixed(client, size):
        received += len(piece)
        time.sleep(0.007)  # the slow reader (at most ~140 MB/s), not a wait for a condition
        if received % (4 * MB) == 0:
            peak = max(peak, rss_bytes(proxy.pid))
    # The bytes are checked elsewhere (test_large_fixed_length_download); here, that they all
    # came and the connection is still in step.
    assert received == size
    assert client.request("GET", "/status/200").status == 200
    growth = peak - baseline
    assert growth < 50 * MB, f"tdproxy RSS grew by {growth / MB:.1f} MB during the download"


# -- responses without a body, and interim responses -------------------------------------------


def test_head_keeps_content_length_sends_no_body_and_the_connection_goes_on(
    client: RawClient,
) -> None:
    client.send_request("HEAD", "/head-test")
    client.send_request("GET", "/head-test")  # pipelined: any stray body byte would corrupt it
    head = client.read_response(head_request=True)
    assert head.status == 200
    assert head.header("Content-Length") == str(len(HEAD_TEST_BODY))
    assert head.header("Transfer-Encoding") is None
    get = client.read_response()
    assert get.body == HEAD_TEST_BODY
    for _ in range(3):  # HEAD on a reused upstream connection works as well
        assert client.request("HEAD", "/head-test").body == b""
        assert client.request("GET", "/status/200").status == 200


def test_head_of_a_chunked_resource(client: RawClient) -> None:
    response = client.request("HEAD", "/stream?bytes=5000&chunked=1")
    assert response.status == 200
    assert response.header("Content-Length") is None
    assert client.request("GET", "/head-test").body == HEAD_TEST_BODY


@pytest.mark.parametrize("status", [204, 304])
def test_bodyless_statuses(client: RawClient, status: int) -> None:
    client.send_request("GET", f"/status/{status}")
    client.send_request("GET", "/head-test")
    response = client.read_response()
    assert response.status == status
    assert response.header("Transfer-Encoding") is None
    assert response.header("Content-Length") in (None, "0")
    assert client.read_response().body == HEAD_TEST_BODY


def test_expect_100_continue_gets_the_interim_then_the_final_response(client: RawClient) -> None:
    body = b"x" * 50_000
    client.send_request(
        "POST",
        "/continue",
        headers=[("Expect", "100-continue"), ("Content-Length", str(len(body)))],
    )
    interim = client.read_head()  # the client holds the body until it sees the 100
    assert interim.status == 100
    client.send(body)
    final = client.read_response()
    assert final.status == 200
    result = final.json()
    assert result["continue_sent"] is True
    assert (result["body_len"], result["body_sha256"]) == (len(body), sha256(body))
    assert client.request("GET", "/status/200").status == 200


def test_http10_client_gets_no_interim_response(client: RawClient) -> None:
    body = b"y" * 1000
    response = client.request(
        "POST",
        "/continue",
        headers=[("Expect", "100-continue"), ("Connection", "keep-alive")],
        body=body,
        version="HTTP/1.0",
    )
    assert response.interim == []
    assert response.status == 200
    assert response.json()["body_len"] == len(body)


def test_read_until_close_response_is_rechunked_for_http11(client: RawClient) -> None:
    size = 300_000
    response = client.request("GET", f"/nolength?bytes={size}&seed=2")
    assert response.status == 200
    assert response.header("Transfer-Encoding") == "chunked"
    assert response.header("Connection") is None  # the backend's close is its own hop's business
    assert sha256(response.body) == stream_sha256(size, 2)
    # The client connection outlives the backend's.
    assert client.request("GET", "/head-test").body == HEAD_TEST_BODY


def test_read_until_close_response_stays_close_delimited_for_http10(
    client: RawClient,
) -> None:
    size = 200_000
    response: Response = client.request(
        "GET",
        f"/nolength?bytes={size}&seed=2",
        headers=[("Connection", "keep-alive")],
        version="HTTP/1.0",
    )
    assert response.header("Transfer-Encoding") is None
    assert sha256(response.body) == stream_sha256(size, 2)  # read until the proxy closed
