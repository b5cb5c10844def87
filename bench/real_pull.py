"""The real Ollama 0.9.3 client: a direct pull against a first pull through a cold mirror, in one run.

    .venv/bin/python -m bench.real_pull --size-mb 1074 --cdn-rate-mb 25     # a CDN that caps each connection
    .venv/bin/python -m bench.real_pull --size-mb 1074 --shared-cap-mb 100  # one pipe for all connections

Everything runs on loopback: the test suite's fake registry (manifests, blob redirects), nginx as
the CDN it redirects to (``limit_rate`` per connection, like a far CDN), the mirror as its own
process (``ollama-mirror serve``), and Ollama server instances as separate "machines". With
``--shared-cap-mb`` the run moves into a private network namespace whose loopback carries the CDN's
bytes through one ``tc`` htb class of that rate: more connections cannot help there, only cost.

Reports: the direct pull (the peer), the cold pull through the mirror and their ratio, a warm pull
by a second machine with upstream stopped, the CDN bytes per blob byte, the connection count the
mirror's fill settled on, and the upstream bytes when ten Ollama-like clients pull one cold model.
Each timed pull also reports the bytes it wrote to the machine's disks (``/proc/diskstats``, after a
sync): through a mirror on the same machine the disk takes every byte twice, once into the mirror's
cache and once into the client's models directory. ``--mirror-in-ram`` puts the mirror's cache on a
tmpfs, which tells whether that shared disk is what a slower cold pull is waiting for.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from tests import ollama_like
from tests.fakes import FakeCDN, FakeRegistry, MirrorProcess, ServerThread, write_blob
from tests.real_ollama import OllamaServer, find_venv

from .peers import CpuMeter, Nginx, ensure_tools, machine_ticks


def _timed_pull(server: OllamaServer, name: str) -> float:
    began = time.monotonic()
    result = server.pull(name, timeout=3600)
    if result.returncode != 0:
        raise SystemExit(f"pull of {name} failed: {result.stderr[-2000:]}")
    return time.monotonic() - began


def _shared_pipe(port: int, mb_per_s: float) -> None:
    """Bytes from the CDN's port share one htb class of ``mb_per_s``; everything else on loopback is free."""
    rate = f"{int(mb_per_s * 8)}mbit"
    for command in (
        "tc qdisc add dev lo root handle 1: htb default 10",
        "tc class add dev lo parent 1: classid 1:10 htb rate 100gbit",
        f"tc class add dev lo parent 1: classid 1:20 htb rate {rate} ceil {rate}",
        f"tc filter add dev lo protocol ip parent 1:0 prio 1 u32 match ip sport {port} 0xffff flowid 1:20",
    ):
        subprocess.run(command.split(), check=True, stderr=subprocess.DEVNULL)


def _disk_written() -> int:
    """Bytes written to the machine's real disks so far (``/proc/diskstats``; loop and zram left out)."""
    total = 0
    for line in Path("/proc/diskstats").read_text().splitlines():
        fields = line.split()
        if Path(f"/sys/block/{fields[2]}/device").exists():  # a whole disk, not a partition or a RAM device
            total += int(fields[9]) * 512
    return total


def _pull_and_disk(server: OllamaServer, name: str, results: dict[str, object], key: str,
                   labels: dict[int, str] | None = None) -> None:
    """Time the pull, the disk writes it caused (counted until the kernel wrote back what was
    dirty) and where the CPU time went meanwhile."""
    os.sync()  # what was written before (the blob nginx serves, say) is not this pull's
    before = _disk_written()
    cpu = CpuMeter(labels)
    cpu.start()
    results[f"{key}_s"] = _timed_pull(server, name)
    results[f"{key}_cpu"] = cpu.stop()
    os.sync()
    results[f"{key}_disk_mb"] = round((_disk_written() - before) / 1e6)


