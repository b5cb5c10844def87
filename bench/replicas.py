"""Replicas sharing one bucket on a real S3 engine (Ceph RGW), each figure against a peer in the same run.

    .venv/bin/python -m bench.replicas            # 1 GiB blobs, medians of 3
    .venv/bin/python -m bench.replicas --quick    # 128 MiB / 64 MiB blobs, one repetition

1. Warm serving, 16 concurrent range readers of one warm blob: through a replica serving from its
   local disk, against ``--blob-redirect``, where the readers first GET without Range (a 307 to a
   presigned RGW URL, as Ollama resolves a blob) and send their 16 ranges there. RGW read directly
   (16 ranges on a presigned URL made with boto3) is the ceiling. Also: the share of the blob's
   bytes each replica served (its ``ollama_mirror_served_bytes_total``) and the cores each process
   kept busy, to show which one is the bottleneck.
2. Upstream bytes: ten clients (curl, 0.1 s apart) over two replicas, five on each, on one cold
   blob behind a CDN limited per connection, against ten clients on one replica.
3. The real Ollama 0.9.3 client pulling a warm model through a replica, with and without
   ``--blob-redirect`` (skipped when ``.venv-ollama`` is missing, or with ``--no-ollama``).

The readers are curl processes, as in ``python -m bench`` (so the figures compare with its nginx
rows): C writing to /dev/null is the cheapest reader per byte at hand, where an httpx reader tops
out near 550 MB/s on a full core (../shared/perf-notes.md). Even so, at a replica's local-disk rate
the readers take more of the two cores than the replica does: the cores table shows it.

Everything listens on 127.0.0.1 and stops by itself: RGW (``../shared/s3/ceph-rgw-up``, bluestore
on a sparse file, its own ``CEPH_DIR`` and ports), nginx as the CDN, the test suite's fake registry,
the replicas as their own processes (``ollama-mirror serve --store s3://...``). Prints a table and
writes ``bench-replicas.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import httpx

from mirror.bucket import client_config
from tests.fakes import FakeCDN, FakeRegistry, MirrorProcess, ServerThread, write_blob
from tests.real_ollama import OllamaServer, find_venv
from tests.s3 import S3Endpoint, create_bucket, remove_bucket, rgw_environ, start_rgw, stop_rgw

from .peers import (
    Nginx,
    Sent,
    cpu_seconds,
    curl,
    curl_ranges,
    ensure_tools,
    free_port,
    served_bytes,
    work_dir,
)
from .real_pull import _timed_pull

MB = 1_000_000
MiB = 1 << 20


@dataclass
class Profile:
    warm_size: int
    cold_size: int
    model_size: int  # scenario 3's model
    repeat: int
    rate: int  # CDN bytes per second per connection
    readers: int = 16
    clients: int = 10


FULL = Profile(warm_size=1024 * MiB, cold_size=1024 * MiB, model_size=500 * MB, repeat=3, rate=25 * MB)
QUICK = Profile(warm_size=128 * MiB, cold_size=64 * MiB, model_size=64 * MB, repeat=1, rate=25 * MB)


class Busy:
    """The cores each process kept busy while the block ran (clients: every child reaped meanwhile),
    and the bytes each read from the block device (not from the page cache)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.cores: dict[str, float] = {}
        self.disk_reads: dict[str, int] = {}

    def __enter__(self) -> Self:
        self._cpu = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self._reads = {name: _disk_reads(pid) for name, pid in self.pids.items()}
        self._children = _children_cpu()
        self._began = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.monotonic() - self._began
        self.cores = {name: round((cpu_seconds(pid) - self._cpu[name]) / wall, 2) for name, pid in self.pids.items()}
        self.cores["clients"] = round((_children_cpu() - self._children) / wall, 2)
        self.disk_reads = {name: _disk_reads(pid) - self._reads[name] for name, pid in self.pids.items()}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _disk_reads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


