"""Benchmarks against peers, in one run, reported as ratios.

    .venv/bin/python -m bench            # full: 1 GB cold fills, 2 GB memory run, 3 repetitions
    .venv/bin/python -m bench --quick    # small blobs, one repetition (CI's smoke test)

Everything listens on 127.0.0.1 and stops by itself. The upstream for cold fills is
the test suite's fake registry, redirecting blob GETs to nginx on another port whose
connections are rate-limited (like a far-away CDN). Prints a table (median, min, max)
and writes the figures to a JSON file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvloop

from mirror.upstream import BlobLocation, Upstream
from tests.fakes import FakeCDN, FakeRegistry, MirrorProcess, ServerThread, write_blob

from .peers import (
    DockerRegistry,
    Nginx,
    aria2c,
    cpu_seconds,
    curl,
    curl_ranges,
    ensure_tools,
    work_dir,
    wrk,
)

MB = 1_000_000


@dataclass
class Profile:
    cold_size: int
    memory_sizes: tuple[int, int]
    warm_size: int
    repeat: int
    rate: int  # CDN bytes per second per connection
    wrk_seconds: int
    settle: float  # seconds before the dd write: see _dd


FULL = Profile(cold_size=1000 * MB, memory_sizes=(500 * MB, 2000 * MB), warm_size=2000 * MB, repeat=3,
               rate=25 * MB, wrk_seconds=10, settle=10.0)
QUICK = Profile(cold_size=64 * MB, memory_sizes=(32 * MB, 128 * MB), warm_size=128 * MB, repeat=1,
                rate=25 * MB, wrk_seconds=2, settle=0.0)


class Bench:
    def __init__(self, work: Path, profile: Profile) -> None:
        self.work, self.p = work, profile
        self.files = work / "files"  # nginx serves these as /objects/sha256:<hex>
        self.files.mkdir()
        self.cdn_table = FakeCDN()  # only its blob table and tokens: nginx serves the bytes
        self.nginx = Nginx(work, self.files, profile.rate)
        self.registry = FakeRegistry(self.cdn_table, self.nginx.cdn_url, self.files)
        self.registry_server = ServerThread(self.registry).start()
        self.registry.url = self.registry_server.url()
        self.results: dict[str, dict[str, object]] = {}
        self._mirrors: list[MirrorProcess] = []

    def close(self) -> None:
        for mirror in self._mirrors:
            if mirror.process.poll() is None:
                mirror.process.kill()
        if hasattr(self, "_plain"):
            self._plain.stop()
        self.registry_server.stop()
        self.nginx.stop()

    # -- helpers --------------------------------------------------------------

    def model(self, size: int, seed: int) -> tuple[str, str]:
        """A model of one blob of ``size`` bytes; returns (name, digest)."""
        blob = write_blob(self.files, size, seed)
        os.link(blob.path, self.files / blob.digest)  # the URL nginx serves: /objects/sha256:<hex>
        name = f"library/bench{seed}"
        self.registry.add_model(name, "latest", [blob])
        return name, blob.digest

    def mirror(self, *extra: str, upstream: str | None = None, kind: type[MirrorProcess] = MirrorProcess
               ) -> MirrorProcess:
        cache = self.work / f"mirror{len(self._mirrors) + 1}" / "cache"
        cache.parent.mkdir()
        mirror = kind(cache, upstream or self.registry.url, "run", *extra)
        self._mirrors.append(mirror)
        return mirror

    def retire(self, mirror: MirrorProcess) -> None:
        """Stop a mirror and delete its cache: blobs left in the page cache would crowd the later
        scenarios' fills (and their peers') into reclaiming memory."""
        mirror.stop(15)
        shutil.rmtree(mirror.log.parent / "cache", ignore_errors=True)

    def record(self, key: str, samples: list[float], unit: str, **extra: object) -> None:
        self.results[key] = {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
                             "unit": unit, "samples": samples, **extra}

    def repeat(self, fn: Callable[[], float]) -> list[float]:
        return [fn() for _ in range(self.p.repeat)]

    # -- scenarios ------------------------------------------------------------

    def warm_serving(self) -> None:
        """1 and 2: one stream, and 16 concurrent ranges covering the blob, vs nginx on the same file."""
        name, digest = self.model(self.p.warm_size, seed=1)
        mirror = self.mirror()
        blob_url = f"{mirror.url}/v2/{name}/blobs/{digest}"
        curl(blob_url)  # fill it
        nginx_url = f"{self.nginx.plain_url}/objects/{digest}"
        curl(nginx_url)  # page cache warm for both
        self.record("1_warm_one_stream_mirror", self.repeat(lambda: curl(blob_url)["speed"] / MB), "MB/s")
        self.record("1_warm_one_stream_nginx", self.repeat(lambda: curl(nginx_url)["speed"] / MB), "MB/s")
        size = self.p.warm_size
        self.record("2_warm_16_ranges_mirror", self.repeat(lambda: curl_ranges(blob_url, size, 16)), "MB/s")
        self.record("2_warm_16_ranges_nginx", self.repeat(lambda: curl_ranges(nginx_url, size, 16)), "MB/s")
        self.manifests(mirror, name, "mirror")
        self.retire(mirror)
        variant = self.mirror(kind=_HeadNotHeld)  # what the held head buys, measured beside it
        self.manifests(variant, name, "head_not_held")
        self.retire(variant)

    def manifests(self, mirror: MirrorProcess, name: str, label: str) -> None:
        """5: warm manifest GETs with keep-alive, 300 connections."""
        url = f"{mirror.url}/v2/{name}/manifests/latest"
        httpx.get(url)
        samples = [wrk(url, 300, self.p.wrk_seconds) for _ in range(self.p.repeat)]
        self.record(f"5_manifest_rps_{label}", [s["rps"] for s in samples], "req/s")
        self.record(f"5_manifest_p99_{label}", [s["p99_ms"] for s in samples], "ms")

    def cold_fill(self) -> None:
        """3: a cold blob through the rate-limited CDN, vs aria2c -x16 and curl straight from the CDN."""
        name, digest = self.model(self.p.cold_size, seed=2)
        cdn_url = f"{self.nginx.cdn_url}/objects/{digest}"
        dest = self.work / "download"

        def via_mirror() -> float:
            mirror = self.mirror()
            try:
                result = curl(f"{mirror.url}/v2/{name}/blobs/{digest}")
                assert result["bytes"] == self.p.cold_size, result
                return result["total"]
            finally:
                self.retire(mirror)

        self.record("3_cold_mirror", self.repeat(via_mirror), "s")
        self.record("3_cold_aria2c_x16", self.repeat(lambda: aria2c(cdn_url, dest, connections=16)), "s")
        self.record("3_cold_curl_single", self.repeat(lambda: curl(cdn_url)["total"]), "s")
        self.record("3_cold_ttfb_at_90pct", self.repeat(lambda: self._ttfb_at_90(name, digest)), "s")

    def _ttfb_at_90(self, name: str, digest: str) -> float:
        """The Ollama pattern: the fill starts from offset 0, then a part asks for 90% in."""
        mirror = self.mirror()
        url = f"{mirror.url}/v2/{name}/blobs/{digest}"
        starter = subprocess.Popen(["curl", "-s", "-o", "/dev/null", url])  # cut short when the mirror stops
        try:
            time.sleep(1.0)
            start = int(self.p.cold_size * 0.9)
            began = time.monotonic()  # to the first body byte: what Ollama's stall timer counts
            with httpx.stream("GET", url, headers={"Range": f"bytes={start}-{start + 10 * MB - 1}"},
                              timeout=120) as r:
                next(r.iter_raw(1))
                return time.monotonic() - began
        finally:
            self.retire(mirror)
            starter.kill()
            starter.wait()

    def coalescing(self) -> None:
        """4: ten clients on one cold blob: upstream bytes, and time against one client alone."""
        name, digest = self.model(self.p.cold_size, seed=3)

        def ten() -> float:
            before = self.nginx.bytes_sent(digest)
            mirror = self.mirror()
            try:
                url = f"{mirror.url}/v2/{name}/blobs/{digest}"
                began = time.monotonic()
                with ThreadPoolExecutor(10) as pool:
                    results = list(pool.map(lambda _: curl(url), range(10)))
                elapsed = time.monotonic() - began
                assert all(r["bytes"] == self.p.cold_size for r in results), results
            finally:
                self.retire(mirror)
            ratios.append((self.nginx.bytes_sent(digest) - before) / self.p.cold_size)
            return elapsed

        ratios: list[float] = []
        self.record("4_ten_clients_all_done", self.repeat(ten), "s")
        self.record("4_ten_clients_upstream_bytes", ratios, "x blob")

    def memory(self) -> None:
        """6: peak RSS while filling a blob and serving 16 range streams, at two blob sizes."""
        for size in self.p.memory_sizes:
            name, digest = self.model(size, seed=10 + size // MB)

            def run() -> float:
                mirror = self.mirror(upstream=self._plain_registry())
                try:
                    url = f"{mirror.url}/v2/{name}/blobs/{digest}"
                    curl_ranges(url, size, 16)
                    return _peak_rss(mirror.process.pid) / MB
                finally:
                    self.retire(mirror)

            self.record(f"6_peak_rss_{size // MB}MB_blob", self.repeat(run), "MB")

    def upstream_speed(self) -> None:
        """7: a cold fill from an unthrottled local nginx: is the upstream client the bottleneck?

        Beside the fill, two of its parts are measured alone in the same run: the mirror's own
        upstream client fetching the blob with as many ranges (bytes dropped), and writing as many
        bytes into a new file (dd), which the fill must also do before it can hash and serve them.
        """
        size = self.p.memory_sizes[1]
        name, digest = self.model(size, seed=4)

        latencies: list[float] = []
        cores: list[float] = []

        def run() -> float:
            mirror = self.mirror(upstream=self._plain_registry())
            try:
                first, *cold = self._cold_tags(name)
                httpx.get(f"{mirror.url}/v2/{first}", timeout=30).raise_for_status()  # its upstream connection made
                cpu_before = cpu_seconds(mirror.process.pid)
                with ThreadPoolExecutor(1) as pool:
                    fill = pool.submit(curl, f"{mirror.url}/v2/{name}/blobs/{digest}")
                    latencies.extend(_cold_manifests_while(fill, mirror.url, cold))
                    result = fill.result()
                cores.append((cpu_seconds(mirror.process.pid) - cpu_before) / result["total"])
                return size / result["total"] / MB
            finally:
                self.retire(mirror)

        self.record("7_cold_fill_unthrottled_mirror", self.repeat(run), "MB/s")
        self.record("7_cold_manifest_ms_during_fill_p99", [_p99(latencies)], "ms", samples_n=len(latencies))
        self.record("7_mirror_cores_during_fill", cores, "cores")
        dest = self.work / "download"
        url = f"{self.nginx.plain_url}/objects/{digest}"
        self.record("7_cold_fill_unthrottled_aria2c_x8", self.repeat(lambda: size / aria2c(url, dest) / MB), "MB/s")
        self.record("7_upstream_client_alone", self.repeat(lambda: size / _upstream_alone(url, size) / MB), "MB/s")
        self.record("7_new_file_write_dd", self.repeat(lambda: size / _dd(dest, size, self.p.settle) / MB), "MB/s")

    def _cold_tags(self, name: str) -> list[str]:
        """Tags of ``name`` no mirror has seen yet, each a cold manifest."""
        manifest = self.registry.manifests[(name, "latest")]
        start = len(self.registry.manifests)
        tags = [f"cold{start + i}" for i in range(400)]
        for tag in tags:
            self.registry.manifests[(name, tag)] = manifest
        return [f"{name}/manifests/{tag}" for tag in tags]

    def _plain_registry(self) -> str:
        """A second registry whose redirects go to the unthrottled nginx."""
        if not hasattr(self, "_plain"):
            plain = FakeRegistry(self.cdn_table, self.nginx.plain_url.replace("127.0.0.1", "localhost"), self.files)
            plain.manifests = self.registry.manifests
            self._plain = ServerThread(plain).start()
        return self._plain.url()

    def docker_registry(self) -> None:
        """The generic pull-through cache, with an Ollama-style upstream: what works, what does not."""
        name, digest = self.model(8 * MB, seed=5)
        outcome: dict[str, object] = {}
        try:
            peer = DockerRegistry(self.work, self.registry.url)
        except (OSError, RuntimeError) as exc:
            self.results["docker_registry"] = {"error": f"did not start: {exc}"}
            return
        try:
            r = httpx.get(f"{peer.url}/v2/{name}/manifests/latest",
                          headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"}, timeout=30)
            outcome["manifest"] = f"{r.status_code} {r.text[:200]}"
            r = httpx.get(f"{peer.url}/v2/{name}/blobs/{digest}", headers={"Range": "bytes=1000-1999"}, timeout=60)
            outcome["cold_range"] = f"{r.status_code}, {len(r.content)} bytes for 1000 asked"
        finally:
            peer.stop()
        outcome["log_tail"] = peer.log.read_text()[-500:]
        self.results["docker_registry"] = outcome


class _HeadNotHeld(MirrorProcess):
    """The mirror with mirror/zerocopy.py's held head turned off: each small response's head and
    body leave in two writes, as uvicorn writes them."""

    command = ["-c", "import sys; import mirror.zerocopy as z; z.SMALL = -1; "
                     "from mirror.cli import main; main(sys.argv[1:])"]


def _cold_manifests_while(fill: object, base: str, paths: list[str]) -> list[float]:
    """Milliseconds of each cold manifest GET asked (one at a time, 20 a second) while ``fill`` runs."""
    latencies = []
    with httpx.Client(timeout=30) as client:
        for path in paths:
            if fill.done():  # type: ignore[attr-defined]
                break
            began = time.monotonic()
            client.get(f"{base}/v2/{path}").raise_for_status()
            latencies.append((time.monotonic() - began) * 1000)
            time.sleep(0.05)
    return latencies


def _p99(samples: list[float]) -> float:
    ordered = sorted(samples) or [float("nan")]
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def _upstream_alone(url: str, size: int, connections: int = 8) -> float:
    """Seconds for the mirror's upstream client (httpx as the mirror sets it up, on uvloop) to
    fetch ``url`` in 16 MiB ranges over ``connections`` streams, dropping the bytes."""
    chunk = 16 << 20
    starts = list(range(0, size, chunk))

    async def fetch() -> float:
        upstream, location, got = Upstream(url), BlobLocation(url=url), 0

        async def worker() -> None:
            nonlocal got
            while starts:
                start = starts.pop(0)
                async with upstream.open_range(location, start, min(start + chunk, size), size) as body:
                    async for piece in body:
                        got += len(piece)

        began = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.monotonic() - began
        await upstream.aclose()
        assert got == size, (got, size)
        return elapsed

    return uvloop.run(fetch())


def _dd(path: Path, size: int, settle: float) -> float:
    """Seconds to write ``size`` bytes into a new file, as a fill writes its staging file.

    It waits first: memory freed moments ago is fast to reuse, but on this VM freed pages go
    back to the host within seconds (virtio-balloon free page reporting), and the first write
    to each page then costs a fault in the host: 2 GB went in at about 750 MB/s that way,
    against 5 GB/s into pages just freed. A fill of a new blob mostly writes the former."""
    path.unlink(missing_ok=True)
    time.sleep(settle)
    began = time.monotonic()
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={size}", "iflag=count_bytes", "status=none"],
                   check=True)
    elapsed = time.monotonic() - began
    path.unlink()
    return elapsed


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _ratio(results: dict[str, dict[str, object]], a: str, b: str) -> float:
    return float(results[a]["median"]) / float(results[b]["median"])  # type: ignore[arg-type]


def summarize(results: dict[str, dict[str, object]]) -> dict[str, dict[str, object]]:
    """Each issue target as a ratio of medians measured in the same run."""
    r = results
    targets = {
        "1 warm one stream / nginx": (_ratio(r, "1_warm_one_stream_mirror", "1_warm_one_stream_nginx"), ">= 0.9"),
        "2 warm 16 ranges / nginx": (_ratio(r, "2_warm_16_ranges_mirror", "2_warm_16_ranges_nginx"), ">= 0.85"),
        "3 cold time / aria2c -x16": (_ratio(r, "3_cold_mirror", "3_cold_aria2c_x16"), "<= 1.0"),
        "3 curl single time / cold": (_ratio(r, "3_cold_curl_single", "3_cold_mirror"), ">= 5"),
        "3 ttfb at 90% (s)": (float(r["3_cold_ttfb_at_90pct"]["median"]), "seconds, < 30"),  # type: ignore[arg-type]
        "4 upstream bytes / blob": (float(r["4_ten_clients_upstream_bytes"]["median"]), "<= 1.02"),  # type: ignore
        "4 ten clients / one client": (_ratio(r, "4_ten_clients_all_done", "3_cold_mirror"), "<= 1.2"),
        "5 manifest p99 (ms)": (float(r["5_manifest_p99_mirror"]["median"]), "< 100"),  # type: ignore[arg-type]
        "5 manifest req/s, held head / not held": (_ratio(r, "5_manifest_rps_mirror", "5_manifest_rps_head_not_held"),
                                                    "> 1 keeps mirror/zerocopy.py's held head"),
        "7 unthrottled fill MB/s": (float(r["7_cold_fill_unthrottled_mirror"]["median"]), ">= 600"),  # type: ignore
        "7 upstream client alone MB/s": (float(r["7_upstream_client_alone"]["median"]), ">= 600 (not the limit)"),  # type: ignore
        "7 fill / aria2c -x8": (_ratio(r, "7_cold_fill_unthrottled_mirror", "7_cold_fill_unthrottled_aria2c_x8"), ">= 1.0"),
        "7 cold manifest p99 during the fill (ms)": (float(r["7_cold_manifest_ms_during_fill_p99"]["median"]), "< 100"),  # type: ignore
        "7 mirror cores busy during the fill": (float(r["7_mirror_cores_during_fill"]["median"]), "> 1: more than one core"),  # type: ignore
        "7 new-file write, dd MB/s": (float(r["7_new_file_write_dd"]["median"]), "context: the write ceiling"),  # type: ignore
    }
    sizes = sorted(k for k in r if k.startswith("6_peak_rss_"))
    if len(sizes) == 2:
        big = max(sizes, key=lambda k: int(k.split("_")[3].removesuffix("MB")))
        small = min(sizes, key=lambda k: int(k.split("_")[3].removesuffix("MB")))
        targets["6 peak RSS MB (big blob)"] = (float(r[big]["median"]), "<= 150")  # type: ignore[arg-type]
        targets["6 RSS big / small blob"] = (_ratio(r, big, small), "~1 (flat)")
    return {k: {"value": round(v, 3), "target": t} for k, (v, t) in targets.items()}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--quick", action="store_true", help="small blobs, one repetition (CI smoke test)")
    parser.add_argument("--out", default="bench-results.json")
    parser.add_argument("--only", action="append", default=[], metavar="SCENARIO",
                        help="run just these scenarios (warm_serving, cold_fill, coalescing, memory, "
                             "upstream_speed, docker_registry); repeatable")
    args = parser.parse_args()
    ensure_tools()
    profile = QUICK if args.quick else FULL
    with work_dir("ollama-mirror-bench-") as work:
        bench = Bench(work, profile)
        try:
            for scenario in (bench.warm_serving, bench.cold_fill, bench.coalescing, bench.memory,
                             bench.upstream_speed, bench.docker_registry):
                if args.only and scenario.__name__ not in args.only:
                    continue
                print(f"running {scenario.__name__} ...", flush=True)
                scenario()
        finally:
            bench.close()
    report = {"profile": "quick" if args.quick else "full", "results": bench.results,
              "targets": summarize(bench.results) if not args.only else {}}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print_table(report)


def print_table(report: dict[str, object]) -> None:
    results = report["results"]
    assert isinstance(results, dict)
    print(f"\n{'measurement':42} {'median':>10} {'min':>10} {'max':>10}  unit")
    for key, row in results.items():
        if "median" in row:
            print(f"{key:42} {row['median']:10.2f} {row['min']:10.2f} {row['max']:10.2f}  {row['unit']}")
    print(f"\n{'target':32} {'value':>10}  wanted")
    targets = report["targets"]
    assert isinstance(targets, dict)
    for key, row in targets.items():
        print(f"{key:32} {row['value']:10.3f}  {row['target']}")
    docker = results.get("docker_registry", {})
    print(f"\ndocker-registry as a pull-through cache: {json.dumps(docker)[:600]}")
