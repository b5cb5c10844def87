"""A mirror process killed or stopped mid-fill resumes from what it had, and never serves it unverified."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .fakes import FakeRegistry, MirrorProcess, assert_store_verified, write_blob

MB = 1_000_000


@pytest.fixture
def processes() -> Iterator[list[MirrorProcess]]:
    started: list[MirrorProcess] = []
    yield started
    for p in started:
        if p.process.poll() is None:
            p.process.kill()
            p.process.wait()


def _start_fill_and_wait_for_half(registry: FakeRegistry, mirror: MirrorProcess, digest: str, size: int) -> None:
    with httpx.stream("GET", f"{mirror.url}/v2/library/big/blobs/{digest}") as r:  # starts the fill
        assert r.status_code == 200
    deadline = time.monotonic() + 60
    while registry.cdn.bytes_by_digest.get(digest, 0) < size // 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill", "term"])
def test_fill_resumes_after_restart(registry: FakeRegistry, tmp_path: Path, processes: list[MirrorProcess],
                                    sig: int) -> None:
    blob = write_blob(registry.directory, 96 * MB, seed=31)
    registry.add_model("library/big", "latest", [blob])
    registry.cdn.rate = 1.5 * MB  # per connection: about 8 s for the whole blob on 8 connections
    cache = tmp_path / "cache"
    processes.append(first := MirrorProcess(cache, registry.url, "first"))
    _start_fill_and_wait_for_half(registry, first, blob.digest, blob.size)
    code = first.stop(sig)
    if sig == signal.SIGTERM:
        assert code in (0, -signal.SIGTERM), first.log.read_text()[-2000:]  # uvicorn re-raises the signal
        assert "fill paused" in first.log.read_text()
    final = cache / "blobs" / blob.digest.replace(":", "-")
    assert not final.exists()
    assert_store_verified(cache)
    before = registry.cdn.bytes_by_digest[blob.digest]

    registry.cdn.rate = None
    processes.append(second := MirrorProcess(cache, registry.url, "second"))
    r = httpx.get(f"{second.url}/v2/library/big/blobs/{blob.digest}", timeout=60)
    assert r.status_code == 200 and r.content == blob.path.read_bytes()
    after = registry.cdn.bytes_by_digest[blob.digest] - before
    assert after < 0.7 * blob.size, f"refetched {after} of {blob.size} bytes after restart"
    assert registry.cdn.bytes_by_digest[blob.digest] < 1.25 * blob.size
    assert "resumed=" in second.log.read_text()
    assert_store_verified(cache)
    assert not list((cache / ".mirror" / "staging").glob("*.data"))