class Rig:
    """RGW, nginx (plain, and limited per connection as the CDN), two fake registries in front of
    them, and the replicas started on it."""

    def __init__(self, work: Path, profile: Profile) -> None:
        self.work, self.p = work, profile
        self.files = work / "files"  # nginx serves these as /objects/sha256:<hex>
        self.files.mkdir()
        self._closers: list[Any] = []
        self.replicas: list[MirrorProcess] = []
        try:
            self._start(work, profile)
        except BaseException:
            self.close()
            raise

    def _start(self, work: Path, profile: Profile) -> None:
        # A sparse file: a full run writes about 8 GiB of blobs into it, each cold run in a new bucket.
        self.rgw_env = {**rgw_environ(work / "ceph"), "STORE_BYTES": str(16 << 30)}
        self.rgw: S3Endpoint = start_rgw(self.rgw_env)
        self._closers.append(lambda: stop_rgw(self.rgw_env))
        # The replicas find the store as any AWS SDK does. ``localhost``, not the replicas' 127.0.0.1:
        # Ollama follows a redirect to its own host name instead of using it.
        self.endpoint = self.rgw.url.replace("127.0.0.1", "localhost")
        os.environ.update({"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.rgw.access_key,
                           "AWS_SECRET_ACCESS_KEY": self.rgw.secret_key, "AWS_DEFAULT_REGION": self.rgw.region})
        self.s3 = self.rgw.session().client("s3", endpoint_url=self.endpoint, config=client_config(path_style=True))
        self.nginx = Nginx(work, self.files, profile.rate)
        self._closers.append(self.nginx.stop)
        cdn_table = FakeCDN()  # only its blob table: nginx serves the bytes
        self.registry = FakeRegistry(cdn_table, self.nginx.cdn_url, self.files)
        plain = FakeRegistry(cdn_table, self.nginx.plain_url.replace("127.0.0.1", "localhost"), self.files)
        plain.manifests = self.registry.manifests  # the same models, their blobs unthrottled
        self.cdn_registry, self.plain_registry = self._serve(self.registry), self._serve(plain)

    def _serve(self, registry: FakeRegistry) -> str:
        server = ServerThread(registry).start()
        self._closers.append(server.stop)
        return server.url()

    def close(self) -> None:
        for replica in self.replicas:
            if replica.process.poll() is None:
                replica.process.kill()
                replica.process.wait()
        for close in reversed(self._closers):
            try:
                close()
            except Exception as exc:  # noqa: BLE001 - stop the rest all the same
                print(f"stopping: {exc}")

    # -- helpers --------------------------------------------------------------

    def model(self, size: int, seed: int) -> tuple[str, str]:
        """A model of one blob of ``size`` bytes; returns (name, digest)."""
        blob = write_blob(self.files, size, seed)
        os.link(blob.path, self.files / blob.digest)  # the URL nginx serves: /objects/sha256:<hex>
        name = f"library/bench{seed}"
        config = json.loads(self.registry.add_model(name, "latest", [blob]))["config"]["digest"]
        if not (self.files / config).exists():
            os.link(self.files / config.replace(":", "-"), self.files / config)
        return name, blob.digest

    def replica(self, bucket: str, upstream: str, label: str, *extra: str) -> MirrorProcess:
        port = free_port()
        cache = self.work / f"replica{len(self.replicas) + 1}-{label}" / "cache"
        process = MirrorProcess(cache, upstream, label, "--listen", f"127.0.0.1:{port}",
                                "--store", f"s3://{bucket}/models", "--s3-path-style", "--replica-id", label,
                                "--advertise-url", f"http://127.0.0.1:{port}", *extra)
        self.replicas.append(process)
        return process

    def retire(self, *replicas: MirrorProcess) -> None:
        """Stop replicas and delete their caches: blobs left in the page cache crowd later runs."""
        for replica in replicas:
            replica.stop(15)
            shutil.rmtree(replica.log.parent / "cache", ignore_errors=True)

    def wait_uploaded(self, bucket: str, digest: str, timeout: float = 300) -> float:
        """Seconds until the blob is in the bucket and no lease is left (its filler is done)."""
        began = time.monotonic()
        key = f"models/blobs/{digest.replace(':', '-')}"
        while time.monotonic() - began < timeout:
            keys = {o["Key"] for o in self.s3.list_objects_v2(Bucket=bucket, Prefix="models/").get("Contents", [])}
            if key in keys and not any(k.startswith("models/leases/") for k in keys):
                return time.monotonic() - began
            time.sleep(0.2)
        raise RuntimeError(f"{digest} did not reach the bucket {bucket} in {timeout} s")

    def presign(self, bucket: str, digest: str) -> str:
        return str(self.s3.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": f"models/blobs/{digest.replace(':', '-')}"},
            ExpiresIn=3600))

    def pids(self, **replicas: MirrorProcess) -> dict[str, int]:
        run = Path(self.rgw_env["CEPH_DIR"]) / "run"
        found = {name: replica.process.pid for name, replica in replicas.items()}
        for name, pidfile in (("radosgw", "client.rgw.a.pid"), ("ceph-osd", "osd.0.pid")):
            found[name] = int((run / pidfile).read_text())
        return found


