"""A mirror process killed or stopped mid-fill resumes from what it had, and never serves it unverified."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .fakes import FakeRegistry, MirrorProcess, assert_store_verified, wait_for_text, write_blob

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
    wait_for_text(second.log, "resumed=")
    assert_store_verified(cache)
    assert not list((cache / ".mirror" / "staging").glob("*.data"))


def test_sigterm_with_a_client_mid_stream_pauses_the_fill_at_once(
    registry: FakeRegistry, tmp_path: Path, processes: list[MirrorProcess]
) -> None:
    """A client following a slow fill must not hold ``systemctl stop`` open until the
    fill ends: the fill pauses with its progress saved and the client's stream is cut."""
    blob = write_blob(registry.directory, 64 * MB, seed=33)
    registry.add_model("library/big", "latest", [blob])
    registry.cdn.rate = 0.5 * MB  # the fill would take about 16 s on 8 connections
    processes.append(mirror := MirrorProcess(tmp_path / "cache", registry.url, "first"))
    received = 0
    with httpx.stream("GET", f"{mirror.url}/v2/library/big/blobs/{blob.digest}", timeout=30) as r:
        assert r.status_code == 200
        chunks = r.iter_raw()
        while received < 4 * MB:
            received += len(next(chunks))
        started = time.monotonic()
        mirror.process.send_signal(signal.SIGTERM)
        with pytest.raises(httpx.HTTPError):  # the body ends short: the client knows to retry
            for chunk in chunks:
                received += len(chunk)
        assert mirror.process.wait(30) == 0
    took = time.monotonic() - started
    assert took < 5, f"stop took {took:.1f} s with a client following the fill"
    assert received < blob.size
    log = mirror.log.read_text()
    assert "fill paused" in log and "fill done" not in log, log[-2000:]


def test_sigkill_at_random_moments_of_fills_manifest_writes_and_evictions(
    registry: FakeRegistry, tmp_path: Path, processes: list[MirrorProcess]
) -> None:
    """Tags move, fills run and eviction works all the time; a SIGKILL at a random moment of
    it, five times over, never leaves anything unverified or half-written under a final name."""
    import random
    import threading

    rng = random.Random(7)
    served: set[bytes] = set()  # every manifest the registry ever answered
    blobs = [write_blob(registry.directory, 700_000 + 1000 * i, seed=140 + i) for i in range(8)]

    def retag() -> None:
        for model in ("a", "b", "c"):
            served.add(registry.add_model(f"library/{model}", "latest", rng.sample(blobs, 2)))

    retag()
    cache = tmp_path / "cache"
    stop = threading.Event()

    def clients(url: str) -> None:
        with httpx.Client(base_url=url, timeout=10) as client:
            while not stop.is_set():
                try:
                    retag()  # the tags move upstream: new manifests get written
                    for model in ("a", "b", "c"):
                        manifest = client.get(f"/v2/library/{model}/manifests/latest")
                        if manifest.status_code != 200:
                            continue
                        for layer in manifest.json()["layers"]:
                            client.get(f"/v2/library/{model}/blobs/{layer['digest']}")
                except httpx.HTTPError:
                    pass  # the server is being killed under it

    for _ in range(5):
        mirror = MirrorProcess(cache, registry.url, "chaos", "--max-size", "2000000", "--manifest-ttl", "0")
        processes.append(mirror)
        stop.clear()
        worker = threading.Thread(target=clients, args=(mirror.url,), daemon=True)
        worker.start()
        time.sleep(rng.uniform(0.3, 1.5))
        mirror.process.kill()
        mirror.process.wait()
        stop.set()
        worker.join(15)
        assert_store_verified(cache)
        for path in (cache / "manifests").rglob("*"):
            assert not path.is_file() or path.read_bytes() in served, path  # whole, never torn
        assert not [p for p in (cache / "blobs").iterdir() if not p.name.startswith("sha256-")]

    final = MirrorProcess(cache, registry.url, "after", "--manifest-ttl", "0")  # and it still serves
    processes.append(final)
    with httpx.Client(base_url=final.url, timeout=30) as client:
        manifest = client.get("/v2/library/a/manifests/latest")
        assert manifest.status_code == 200
        for layer in manifest.json()["layers"]:
            blob = next(b for b in blobs if b.digest == layer["digest"])
            assert client.get(f"/v2/library/a/blobs/{blob.digest}").content == blob.path.read_bytes()
    final.stop(signal.SIGTERM)
    assert "evicted" in "".join(p.log.read_text() for p in processes)  # eviction did run in between
