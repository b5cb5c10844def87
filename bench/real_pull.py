"""Cold and warm pulls of a model through the mirror with the real Ollama 0.9.3 client.

    .venv/bin/python -m bench.real_pull [--size-mb 500] [--cdn-rate-mb 25]

Everything runs on 127.0.0.1: the fake registry and CDN from the test suite
(the CDN optionally rate-limited per connection, like a far-away CDN), a mirror,
and Ollama server instances as separate "machines". Reports, in one run:
a direct pull from upstream (the peer), a cold pull through the mirror, a warm
pull by a second machine with upstream stopped, and the upstream bytes per blob
when ten Ollama-like clients pull the same cold model at once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from mirror import Settings, create_app
from tests import ollama_like
from tests.fakes import FakeCDN, FakeRegistry, ServerThread, write_blob
from tests.real_ollama import OllamaServer, find_venv


def _timed_pull(server: OllamaServer, name: str) -> float:
    began = time.monotonic()
    result = server.pull(name, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(f"pull of {name} failed: {result.stderr[-2000:]}")
    return time.monotonic() - began


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=500)
    parser.add_argument("--cdn-rate-mb", type=float, default=0, help="per-connection CDN limit; 0: none")
    parser.add_argument("--clients", type=int, default=10)
    args = parser.parse_args()
    venv = find_venv()
    if venv is None:
        raise SystemExit("the real Ollama client is not installed: run scripts/test once")
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        work = Path(tmp)
        (work / "upstream").mkdir()
        cdn = FakeCDN()
        cdn_server = ServerThread(cdn).start()
        registry = FakeRegistry(cdn, cdn_server.url("localhost"), work / "upstream")
        registry_server = ServerThread(registry).start()
        blob = write_blob(work / "upstream", args.size_mb * 1_000_000, seed=1)
        registry.add_model("library/bench", "latest", [blob])
        cdn.rate = args.cdn_rate_mb * 1e6 or None
        upstream = registry_server.url()
        results: dict[str, float] = {}

        peer = OllamaServer(venv, work / "direct").start()
        results["direct_pull_s"] = _timed_pull(peer, f"{upstream.removeprefix('http://')}/library/bench:latest")
        peer.stop()

        mirror = ServerThread(create_app(Settings(cache_dir=work / "cache", upstream=upstream))).start()
        name = f"127.0.0.1:{mirror.port}/library/bench:latest"
        before = cdn.bytes_sent
        cold = OllamaServer(venv, work / "cold").start()
        results["cold_pull_via_mirror_s"] = _timed_pull(cold, name)
        results["cold_upstream_bytes_ratio"] = (cdn.bytes_sent - before) / blob.size
        cold.stop()
        registry_server.stop()
        warm = OllamaServer(venv, work / "warm").start()
        results["warm_pull_via_mirror_s"] = _timed_pull(warm, name)
        warm.stop()
        mirror.stop()

        registry_server = ServerThread(registry).start()
        registry.url = registry_server.url()
        mirror = ServerThread(create_app(Settings(cache_dir=work / "cache2", upstream=registry.url))).start()
        before = cdn.bytes_by_digest.get(blob.digest, 0)

        async def many() -> None:
            await asyncio.gather(*(ollama_like.pull(mirror.url(), "library/bench", "latest", work / f"c{i}")
                                   for i in range(args.clients)))
        began = time.monotonic()
        asyncio.run(many())
        results[f"{args.clients}_clients_cold_s"] = time.monotonic() - began
        results[f"{args.clients}_clients_upstream_bytes_ratio"] = (
            (cdn.bytes_by_digest[blob.digest] - before) / blob.size)
        for server in (mirror, registry_server, cdn_server):
            server.stop()
    results["size_mb"] = args.size_mb
    results["cdn_rate_mb_per_connection"] = args.cdn_rate_mb
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