# -- 1: warm serving -----------------------------------------------------------------------------

def warm_serving(rig: Rig, results: dict[str, Any], ollama_venv: Path | None) -> None:
    """16 ranges: replica from local disk, --blob-redirect (bytes from RGW), RGW direct; interleaved."""
    size, readers = rig.p.warm_size, rig.p.readers
    bucket = create_bucket(rig.s3)
    name, digest = rig.model(size, seed=1)
    local = rig.replica(bucket, rig.plain_registry, "local")
    redirect = rig.replica(bucket, rig.plain_registry, "redirect", "--blob-redirect")
    local_url = f"{local.url}/v2/{name}/blobs/{digest}"
    redirect_url = f"{redirect.url}/v2/{name}/blobs/{digest}"
    assert curl(local_url)["bytes"] == size  # the fill, from the unthrottled nginx
    rig.wait_uploaded(bucket, digest)
    rgw_url = rig.presign(bucket, digest)

    resolve_ms: list[float] = []

    def via_redirect() -> float:
        began = time.monotonic()
        answer = httpx.get(redirect_url, timeout=30)  # the resolving GET, as Ollama sends it
        resolve_ms.append((time.monotonic() - began) * 1000)
        assert answer.status_code == 307, (answer.status_code, answer.text[:300])
        location = answer.headers["location"]
        assert location.startswith(rig.endpoint), location
        curl_ranges(location, size, readers)
        return size / (time.monotonic() - began) / MB

    ways = {"replica_local_disk": (local, lambda: curl_ranges(local_url, size, readers)),
            "blob_redirect": (redirect, via_redirect),
            "rgw_direct": (None, lambda: curl_ranges(rgw_url, size, readers)),
            "rgw_direct_x4_readers": (None, lambda: curl_ranges(rgw_url, size, 4 * readers)),
            "disk_o_direct": (None, lambda: _direct_reads(rig.files / digest.replace(":", "-"), size, readers))}
    for _, measure in ways.values():
        measure()  # page caches warm for every way alike (bluestore reads past it: see the disk reads)
    samples: dict[str, dict[str, list[Any]]] = {way: {"mb_s": [], "share": [], "cores": [], "disk": []}
                                                   for way in ways}
    pids = rig.pids(local=local, redirect=redirect)
    for _ in range(rig.p.repeat):
        for way, (replica, measure) in ways.items():
            before = {r: _served(r) for r in (local, redirect)}
            with Busy(pids) as busy:
                samples[way]["mb_s"].append(measure())
            samples[way]["cores"].append(busy.cores)
            samples[way]["disk"].append({name: round(n / size, 3) for name, n in busy.disk_reads.items()})
            if replica is not None:
                samples[way]["share"].append((_served(replica) - before[replica]) / size)
    for way, got in samples.items():
        results[f"1_{way}"] = {**_summary(got["mb_s"], "MB/s"), "cores": got["cores"],
                               "disk_reads_per_blob_byte": got["disk"],
                               **({"replica_share": _summary(got["share"], "x blob")} if got["share"] else {})}
    results["1_blob_redirect"]["resolve_ms"] = _summary(resolve_ms[1:], "ms")  # not the warm-up's
    results["1_blob_bytes"] = size
    if ollama_venv is not None:
        real_client(rig, results, ollama_venv, local, redirect, bucket)
    rig.retire(local, redirect)
    remove_bucket(rig.s3, bucket)


