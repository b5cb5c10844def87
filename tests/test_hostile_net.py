"""Hostile clients on the network: slow loris, huge heads, bodies on GET, credentials that must go nowhere."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .fakes import FakeRegistry, MirrorProcess, wait_for_text, write_blob

HEAD_TIMEOUT = 2.0


@pytest.fixture
def guarded(registry: FakeRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MirrorProcess]:
    monkeypatch.setenv("OLLAMA_MIRROR_HEAD_TIMEOUT", str(HEAD_TIMEOUT))
    mirror = MirrorProcess(tmp_path / "cache", registry.url, "guarded")
    yield mirror
    mirror.stop(signal.SIGTERM)


def _address(mirror: MirrorProcess) -> tuple[str, int]:
    host, port = mirror.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def test_slow_loris_clients_are_dropped_and_do_not_starve_others(guarded: MirrorProcess) -> None:
    slow = []
    for _ in range(200):
        sock = socket.create_connection(_address(guarded), timeout=10)
        sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")  # and never the end of the head
        slow.append(sock)
    try:
        began = time.monotonic()
        with httpx.Client(timeout=5) as client:  # meanwhile a normal client is served at once
            assert client.get(guarded.url + "/v2/").status_code == 200
        assert time.monotonic() - began < 2
        for sock in slow[:20]:  # a trickle of header bytes does not buy more time
            sock.sendall(b"X-Slow: 1\r\n")
        time.sleep(HEAD_TIMEOUT + 1.5)
        closed = 0
        for sock in slow:
            sock.settimeout(5)
            try:
                data = sock.recv(4096)
            except (ConnectionResetError, TimeoutError):
                data = b""
            closed += data == b"" or data.startswith(b"HTTP/1.1 408")
        assert closed == len(slow)
    finally:
        for sock in slow:
            sock.close()
    wait_for_text(guarded.log, "request head incomplete")


def test_huge_request_head_is_refused_with_431(guarded: MirrorProcess) -> None:
    with socket.create_connection(_address(guarded), timeout=10) as sock:
        sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")
        try:
            for _ in range(64):  # 1 MiB of header, 16 KiB at a time
                sock.sendall(b"X-Big: " + b"a" * (16 << 10) + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused while still sending: what matters is what it answered
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 431")
    with httpx.Client(timeout=5) as client:
        assert client.get(guarded.url + "/v2/").status_code == 200  # still serving


def test_oversized_head_in_one_write_is_refused_with_431(guarded: MirrorProcess) -> None:
    """The whole head at once, just over the limit: it must not slip through because it was parsed in one read."""
    with socket.create_connection(_address(guarded), timeout=10) as sock:
        sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (70 << 10) + b"\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 431")


def test_body_on_a_get_is_ignored(registry: FakeRegistry, guarded: MirrorProcess) -> None:
    layer = write_blob(registry.directory, 10_000, seed=101)
    manifest = registry.add_model("library/body", "1", [layer])
    with httpx.Client(timeout=10) as client:
        got = client.request("GET", guarded.url + "/v2/library/body/manifests/1", content=b"x" * (1 << 20))
        assert got.status_code == 200 and got.content == manifest
        again = client.get(guarded.url + "/v2/library/body/manifests/1")  # the same connection still works
        assert again.content == manifest


def test_client_credentials_never_reach_upstream(registry: FakeRegistry, guarded: MirrorProcess) -> None:
    layer = write_blob(registry.directory, 100_000, seed=102)
    registry.add_model("library/creds", "1", [layer])
    secret = "Bearer client-secret-123"
    with httpx.Client(timeout=10, headers={"Authorization": secret}) as client:
        assert client.get(guarded.url + "/v2/library/creds/manifests/1").status_code == 200
        blob = client.get(guarded.url + f"/v2/library/creds/blobs/{layer.digest}")
        assert blob.content == layer.path.read_bytes()
    assert registry.requests and not registry.cdn.saw_authorization
    assert not any("client-secret" in value for value in registry.authorizations)
