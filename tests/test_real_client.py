"""The judge of compatibility: the real Ollama 0.9.3 client pulling through the mirror."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from .clients import GgufClient
from .conftest import MirrorFactory
from .fakes import NEWER_OLLAMA_NEEDED, FakeRegistry, write_blob

pytestmark = pytest.mark.real_client


def _model_id(manifest: bytes) -> str:
    return hashlib.sha256(manifest).hexdigest()[:12]


def test_real_client_cold_then_warm_pull_with_upstream_stopped(
    registry: FakeRegistry, start_mirror: MirrorFactory, ollama, tmp_path: Path
) -> None:
    layer = write_blob(registry.directory, 30_000_000, seed=11)
    manifest = registry.add_model("library/tiny", "1b", [layer])
    mirror = start_mirror()
    name = f"127.0.0.1:{mirror.port}/library/tiny:1b"

    first = ollama("a")
    result = first.pull(name)
    assert result.returncode == 0, result.stderr[-2000:]
    assert first.list_models()[name] == _model_id(manifest)
    pulled = first.models / "blobs" / layer.digest.replace(":", "-")
    assert pulled.read_bytes() == layer.path.read_bytes()
    upstream_bytes = registry.cdn.bytes_sent

    registry.server.stop()  # upstream gone: the second machine is served from the mirror's disk
    second = ollama("b")
    result = second.pull(name)
    assert result.returncode == 0, result.stderr[-2000:]
    assert second.list_models()[name] == _model_id(manifest)
    assert registry.cdn.bytes_sent == upstream_bytes


def test_real_client_multi_part_blob_on_a_cold_cache(
    registry: FakeRegistry, start_mirror: MirrorFactory, ollama, tmp_path: Path
) -> None:
    """Over 200 MB: the client sends several parallel Range parts while the mirror is still filling."""
    layer = write_blob(registry.directory, 260_000_000, seed=12)
    manifest = registry.add_model("library/big", "q4", [layer])
    registry.cdn.rate = 20_000_000  # per connection: the fill lasts long enough for the parts to overlap it
    mirror = start_mirror()
    name = f"127.0.0.1:{mirror.port}/library/big:q4"
    client = ollama("big")
    began = time.monotonic()
    result = client.pull(name)
    assert result.returncode == 0, result.stderr[-2000:]
    assert client.list_models()[name] == _model_id(manifest)
    ranged = [r for d, r in registry.cdn.requests if d == layer.digest and r]
    assert len(ranged) >= 3  # the mirror fetched in parallel ranges
    assert registry.cdn.bytes_by_digest[layer.digest] <= 1.02 * layer.size
    pulled = client.models / "blobs" / layer.digest.replace(":", "-")
    assert pulled.stat().st_size == layer.size
    print(f"cold pull of {layer.size / 1e6:.0f} MB through the mirror: {time.monotonic() - began:.1f}s")


def test_real_client_warm_pulls_in_a_loop(
    registry: FakeRegistry, start_mirror: MirrorFactory, ollama, tmp_path: Path
) -> None:
    """The warm pull that once failed one time in 35 with "digest mismatch" (another response's
    bytes on its connection): the resolving GET hangs up after the headers, then the parts."""
    layers = [write_blob(registry.directory, size, seed=40 + i) for i, size in enumerate([50_000_000, 3_000, 700])]
    manifest = registry.add_model("library/loop", "1", layers)
    mirror = start_mirror()
    name = f"127.0.0.1:{mirror.port}/library/loop:1"
    client = ollama("loop")
    pulls = int(os.environ.get("REAL_CLIENT_PULLS", "50"))
    for attempt in range(pulls):
        result = client.pull(name, timeout=120)
        assert result.returncode == 0, f"pull {attempt + 1} of {pulls}: {result.stderr[-2000:]}"
        assert client.list_models()[name] == _model_id(manifest)
        removed = client.cli("rm", name, timeout=60)
        assert removed.returncode == 0, removed.stderr
    assert registry.cdn.bytes_sent <= 1.02 * sum(layer.size for layer in layers)  # filled once, then warm
    log = (client.home / "ollama.log").read_text()
    assert "Unsolicited response" not in log and "digest mismatch" not in log


def _error_line(result: subprocess.CompletedProcess[str]) -> str:
    """What the CLI's last line says, from ``Error:`` on (progress output may precede it)."""
    lines = [line for line in re.split(r"[\r\n]", result.stderr) if "Error: " in line]
    assert lines, result.stderr[-2000:]
    return lines[-1][lines[-1].index("Error: "):].rstrip()


def test_real_client_prints_why_a_pull_fails_in_one_sentence(
    registry: FakeRegistry, start_mirror: MirrorFactory, ollama, tmp_path: Path
) -> None:
    """Ollama prints a registry error's body after the status; a 404's it never prints."""
    mirror = start_mirror()
    host = f"127.0.0.1:{mirror.port}"
    client = ollama("errors")

    missing = client.pull(f"{host}/library/nothing:here", timeout=120)
    assert missing.returncode != 0
    assert _error_line(missing) == ("Error: pull model manifest: 400: library/nothing:here is not in the upstream "
                                    f"registry {registry.url}: check the model's name and tag")

    upstream = registry.url.removeprefix("http://")
    registry.server.stop()
    down = client.pull(f"{host}/library/tiny:1b", timeout=120)
    assert down.returncode != 0
    assert _error_line(down) == (f"Error: pull model manifest: 502: the mirror cannot connect to {upstream}: "
                                 "connection refused; check that the registry is up and that --upstream (or "
                                 "--registry) names the right host and port")


def test_real_client_rm_and_show_of_a_missing_model_through_ollama_host(
    start_mirror: MirrorFactory, ollama
) -> None:
    mirror = start_mirror()
    admin = ollama("admin", start=False)  # only the CLI: it talks to the mirror
    for command in ("rm", "show"):
        result = admin.cli(command, "nothere", host=f"127.0.0.1:{mirror.port}", timeout=60)
        assert result.returncode != 0
        assert _error_line(result) == "Error: model 'nothere' not found"  # as Ollama itself says it


def test_real_client_too_old_for_a_model_gets_upstreams_412_after_a_newer_client_cached_it(
    registry: FakeRegistry, start_mirror: MirrorFactory, ollama, tmp_path: Path
) -> None:
    """The registry refuses 0.9.3 a model that needs 0.30: so must the mirror, whoever cached it first."""
    manifest = registry.add_model("library/gated", "1", [write_blob(registry.directory, 300_000, seed=14)])
    registry.min_ollama[("library/gated", "1")] = (0, 30, 0)
    mirror = start_mirror()
    host = f"127.0.0.1:{mirror.port}"
    newer = asyncio.run(GgufClient(mirror.url(), tmp_path / "newer").pull("library/gated", "1"))  # v0.32.15
    assert newer.error is None and newer.manifest == manifest

    client = ollama("old")
    result = client.pull(f"{host}/library/gated:1", timeout=120)
    direct = client.pull(f"{registry.url.removeprefix('http://')}/library/gated:1", timeout=120)
    assert result.returncode != 0 and direct.returncode != 0
    assert NEWER_OLLAMA_NEEDED.decode().strip() in result.stderr
    assert result.stderr.splitlines()[-8:] == direct.stderr.splitlines()[-8:]  # word for word as a direct pull
