"""Plain TCP: blob bodies by sendfile, small answers in one write; right bytes, kept-alive connections, clients that hang up."""

from __future__ import annotations

import logging
import re
import socket
import subprocess
import time

import httpx
import pytest

from mirror import blobs

from .fakes import Blob, FakeRegistry, Fault, ServerThread, write_blob

MB = 1_000_000


@pytest.fixture
def big(registry: FakeRegistry) -> Blob:
    blob = write_blob(registry.directory, 24 * MB, seed=71)
    registry.add_model("library/big", "latest", [blob])
    return blob


def test_stored_blob_is_sent_without_reading_it_into_python(
    mirror: ServerThread, big: Blob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whole, one range and several ranges, one after another on one kept-alive connection."""
    url = f"{mirror.url()}/v2/library/big/blobs/{big.digest}"
    data = big.path.read_bytes()
    with httpx.Client(timeout=60) as client:
        assert client.get(url).content == data  # fills it
        reads: list[int] = []
        real_read_at = blobs.read_at
        monkeypatch.setattr(blobs, "read_at", lambda fd, at, n: reads.append(n) or real_read_at(fd, at, n))
        for _ in range(2):
            assert client.get(url).content == data
            r = client.get(url, headers={"Range": "bytes=1000-5000999"})
            assert r.status_code == 206 and r.content == data[1000:5001000]
            r = client.get(url, headers={"Range": "bytes=0-9,20000000-"})
            assert r.status_code == 206 and int(r.headers["content-length"]) == len(r.content)
            boundary = r.headers["content-type"].split("boundary=")[1].encode()
            parts = [p for p in r.content.split(b"--" + boundary) if p.strip() not in (b"", b"--")]
            assert [p.split(b"\r\n\r\n", 1)[1].removesuffix(b"\r\n") for p in parts] == [data[:10], data[20_000_000:]]
    assert reads == []


def test_a_client_hanging_up_mid_body_leaves_the_connection_and_blob_free(mirror: ServerThread, big: Blob) -> None:
    url = f"{mirror.url()}/v2/library/big/blobs/{big.digest}"
    assert httpx.get(url, timeout=60).content == big.path.read_bytes()
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", mirror.port)) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)  # the server blocks on a full socket
            sock.sendall(f"GET /v2/library/big/blobs/{big.digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    state = mirror.server.config.app.state.mirror
    deadline = time.monotonic() + 10
    while state.busy():  # a blob being served is never evicted: it must be let go
        assert time.monotonic() < deadline, state.busy()
        time.sleep(0.05)
    assert httpx.get(url, headers={"Range": "bytes=-100"}).content == big.path.read_bytes()[-100:]


def test_small_answers_keep_their_order_on_one_connection(mirror: ServerThread, registry: FakeRegistry) -> None:
    """Heads of small responses wait for their bodies: HEAD, 404, a small blob by sendfile and a
    manifest, pipelined on one connection, come back whole and in order."""
    tiny = write_blob(registry.directory, 3000, seed=72)
    registry.add_model("library/tiny", "latest", [tiny])
    base = f"{mirror.url()}/v2/library/tiny"
    manifest = httpx.get(f"{base}/manifests/latest", timeout=30)
    assert httpx.get(f"{base}/blobs/{tiny.digest}", timeout=30).content == tiny.path.read_bytes()  # fills it
    asks = [("HEAD", "manifests/latest"), ("GET", "manifests/nope:x:y"), ("GET", f"blobs/{tiny.digest}"),
            ("HEAD", f"blobs/{tiny.digest}"), ("GET", "manifests/latest")]
    with socket.create_connection(("127.0.0.1", mirror.port)) as sock:
        sock.sendall(b"".join(f"{m} /v2/library/tiny/{p} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for m, p in asks))
        stream = sock.makefile("rb")
        answers = []
        for method, _ in asks:
            status = stream.readline().split()[1]
            headers = {}
            while (line := stream.readline()) != b"\r\n":
                key, _, value = line.decode().partition(":")
                headers[key.strip().lower()] = value.strip()
            body = stream.read(int(headers["content-length"])) if method == "GET" else b""
            answers.append((int(status), body))
    assert [status for status, _ in answers] == [200, 400, 200, 200, 200]
    assert b"errors" in answers[1][1]
    assert answers[2][1] == tiny.path.read_bytes()
    assert answers[4][1] == manifest.content


def test_clients_that_hang_up_after_the_headers_are_routine(
    mirror: ServerThread, big: Blob, caplog: pytest.LogCaptureFixture
) -> None:
    """Ollama's resolving GET reads the headers and closes its side: no error in the log, and the
    bytes counted as served are those that left, not the blob's size each time."""
    url = f"{mirror.url()}/v2/library/big/blobs/{big.digest}"
    assert httpx.get(url, timeout=60).content == big.path.read_bytes()  # warm
    caplog.set_level(logging.ERROR)
    served_before = _served_bytes(mirror)
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", mirror.port)) as sock:
            sock.sendall(f"GET /v2/library/big/blobs/{big.digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            sock.shutdown(socket.SHUT_WR)  # FIN, as Go's client closes an unread body
    time.sleep(0.5)
    assert httpx.get(url, headers={"Range": "bytes=0-9"}).content == big.path.read_bytes()[:10]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors[:3]
    assert _served_bytes(mirror) - served_before < 10 * big.size  # 20 hang-ups never took 20 blobs


def _served_bytes(mirror: ServerThread) -> float:
    text = httpx.get(f"{mirror.url()}/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("ollama_mirror_served_bytes_total"))


def test_served_bytes_count_every_range_a_client_read_whole(mirror: ServerThread, big: Blob) -> None:
    """curl hangs up the moment its last byte arrives; the hang-up once cancelled the send still
    waiting on its sendfile call, and a whole range was counted as 0 bytes served."""
    url = f"{mirror.url()}/v2/library/big/blobs/{big.digest}"
    assert httpx.get(url, timeout=60).status_code == 200  # warm
    parts = 16
    step = -(-big.size // parts)
    for _ in range(6):
        before = _served(mirror)
        procs = [subprocess.Popen(["curl", "-s", "-o", "/dev/null", "-r", f"{a}-{min(a + step, big.size) - 1}", url])
                 for a in range(0, big.size, step)]
        assert [p.wait(60) for p in procs] == [0] * parts
        deadline = time.monotonic() + 5  # the access log counts a response when it ends
        while _served(mirror) - before < big.size and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _served(mirror) - before == big.size


def _served(mirror: ServerThread) -> float:
    text = httpx.get(f"{mirror.url()}/metrics").text
    return sum(float(v) for v in re.findall(r"^ollama_mirror_served_bytes_total\{[^}]*\} (\S+)$", text, re.M))


def test_a_client_gone_before_its_first_byte_is_no_error(mirror: ServerThread, registry: FakeRegistry, big: Blob,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """The head waits for the first byte of a cold blob; a client that leaves meanwhile was answered
    with a RuntimeError and a traceback in the log ("needs a started response") once the bytes came."""
    registry.cdn.faults.append(Fault("stall", after=0, seconds=2.0, times=64))
    with socket.create_connection(("127.0.0.1", mirror.port)) as sock:
        sock.sendall(f"GET /v2/library/big/blobs/{big.digest} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-99\r\n\r\n".encode())
        time.sleep(0.5)
    time.sleep(3.0)  # the first bytes land, and the held head would go out now
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
    r = httpx.get(f"{mirror.url()}/v2/library/big/blobs/{big.digest}", headers={"Range": "bytes=0-99"}, timeout=60)
    assert r.status_code == 206 and r.content == big.path.read_bytes()[:100]
