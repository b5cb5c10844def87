"""Soak: 300 concurrent clients mixing every kind of request against a warm mirror, plus cold fills.

No errors, no leaked descriptors or tasks, RSS flat from the first part to the last.
``SOAK_SECONDS`` sets the length (CI: a few seconds; a few minutes for a real soak:
``SOAK_SECONDS=180 scripts/test -m soak -s``). Prints requests/s and p99.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import ssl
import statistics
import time
from pathlib import Path

import httpx
import pytest

from .fakes import Blob, FakeRegistry, MirrorProcess, write_blob

CLIENTS = 300
SECONDS = float(os.environ.get("SOAK_SECONDS", "8"))


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _gauge(text: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


class Load:
    def __init__(self, base: str, warm: list[Blob], cold: list[Blob]) -> None:
        self.base, self.warm, self.cold_blobs = base, warm, cold
        self.latencies: list[float] = []
        self.manifest_latencies: list[float] = []
        self.errors: list[str] = []
        self.kinds: dict[str, int] = {}

    async def client(self, http: httpx.AsyncClient, deadline: float, rng: random.Random) -> None:
        while time.monotonic() < deadline:
            kind = rng.choices(["manifest", "head", "blob", "range", "hangup", "cold"], [40, 20, 10, 22, 7, 1])[0]
            began = time.monotonic()
            try:
                await getattr(self, kind)(http, rng)
            except (httpx.HTTPError, AssertionError) as exc:
                self.errors.append(f"{kind}: {type(exc).__name__} {exc}"[:300])
            self.latencies.append(time.monotonic() - began)
            if kind == "manifest":
                self.manifest_latencies.append(self.latencies[-1])
            self.kinds[kind] = self.kinds.get(kind, 0) + 1

    async def manifest(self, http: httpx.AsyncClient, rng: random.Random) -> None:
        response = await http.get("/v2/library/soak/manifests/1")
        assert response.status_code == 200, response.status_code

    async def head(self, http: httpx.AsyncClient, rng: random.Random) -> None:
        blob = rng.choice(self.warm)
        response = await http.head(f"/v2/library/soak/blobs/{blob.digest}")
        assert response.status_code == 200 and int(response.headers["content-length"]) == blob.size

    async def blob(self, http: httpx.AsyncClient, rng: random.Random) -> None:
        blob = rng.choice(self.warm)
        response = await http.get(f"/v2/library/soak/blobs/{blob.digest}")
        assert response.status_code == 200 and len(response.content) == blob.size

    async def range(self, http: httpx.AsyncClient, rng: random.Random) -> None:
        blob = rng.choice(self.warm)
        start = rng.randrange(blob.size)
        stop = min(start + rng.randrange(1, 256 << 10), blob.size)
        response = await http.get(f"/v2/library/soak/blobs/{blob.digest}",
                                  headers={"Range": f"bytes={start}-{stop - 1}"})
        assert response.status_code == 206 and len(response.content) == stop - start

    async def hangup(self, http: httpx.AsyncClient, rng: random.Random) -> None:
        """Read a little of a blob and drop the connection, as a killed client does."""
        blob = rng.choice(self.warm)
        async with http.stream("GET", f"/v2/library/soak/blobs/{blob.digest}") as response:
            assert response.status_code == 200
            async for _ in response.aiter_raw(64 << 10):
                break

    async def cold(self, http: httpx.AsyncClient, rng: random.Random) -> None:
        blob = rng.choice(self.cold_blobs)
        response = await http.get(f"/v2/library/cold/blobs/{blob.digest}")
        assert response.status_code == 200 and len(response.content) == blob.size


async def _run(load: Load, seconds: float) -> None:
    """Each simulated client has its own connection, as separate machines do (one shared httpx
    pool of 300 connections slows to tens of requests/s on its own bookkeeping)."""
    deadline = time.monotonic() + seconds
    tls = ssl.create_default_context()  # loaded once: per client it costs 20 ms of CPU (plain http needs none)

    async def one(i: int) -> None:
        async with httpx.AsyncClient(base_url=load.base, timeout=60, verify=tls,
                                     limits=httpx.Limits(max_connections=1)) as http:
            await load.client(http, deadline, random.Random(i))

    await asyncio.gather(*(one(i) for i in range(CLIENTS)))


@pytest.mark.soak
def test_soak_300_clients_no_errors_no_leaks_flat_memory(registry: FakeRegistry, tmp_path: Path) -> None:
    warm = [write_blob(registry.directory, size, seed=120 + i) for i, size in enumerate((4_000_000, 1_000_000))]
    cold = [write_blob(registry.directory, 2_000_000, seed=130 + i) for i in range(4)]
    registry.add_model("library/soak", "1", warm)
    registry.add_model("library/cold", "1", cold)
    mirror = MirrorProcess(tmp_path / "cache", registry.url, "soak")
    try:
        pid = mirror.process.pid
        warmup = Load(mirror.url, warm, cold)
        asyncio.run(_run(warmup, 1.0))  # connections and caches up, before the baseline
        with httpx.Client(timeout=10) as client:
            tasks_before = _gauge(client.get(mirror.url + "/metrics").text, "ollama_mirror_event_loop_tasks")
        fds_before = _fds(pid)

        load = Load(mirror.url, warm, cold)
        rss: list[float] = []

        async def sample() -> None:
            while True:
                rss.append(_rss_mb(pid))
                await asyncio.sleep(0.5)

        async def soak() -> None:
            sampler = asyncio.ensure_future(sample())
            try:
                await _run(load, SECONDS)
            finally:
                sampler.cancel()

        began, cpu_began = time.monotonic(), _cpu_seconds(pid)
        asyncio.run(soak())
        elapsed, cpu = time.monotonic() - began, _cpu_seconds(pid) - cpu_began
        time.sleep(1.5)  # the server finishes what the hung-up clients left behind
        with httpx.Client(timeout=10) as client:
            tasks_after = _gauge(client.get(mirror.url + "/metrics").text, "ollama_mirror_event_loop_tasks")
        fds_after = _fds(pid)
    finally:
        assert mirror.stop(signal.SIGTERM) == 0

    requests = len(load.latencies)
    p99 = statistics.quantiles(load.latencies, n=100)[98]
    p99_manifest = statistics.quantiles(load.manifest_latencies, n=100)[98]
    third = max(len(rss) // 3, 1)
    first, last = statistics.median(rss[:third]), statistics.median(rss[-third:])
    print(f"\nsoak: {CLIENTS} clients, {elapsed:.0f} s, {requests / elapsed:.0f} requests/s, p99 {p99 * 1000:.0f} ms (manifests "
          f"{p99_manifest * 1000:.0f} ms), "
          f"RSS {first:.0f} -> {last:.0f} MB (peak {max(rss):.0f}), fds {fds_before} -> {fds_after}, "
          f"tasks {tasks_before:.0f} -> {tasks_after:.0f}, mirror CPU {cpu / elapsed:.0%}, mix {load.kinds}")
    print("rss samples", [round(r) for r in rss[::10]])
    assert not load.errors, load.errors[:10]
    assert fds_after <= fds_before + 5
    assert tasks_after <= tasks_before + 5
    assert last <= first * 1.2 + 15, (first, last)
    assert load.kinds.get("cold", 0) > 0 and load.kinds.get("hangup", 0) > 0
    assert all(registry.cdn.bytes_by_digest.get(b.digest, 0) <= b.size * 1.05 for b in cold)  # one fill each
