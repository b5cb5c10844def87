"""No byte ever reaches a descriptor it was not meant for.

The stress that found it: Ollama-like clients that read a blob GET's headers and hang up, Range
readers on kept-alive and fresh connections checking every byte (and that nothing arrives while
their connection is idle), and cold fills opening staging files beside them. A worker thread that
took a sendfile job is slowed before its system call, as a busy GIL on two cores slows it: if the
cancelled response let go of a descriptor number in that window, the next accept or open reuses
it and the blob bytes land on another client's connection, or in a file of the store.
"""

from __future__ import annotations

import os
import random
import select
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import MirrorFactory
from .fakes import Blob, FakeRegistry, assert_store_verified, write_blob

SECONDS = float(os.environ.get("CROSSTALK_SECONDS", "12"))


class Connection:
    """One HTTP/1.1 client connection that reads responses exactly and notices stray bytes."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> None:
        data = self.sock.recv(1 << 20)
        if not data:
            raise EOFError("connection closed by the mirror")
        self.buffer += data

    def _take(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self._fill()
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def request(self, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        lines = [f"GET {path} HTTP/1.1", "Host: mirror", *(f"{k}: {v}" for k, v in headers.items())]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        if not status_line.startswith("HTTP/1.1 "):
            raise AssertionError(f"not a status line: {status_line[:60]!r}")
        fields = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
        return int(status_line.split()[1]), fields, self._take(int(fields["content-length"]))

    def assert_idle(self) -> None:
        """Nothing may arrive on a kept-alive connection between responses."""
        if self.buffer:
            raise AssertionError(f"{len(self.buffer)} stray bytes after a response: {self.buffer[:40]!r}")
        if select.select([self.sock], [], [], 0.003)[0]:
            data = self.sock.recv(64, socket.MSG_PEEK)
            if data:
                raise AssertionError(f"bytes on an idle connection: {data[:40]!r}")


def _resolver(port: int, paths: list[str], stop: threading.Event, counts: dict[str, int]) -> None:
    """Ollama's resolving GET: no Range, read the head, hang up."""
    while not stop.is_set():
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            sock.sendall(f"GET {random.choice(paths)} HTTP/1.1\r\nHost: mirror\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                data = sock.recv(4096)
                if not data:
                    break
                head += data
            if not head.startswith(b"HTTP/1.1 200"):
                raise AssertionError(f"resolving GET answered {head[:60]!r}")
        counts["resolves"] += 1


def _range_reader(port: int, blobs: dict[str, bytes], stop: threading.Event, counts: dict[str, int]) -> None:
    """Random ranges of warm blobs on kept-alive connections, a fresh one every few requests."""
    paths = list(blobs)
    conn = Connection(port)
    try:
        while not stop.is_set():
            path = random.choice(paths)
            data = blobs[path]
            start = random.randrange(len(data))
            stop_at = min(len(data), start + random.choice([1, 100, 70_000, 1 << 20, 6 << 20]))
            status, _, body = conn.request(path, {"Range": f"bytes={start}-{stop_at - 1}"})
            if status != 206 or body != data[start:stop_at]:
                raise AssertionError(f"{path} bytes={start}-{stop_at - 1}: status {status}, wrong bytes")
            counts["ranges"] += 1
            counts["bytes"] += len(body)
            conn.assert_idle()
            if random.random() < 0.3:
                conn.close()
                conn = Connection(port)
    finally:
        conn.close()


def _filler(port: int, cold: list[tuple[str, bytes]], stop: threading.Event, counts: dict[str, int]) -> None:
    """Cold blobs, whole: each fill opens a staging file, taking descriptor numbers as it goes."""
    for path, data in cold:
        if stop.is_set():
            return
        conn = Connection(port)
        try:
            status, _, body = conn.request(path, {})
            if status != 200 or body != data:
                raise AssertionError(f"cold {path}: status {status}, wrong bytes")
            counts["fills"] += 1
            counts["bytes"] += len(body)
        finally:
            conn.close()


def _run_all(workers: list[Callable[[], None]], seconds: float, stop: threading.Event) -> list[BaseException]:
    errors: list[BaseException] = []

    def guarded(work: Callable[[], None]) -> None:
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - reported below, with the others
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=guarded, args=(w,), daemon=True) for w in workers]
    for t in threads:
        t.start()
    stop.wait(seconds)
    stop.set()
    for t in threads:
        t.join(60)
    return errors


@pytest.fixture
def slow_sendfile_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker thread that took a sendfile job waits a moment before the system call, as it
    does when the GIL is busy; the window in which a cancelled response must not let go."""
    real = os.sendfile

    def late(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        time.sleep(random.uniform(0, 0.004))
        return real(out_fd, in_fd, offset, count)

    monkeypatch.setattr(os, "sendfile", late)


def test_no_bytes_reach_another_connection_or_file(
    registry: FakeRegistry, start_mirror: MirrorFactory, tmp_path: Path, slow_sendfile_threads: None
) -> None:
    warm = [write_blob(registry.directory, size, seed=900 + i)
            for i, size in enumerate([3000, 200_000, 8_000_000, 24_000_000])]
    cold = [write_blob(registry.directory, 3_000_000, seed=950 + i) for i in range(40)]
    registry.add_model("library/warm", "1", list(warm))
    registry.add_model("library/cold", "1", list(cold))
    mirror = start_mirror()

    def path(blob: Blob, model: str) -> str:
        return f"/v2/library/{model}/blobs/{blob.digest}"

    blobs = {path(b, "warm"): b.path.read_bytes() for b in warm}
    for p, data in blobs.items():  # warm them
        conn = Connection(mirror.port)
        assert conn.request(p, {})[2] == data
        conn.close()
    counts = {"resolves": 0, "ranges": 0, "fills": 0, "bytes": 0}
    stop = threading.Event()
    big = [path(b, "warm") for b in warm if b.size > 1_000_000]
    cold_items = [(path(b, "cold"), b.path.read_bytes()) for b in cold]
    workers: list[Callable[[], None]] = []
    workers += [lambda: _resolver(mirror.port, big, stop, counts) for _ in range(4)]
    workers += [lambda: _range_reader(mirror.port, blobs, stop, counts) for _ in range(3)]
    workers += [lambda: _filler(mirror.port, cold_items, stop, counts)]
    errors = _run_all(workers, SECONDS, stop)
    print(f"crosstalk stress: {counts}")
    assert not errors, f"{len(errors)} clients saw wrong bytes; first: {errors[0]!r} (after {counts})"
    assert counts["resolves"] > 100 and counts["ranges"] > 100, counts
    assert_store_verified(tmp_path / "cache")