class Timeline:
    """The mirror's biggest fill every half second (/status.json): MB/s landed in each interval,
    the connections it ran and the machine's cores busy, so a slow stretch of a cold pull shows
    where it lies and whether the CPU was full then."""

    def __init__(self, base: str) -> None:
        self._base, self._stop = base, threading.Event()
        self.points: list[tuple[float, int, int, int]] = []  # seconds, bytes done, connections, busy ticks
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        began = time.monotonic()
        while not self._stop.wait(0.5):
            try:
                fills = httpx.get(f"{self._base}/status.json", timeout=5).json()["fills"]
            except (httpx.HTTPError, ValueError, KeyError):
                continue
            done = self.points[-1][1] if self.points else 0  # once the fill ended: nothing more landed
            big = max(fills, key=lambda f: f["size"], default={"done": done, "connections": 0})
            self.points.append((time.monotonic() - began, big["done"], big["connections"], machine_ticks()[0]))

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join()
        rows, last = [], (0.0, 0, 0, self.points[0][3] if self.points else 0)
        tick = os.sysconf("SC_CLK_TCK")
        for point in self.points:
            seconds = max(point[0] - last[0], 1e-3)
            rows.append(f"{point[0]:5.1f}s filled {(point[1] - last[1]) / seconds / 1e6:4.0f} MB/s "
                        f"({point[2]:2d} connections), {(point[3] - last[3]) / tick / seconds:.2f} cores busy")
            last = point
        return rows


def _settled(log: Path, digest: str) -> str:
    """The connection count the blob's fill settled on (or ended with, if it never settled)."""
    short = re.escape(digest[:19])
    found = re.findall(rf"(?:fill settled|fill done) digest={short}.*?connections=(\d+)", log.read_text())
    return found[0] if found else "?"