def _served(replica: MirrorProcess) -> float:
    """The replica's served bytes once they stop moving: a response is counted when it ends, which
    may be a moment after its client has read the last byte."""
    last = served_bytes(replica.url)
    for _ in range(50):
        time.sleep(0.2)
        now = served_bytes(replica.url)
        if now == last:
            break
        last = now
    return last


def _direct_reads(path: Path, size: int, readers: int) -> float:
    """``readers`` dd processes reading the file's ranges with O_DIRECT, past the page cache, as
    bluestore reads its block file; aggregate MB/s."""
    step = -(-size // readers // (4 << 20)) * (4 << 20)
    began = time.monotonic()
    procs = [subprocess.Popen(["dd", f"if={path}", "of=/dev/null", "bs=4M", "iflag=direct,skip_bytes,count_bytes",
                               f"skip={a}", f"count={min(step, size - a)}", "status=none"])
             for a in range(0, size, step)]
    codes = [p.wait(600) for p in procs]
    assert codes == [0] * len(procs), codes
    return size / (time.monotonic() - began) / MB


# -- 3: the real client, on the replicas of 1 -----------------------------------------------------

def real_client(rig: Rig, results: dict[str, Any], venv: Path, local: MirrorProcess, redirect: MirrorProcess,
                bucket: str) -> None:
    """A warm model pulled by Ollama 0.9.3 through each replica, interleaved; each pull a new machine."""
    name, digest = rig.model(rig.p.model_size, seed=3)
    assert curl(f"{local.url}/v2/{name}/blobs/{digest}")["bytes"] == rig.p.model_size
    rig.wait_uploaded(bucket, digest)
    samples: dict[str, dict[str, list[float]]] = {w: {"s": [], "share": []} for w in ("local", "redirect")}
    for i in range(rig.p.repeat + 1):  # the first round warms the manifests and the config blob
        for way, replica in (("local", local), ("redirect", redirect)):
            home = rig.work / f"ollama-{way}-{i}"
            server = OllamaServer(venv, home).start()
            before = _served(replica)
            try:
                seconds = _timed_pull(server, f"127.0.0.1:{replica.url.rpartition(':')[2]}/{name}:latest")
            finally:
                server.stop()
                shutil.rmtree(home, ignore_errors=True)
            if i:
                samples[way]["s"].append(seconds)
                samples[way]["share"].append((_served(replica) - before) / rig.p.model_size)
    for way, got in samples.items():
        results[f"3_ollama_warm_pull_{way}"] = {**_summary(got["s"], "s"),
                                                "replica_share": _summary(got["share"], "x model")}
    results["3_model_bytes"] = rig.p.model_size


# -- 2: upstream bytes ---------------------------------------------------------------------------

def upstream_bytes(rig: Rig, results: dict[str, Any]) -> None:
    """Ten clients on one cold blob, over two replicas and on one; a new bucket each time."""
    size = rig.p.cold_size
    name, digest = rig.model(size, seed=2)
    samples: dict[str, dict[str, list[float]]] = {
        layout: {"upstream": [], "last_done": [], "upload_after": [], "upstream_fills": [], "refetched": [],
                 "cut_short": []}
        for layout in ("two_replicas", "one_replica")}
    for _ in range(rig.p.repeat):
        for layout, count in (("two_replicas", 2), ("one_replica", 1)):
            bucket = create_bucket(rig.s3)
            replicas = [rig.replica(bucket, rig.cdn_registry, label) for label in "ab"[:count]]
            seen = len(rig.nginx.requests(digest))
            urls = [f"{replicas[i % count].url}/v2/{name}/blobs/{digest}" for i in range(rig.p.clients)]
            began = time.monotonic()
            with ThreadPoolExecutor(len(urls)) as pool:
                futures = []
                for url in urls:
                    futures.append(pool.submit(curl, url))
                    time.sleep(0.1)
                done = [f.result() for f in futures]
            last = time.monotonic() - began
            assert all(d["status"] == 200 and d["bytes"] == size for d in done), done
            got = samples[layout]
            got["last_done"].append(last)
            got["upload_after"].append(rig.wait_uploaded(bucket, digest))  # then every upstream request ended
            logs = "".join(r.log.read_text() for r in replicas)
            got["upstream_fills"].append(len(re.findall(r"fill start .*source=upstream", logs)))
            rig.retire(*replicas)
            sent = rig.nginx.requests(digest)[seen:]
            got["upstream"].append(sum(r.sent for r in sent) / size)
            refetched, cut_short = _refetched(sent)
            got["refetched"].append(refetched / size)
            got["cut_short"].append(cut_short)
            remove_bucket(rig.s3, bucket)
    for layout, got in samples.items():
        results[f"2_{layout}"] = {"upstream_bytes": _summary(got["upstream"], "x blob"),
                                  "last_client_done": _summary(got["last_done"], "s"),
                                  "upload_done_after_last_client": _summary(got["upload_after"], "s"),
                                  "upstream_fills": got["upstream_fills"],
                                  "refetched_bytes": _summary(got["refetched"], "x blob"),
                                  "responses_cut_short": got["cut_short"]}
    results["2_blob_bytes"] = size


def _refetched(sent: list[Sent]) -> tuple[int, int]:
    """Body bytes the CDN sent for offsets it had sent already (overlapping ranges: a range split
    or stolen after its bytes were in flight), and how many responses were cut short."""
    again, reach = 0, 0
    for start, stop in sorted((r.start, r.start + r.body) for r in sent):
        again += max(0, min(stop, reach) - start)
        reach = max(reach, stop)
    return again, sum(1 for r in sent if r.stop is not None and r.body < r.stop - r.start)


# -- report --------------------------------------------------------------------------------------

def _summary(samples: list[float], unit: str) -> dict[str, Any]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "unit": unit,
            "samples": samples}


