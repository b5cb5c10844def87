"""Ollama's current download paths through the mirror, against a direct pull, in one run.

    .venv/bin/python -m bench.current_clients [--cdn-rate-mb 25] [--scale 1.0]

The stand-ins of Ollama v0.32.15 (tests/clients/: the GGUF path of server/download.go and the
tensor path of x/transfer) pull a GGUF model and a tensor model: directly from the fake registry
and its CDN (nginx, limited per connection like a far CDN), then through a mirror in named mode
(cold, then warm) and in DNS mode (cold). For each: the time against the direct pull, and the
bytes that crossed the LAN (what the mirror served) per blob byte. Everything on loopback; the
DNS mode's "LAN DNS" is the stand-in's hosts map.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import ssl
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tests.clients.gguf import GgufClient, GgufOptions
from tests.clients.tensor import TensorClient, TensorOptions
from tests.clients.wire import PullResult
from tests.fakes import FakeCDN, FakeRegistry, MirrorProcess, ServerThread, wait_for_text, write_blob

from .peers import Nginx, ensure_tools, served_bytes

MB = 1_000_000
REGISTRY = "registry.ollama.ai"


class Run:
    def __init__(self, work: Path, rate: float, scale: float) -> None:
        self.work = work
        files = work / "files"
        files.mkdir()
        self.nginx = Nginx(work, files, int(rate))
        self.registry = FakeRegistry(FakeCDN(), self.nginx.cdn_url, files)
        self.server = ServerThread(self.registry).start()
        self.registry.url = self.server.url()
        size = lambda mb: max(int(mb * scale * MB), 200_000)  # noqa: E731
        self.models = {
            "gguf": self._model(files, "gguf", [size(400), 12_000, 500], "model"),
            "tensor": self._model(files, "tensor", [size(120)] * 4 + [size(2), 30_000], "tensor"),
        }
        self.results: list[dict[str, object]] = []

    def _model(self, files: Path, name: str, sizes: list[int], kind: str) -> int:
        blobs = [write_blob(files, s, seed=len(name) * 100 + i) for i, s in enumerate(sizes)]
        for blob in blobs:
            os.link(blob.path, files / blob.digest)  # the URL nginx serves
        manifest = self.registry.add_model(f"library/{name}", "1", [(b, kind) for b in blobs])
        config = json.loads(manifest)["config"]
        if not (files / config["digest"]).exists():  # models may share a config
            os.link(files / config["digest"].replace(":", "-"), files / config["digest"])
        return sum(blob.size for blob in blobs) + config["size"]

    def close(self) -> None:
        self.server.stop()
        self.nginx.stop()

    def pull(self, path: str, base: str, dest: Path, **options: object) -> PullResult:
        if path == "gguf":
            client: GgufClient | TensorClient = GgufClient(base, dest, GgufOptions(**options))  # type: ignore[arg-type]
        else:
            client = TensorClient(base, dest, TensorOptions(**options))  # type: ignore[arg-type]
        result = asyncio.run(client.pull(f"library/{path}", "1"))
        if result.error:
            raise SystemExit(f"{path} pull from {base} failed: {result.error}")
        shutil.rmtree(dest, ignore_errors=True)
        return result

    def measure(self, path: str, mode: str, base: str, served: Callable[[], float], dest: Path,
                direct: float | None, **options: object) -> float:
        before = served()
        began = time.monotonic()
        result = self.pull(path, base, dest, **options)
        seconds = time.monotonic() - began
        lan = served() - before
        too_slow = len(result.events_of("too slow"))
        self.results.append({"path": path, "mode": mode, "seconds": round(seconds, 2),
                             "vs_direct": round(seconds / direct, 3) if direct else None,
                             "lan_bytes_per_blob_byte": round(lan / self.models[path], 3) if lan else None,
                             "too_slow_cancellations": too_slow})
        return seconds


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.current_clients")
    parser.add_argument("--cdn-rate-mb", type=float, default=25, help="CDN limit per connection")
    parser.add_argument("--scale", type=float, default=1.0, help="model sizes (1.0: a 400 MB GGUF, 4 x 120 MB tensors)")
    parser.add_argument("--out", default="bench-current-clients.json")
    args = parser.parse_args()
    ensure_tools()
    work = Path(tempfile.mkdtemp(prefix="bench-current-"))
    work.chmod(0o755)
    run = Run(work, args.cdn_rate_mb * MB, args.scale)
    mirrors: list[MirrorProcess] = []
    try:
        for path in ("gguf", "tensor"):
            direct = run.measure(path, "direct", run.registry.url, lambda: 0.0, work / "d", None)
            for folder in (f"named-{path}", f"dns-{path}"):
                (work / folder).mkdir()
            named = MirrorProcess(work / f"named-{path}" / "cache", run.registry.url, "named")
            mirrors.append(named)
            local = f"http://localhost:{named.url.rsplit(':', 1)[1]}"
            for mode in ("named cold", "named warm"):
                run.measure(path, mode, local, lambda: served_bytes(named.url), work / "n", direct)
            dns = MirrorProcess(work / f"dns-{path}" / "cache", run.registry.url, "dns",
                                "--registry", f"{REGISTRY}={run.registry.url}", "--tls-listen", "127.0.0.1:0")
            mirrors.append(dns)
            port = int(re.findall(r"tls ready url=\S+:(\d+)", wait_for_text(dns.log, r"tls ready url="))[-1])
            context = ssl.create_default_context(cafile=str(work / f"dns-{path}" / "cache" / ".mirror" / "ca" / "ca.pem"))
            for mode in ("dns cold", "dns warm"):  # warm: what TLS alone costs the (Python) client
                run.measure(path, mode, f"https://{REGISTRY}:{port}", lambda: served_bytes(dns.url), work / "s",
                            direct, hosts={REGISTRY: "127.0.0.1"}, ssl_context=context)
    finally:
        for mirror in mirrors:
            mirror.process.kill()
        run.close()
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).write_text(json.dumps({"cdn_rate_mb_per_connection": args.cdn_rate_mb, "results": run.results},
                                         indent=2))
    print(f"\n{'path':8} {'mode':12} {'seconds':>8} {'vs direct':>10} {'LAN/blob':>9} {'too slow':>9}")
    for row in run.results:
        print(f"{row['path']:8} {row['mode']:12} {row['seconds']:8.2f} {row['vs_direct'] or '':>10} "
              f"{row['lan_bytes_per_blob_byte'] or '':>9} {row['too_slow_cancellations']:>9}")


if __name__ == "__main__":
    main()