def run(args: argparse.Namespace) -> dict[str, object]:
    venv = find_venv()
    if venv is None:
        raise SystemExit("the real Ollama client is not installed: run scripts/test once")
    work = Path(tempfile.mkdtemp(prefix="bench-real-pull-"))
    work.chmod(0o755)  # nginx workers run as another user when started as root
    files = work / "files"
    files.mkdir()
    results: dict[str, object] = {"size_mb": args.size_mb}
    servers: list[object] = []
    try:
        if args.in_namespace:  # the namespace's own loopback starts down
            subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        nginx = Nginx(work, files, int(args.cdn_rate_mb * 1e6))
        servers.append(nginx)
        if args.shared_cap_mb:
            _shared_pipe(nginx.cdn_port, args.shared_cap_mb)
        blob = write_blob(files, args.size_mb * 1_000_000, seed=1)
        os.link(blob.path, files / blob.digest)  # the URL nginx serves: /objects/sha256:<hex>
        registry = FakeRegistry(FakeCDN(), nginx.cdn_url, files)
        config = json.loads(registry.add_model("library/bench", "latest", [blob]))["config"]["digest"]
        os.link(files / config.replace(":", "-"), files / config)  # nginx serves the config blob too
        registry_server = ServerThread(registry).start()
        upstream = registry_server.url()

        peer = OllamaServer(venv, work / "direct").start()
        _pull_and_disk(peer, f"{upstream.removeprefix('http://')}/library/bench:latest", results, "direct_pull")
        results["direct_parts_s"] = sorted(round(r.seconds, 1) for r in nginx.requests(blob.digest))
        peer.stop()
        shutil.rmtree(work / "direct", ignore_errors=True)

        if args.mirror_in_ram:  # the mirror's writes off the disk the client writes to: is that disk the limit?
            (work / "mirror").mkdir()
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={2 * args.size_mb + 2048}m", "tmpfs",
                            str(work / "mirror")], check=True)
            servers.append(work / "mirror")
        mirror = MirrorProcess(work / "mirror" / "cache", upstream, "bench", *args.mirror_args)
        servers.append(mirror)
        name = f"{mirror.url.removeprefix('http://')}/library/bench:latest"
        before = nginx.bytes_sent(blob.digest)
        cold = OllamaServer(venv, work / "cold").start()
        timeline = Timeline(mirror.url)
        _pull_and_disk(cold, name, results, "cold_pull_via_mirror", {mirror.process.pid: "mirror"})
        results["cold_upstream_bytes_ratio"] = (nginx.bytes_sent(blob.digest) - before) / blob.size
        results["mirror_connections"] = _settled(mirror.log, blob.digest)
        results["cold_fill_timeline"] = timeline.stop()
        results["cold_parts_s"] = sorted(  # each part of Ollama's through the mirror, from its access log
            round(int(ms) / 1000, 1) for ms in re.findall(rf"/blobs/{blob.digest} 20[06] bytes=\d+ ms=(\d+)",
                                                            mirror.log.read_text()))
        results["mirror_fill_log"] = [
            line[11:300] for line in mirror.log.read_text().splitlines()
            if "mirror.fill" in line or "/blobs/" in line and "206" in line]
        cold.stop()
        shutil.rmtree(work / "cold", ignore_errors=True)
        registry_server.stop()
        warm = OllamaServer(venv, work / "warm").start()
        results["warm_pull_via_mirror_s"] = _timed_pull(warm, name)
        warm.stop()
        shutil.rmtree(work / "warm", ignore_errors=True)
        mirror.stop(15)
        results["cold_mirror_over_direct"] = round(
            float(results["cold_pull_via_mirror_s"]) / float(results["direct_pull_s"]), 3)  # type: ignore[arg-type]

        if args.clients:
            registry_server = ServerThread(registry).start()
            many_mirror = MirrorProcess(work / "mirror2" / "cache", registry_server.url(), "many", *args.mirror_args)
            servers.append(many_mirror)
            before = nginx.bytes_sent(blob.digest)

            async def many() -> None:
                await asyncio.gather(*(ollama_like.pull(many_mirror.url, "library/bench", "latest", work / f"c{i}")
                                       for i in range(args.clients)))
            began = time.monotonic()
            asyncio.run(many())
            results[f"{args.clients}_clients_cold_s"] = time.monotonic() - began
            results[f"{args.clients}_clients_upstream_bytes_ratio"] = (
                (nginx.bytes_sent(blob.digest) - before) / blob.size)
            many_mirror.stop(15)
            registry_server.stop()
    finally:
        for server in servers:
            try:
                if isinstance(server, Path):
                    subprocess.run(["umount", "-l", str(server)], check=False)
                else:
                    server.stop() if isinstance(server, Nginx) else server.process.kill()  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001 - stopping what may have stopped already
                pass
        shutil.rmtree(work, ignore_errors=True)
    results["cdn"] = (f"one pipe of {args.shared_cap_mb} MB/s" if args.shared_cap_mb
                      else f"{args.cdn_rate_mb or 'unlimited'} MB/s per connection")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.real_pull")
    parser.add_argument("--size-mb", type=int, default=500)
    parser.add_argument("--cdn-rate-mb", type=float, default=0, help="CDN limit per connection (0: none)")
    parser.add_argument("--shared-cap-mb", type=float, default=0,
                        help="CDN limit for all connections together, through tc in a private network namespace")
    parser.add_argument("--clients", type=int, default=0, help="also: this many Ollama-like clients on one cold blob")
    parser.add_argument("--mirror-arg", dest="mirror_args", action="append", default=[],
                        help="passed to ollama-mirror serve (e.g. --mirror-arg=--connections=8)")
    parser.add_argument("--mirror-in-ram", action="store_true",
                        help="the mirror's cache on a tmpfs: its writes leave the disk to the client alone")
    parser.add_argument("--in-namespace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    ensure_tools()
    if args.shared_cap_mb and not args.in_namespace:
        # A loopback of our own, so the shaping touches nothing else on the machine.
        command = ["unshare", "-n", sys.executable, "-m", "bench.real_pull", *sys.argv[1:], "--in-namespace"]
        raise SystemExit(subprocess.run(command).returncode)
    print(json.dumps(run(args), indent=2))


if __name__ == "__main__":
    main()