def _median(results: dict[str, Any], *path: str) -> float:
    row = results
    for key in path:
        row = row[key]
    return float(row["median"])


LOCAL, RGW, ONE = "replica, local disk", "RGW direct (presigned)", "1 replica x 10 clients"
ROWS = [  # figure, (result, field), unit, peer, (peer's result, field), target
    ("1 16 ranges, --blob-redirect", ("1_blob_redirect",), "MB/s", LOCAL, ("1_replica_local_disk",),
     "bytes from RGW, not the replica"),
    ("1 16 ranges, replica local disk", ("1_replica_local_disk",), "MB/s", RGW, ("1_rgw_direct",), "context"),
    ("1 16 ranges, --blob-redirect", ("1_blob_redirect",), "MB/s", RGW, ("1_rgw_direct",),
     "~1: the resolving GET is all it adds"),
    ("1 16 ranges, RGW direct", ("1_rgw_direct",), "MB/s", "disk, 16 dd O_DIRECT", ("1_disk_o_direct",),
     "context: bluestore reads past the page cache"),
    ("1 RGW direct, 64 ranges", ("1_rgw_direct_x4_readers",), "MB/s", "RGW direct, 16 ranges", ("1_rgw_direct",),
     "context: > 1 if each GET's pipeline, not RGW's CPU or disk, is the limit"),
    ("1 resolving GET (307), --blob-redirect", ("1_blob_redirect", "resolve_ms"), "ms", "", None, "context"),
    ("1 replica's share, --blob-redirect", ("1_blob_redirect", "replica_share"), "x blob", LOCAL,
     ("1_replica_local_disk", "replica_share"), "< 0.05"),
    ("2 upstream bytes / blob, 2 replicas x 5", ("2_two_replicas", "upstream_bytes"), "x blob", ONE,
     ("2_one_replica", "upstream_bytes"), "<= 1.05"),
    ("2 last client done, 2 replicas x 5", ("2_two_replicas", "last_client_done"), "s", ONE,
     ("2_one_replica", "last_client_done"), "context"),
    ("2 bytes the CDN sent twice, 2 replicas x 5", ("2_two_replicas", "refetched_bytes"), "x blob", ONE,
     ("2_one_replica", "refetched_bytes"), "context: ranges split or stolen in flight"),
    ("3 Ollama 0.9.3 warm pull, --blob-redirect", ("3_ollama_warm_pull_redirect",), "s", LOCAL,
     ("3_ollama_warm_pull_local",), "context"),
    ("3 replica's share, --blob-redirect", ("3_ollama_warm_pull_redirect", "replica_share"), "x model", LOCAL,
     ("3_ollama_warm_pull_local", "replica_share"), "< 0.05"),
]


def rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each figure measured beside its peer in the same run, and their ratio."""
    out = []
    for figure, path, unit, peer, peer_path, target in ROWS:
        if path[0] not in results:
            continue
        value = _median(results, *path)
        peer_value = _median(results, *peer_path) if peer_path else None
        out.append({"figure": figure, "value": round(value, 3), "unit": unit, "peer": peer,
                    "peer_value": None if peer_value is None else round(peer_value, 3),
                    "ratio": round(value / peer_value, 3) if peer_value else None, "target": target})
    return out


def print_table(report: dict[str, Any]) -> None:
    print(f"\n{'figure':42} {'value':>9} {'unit':7} {'peer (same run)':24} {'peer':>9} {'ratio':>7}  target")
    for r in report["rows"]:
        peer = "" if r["peer_value"] is None else f"{r['peer_value']:9.3f}"
        ratio = "" if r["ratio"] is None else f"{r['ratio']:7.3f}"
        print(f"{r['figure']:42} {r['value']:9.3f} {r['unit']:7} {r['peer']:24} {peer:>9} {ratio:>7}  {r['target']}")
    results = report["results"]
    ways = [k for k in results if k.startswith("1_") and isinstance(results[k], dict) and "cores" in results[k]]
    for title, field in (("cores busy", "cores"), ("bytes read from disk per blob byte", "disk_reads_per_blob_byte")):
        if ways:
            print(f"\n{title} during the 16 ranges (median):")
        for way in ways:
            samples = results[way][field]
            print(f"  {way.removeprefix('1_'):20} " + "  ".join(
                f"{n} {statistics.median(s[n] for s in samples):.2f}" for n in samples[0]))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.replicas")
    parser.add_argument("--quick", action="store_true", help="small blobs, one repetition")
    parser.add_argument("--no-ollama", action="store_true", help="leave out the real Ollama client (scenario 3)")
    parser.add_argument("--only", choices=("warm_serving", "upstream_bytes"), help="run just this scenario")
    parser.add_argument("--out", default="bench-replicas.json")
    args = parser.parse_args()
    ensure_tools()
    profile = QUICK if args.quick else FULL
    venv = None if args.no_ollama else find_venv()
    results: dict[str, Any] = {}
    with work_dir("bench-replicas-") as work:
        rig = Rig(work, profile)
        try:
            scenarios = {"warm_serving": lambda: warm_serving(rig, results, venv),
                         "upstream_bytes": lambda: upstream_bytes(rig, results)}
            for scenario, run in scenarios.items():
                if args.only in (None, scenario):
                    print(f"running {scenario} ...", flush=True)
                    run()
        finally:
            rig.close()
    report = {"profile": "quick" if args.quick else "full", "cdn_mb_s_per_connection": profile.rate / MB,
              "real_client": "not run (no .venv-ollama, or --no-ollama)" if venv is None else "Ollama 0.9.3",
              "results": results, "rows": rows(results)}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print_table(report)


if __name__ == "__main__":
    main()
