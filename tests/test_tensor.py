"""Tensor models (safetensors layers) through the mirror, pulled by the stand-in of Ollama's current
tensor downloader (tests/clients/tensor.py, after x/transfer at v0.32.15).

That client reads the whole body of its first GET of a blob only to learn where to fetch it, then
GETs the blob again. The mirror answers that first GET with a 307 to itself, spelled as another host
(``names.respelled``), so each blob crosses the LAN once, and a cold blob's resolve is answered at once.
"""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mirror.names import respelled

from .clients.gguf import GgufClient, GgufOptions
from .clients.tensor import TensorClient, TensorOptions
from .clients.wire import PullResult
from .conftest import MirrorFactory
from .fakes import Blob, FakeRegistry, wait_for_text, write_blob
from .test_transparent import REGISTRY, TransparentMirror

MB = 1_000_000
SOCKET_BUFFERS = 8 << 20  # loopback's autotuned send and receive buffers hold a few MB in flight
QUICK = TensorOptions(slow_after=1.0, tick=0.05, stall_timeout=10.0)


def _model(registry: FakeRegistry, tag: str, sizes: list[int], seed: int) -> list[Blob]:
    blobs = [write_blob(registry.directory, size, seed + i) for i, size in enumerate(sizes)]
    registry.add_model("library/img", tag, [(b, "tensor") for b in blobs])
    return blobs


def _served(base: str) -> float:
    """The blob bytes the mirror says it sent: what crossed the LAN."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("ollama_mirror_served_bytes_total"))


def _pull(base: str, tag: str, dest: Path, options: TensorOptions = QUICK) -> PullResult:
    return asyncio.run(TensorClient(base, dest, options).pull("library/img", tag))


def _check(result: PullResult, dest: Path, blobs: list[Blob]) -> None:
    assert result.error is None, (result.error, result.events)
    assert not result.events_of("too slow"), result.events
    for blob in blobs:
        assert (dest / blob.digest.replace(":", "-")).read_bytes() == blob.path.read_bytes(), blob.digest
        record = result.blobs[blob.digest]
        assert record.resolve_bytes == 0, "the resolving GET cost a transfer"


def _pulled_bytes(registry: FakeRegistry, tag: str) -> int:
    """Every blob of the model, its config included: what one pull must move."""
    manifest = json.loads(registry.manifests[("library/img", tag)])
    return sum(layer["size"] for layer in [manifest["config"], *manifest["layers"]])


def test_each_blob_crosses_the_lan_once_cold_and_warm(
    registry: FakeRegistry, start_mirror: MirrorFactory, tmp_path: Path
) -> None:
    blobs = _model(registry, "1", [4 * MB, 4 * MB, 3 * MB, 200_000], seed=300)
    mirror = start_mirror()
    total = _pulled_bytes(registry, "1")
    for run in ("cold", "warm"):
        before = _served(mirror.url())
        result = _pull(mirror.url(), "1", tmp_path / run)
        _check(result, tmp_path / run, blobs)
        assert _served(mirror.url()) - before <= 1.02 * total, run
        for blob in blobs:
            assert result.blobs[blob.digest].direct_url == (
                f"http://{respelled(f'127.0.0.1:{mirror.port}', 'http')}/v2/library/img/blobs/{blob.digest}?direct=1")
    for blob in blobs:
        assert registry.cdn.bytes_by_digest[blob.digest] <= 1.02 * blob.size  # upstream paid once


def test_the_resolving_get_of_a_cold_blob_answers_at_once(
    registry: FakeRegistry, start_mirror: MirrorFactory
) -> None:
    (blob,) = _model(registry, "2", [8 * MB], seed=310)
    registry.cdn.rate = 1 * MB  # per connection: the fill takes seconds
    mirror = start_mirror()
    url = f"http://localhost:{mirror.port}/v2/library/img/blobs/{blob.digest}"
    began = time.monotonic()
    got = httpx.get(url, headers={"User-Agent": "ollama-transfer/1.0"}, follow_redirects=False, timeout=30)
    assert got.status_code == 307 and time.monotonic() - began < 1.0
    assert got.headers["location"] == f"http://LOCALHOST:{mirror.port}/v2/library/img/blobs/{blob.digest}?direct=1"
    assert got.content == b""
    deadline = time.monotonic() + 10
    while not registry.cdn.bytes_by_digest.get(blob.digest):  # the fill started with the resolve
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_half_warm_pull_brings_the_cold_layers_without_too_slow_retries(
    registry: FakeRegistry, start_mirror: MirrorFactory, tmp_path: Path
) -> None:
    shared = _model(registry, "warm", [1 * MB] * 6, seed=320)
    cold = [write_blob(registry.directory, 6 * MB, seed=330 + i) for i in range(2)]
    registry.add_model("library/img", "half", [(b, "tensor") for b in [*shared, *cold]])
    mirror = start_mirror()
    _check(_pull(mirror.url(), "warm", tmp_path / "first"), tmp_path / "first", shared)
    registry.cdn.rate = 4 * MB  # per connection, for the cold layers
    before = _served(mirror.url())
    result = _pull(mirror.url(), "half", tmp_path / "second")
    _check(result, tmp_path / "second", [*shared, *cold])
    assert _served(mirror.url()) - before <= 1.02 * _pulled_bytes(registry, "half")


def test_an_interrupted_large_blob_resumes_with_a_range(
    registry: FakeRegistry, start_mirror: MirrorFactory, tmp_path: Path
) -> None:
    (big,) = _model(registry, "4", [12 * MB], seed=340)
    mirror = start_mirror()
    cut: dict[str, int] = {}

    def interrupt(digest: str, received: int) -> bool:
        if digest == big.digest and not cut and received >= big.size // 2:
            cut[digest] = received
            return True
        return False

    options = TensorOptions(slow_after=1.0, tick=0.05, stall_timeout=10.0, resume_threshold=4 * MB)
    before = _served(mirror.url())
    client = TensorClient(mirror.url(), tmp_path / "client", options, interrupt=interrupt)
    result = asyncio.run(client.pull("library/img", "4"))
    _check(result, tmp_path / "client", [big])
    assert cut, "the transfer was never interrupted"
    ranges = [r.headers.get("range") for r in result.blob_requests(big.digest)]
    assert any(r and r.startswith("bytes=") and r.endswith("-") for r in ranges), ranges
    # Once, plus what sat in the two kernels' socket buffers when the client cut its connection.
    assert _served(mirror.url()) - before <= _pulled_bytes(registry, "4") + SOCKET_BUFFERS


@pytest.fixture
def dns_mirror(registry: FakeRegistry, tmp_path: Path) -> Iterator[TransparentMirror]:
    mirror = TransparentMirror(tmp_path / "cache", registry)
    yield mirror
    mirror.stop(signal.SIGTERM)


def test_dns_mode_sends_the_tensor_client_to_the_registry_name_respelled(
    registry: FakeRegistry, dns_mirror: TransparentMirror, tmp_path: Path
) -> None:
    """The LAN's DNS sends registry.ollama.ai to the mirror; the redirect keeps the name (case is
    nothing to DNS or to a certificate), so TLS and the address hold."""
    blobs = _model(registry, "5", [3 * MB, 300_000], seed=350)
    context = ssl.create_default_context(cafile=str(dns_mirror.ca))
    options = TensorOptions(slow_after=1.0, tick=0.05, stall_timeout=10.0, hosts={REGISTRY: "127.0.0.1"},
                            ssl_context=context)
    base = f"https://{REGISTRY}:{dns_mirror.tls_port}"
    result = _pull(base, "5", tmp_path / "client", options)
    _check(result, tmp_path / "client", blobs)
    for blob in blobs:
        assert result.blobs[blob.digest].direct_url.startswith(f"https://{REGISTRY.upper()}:{dns_mirror.tls_port}/")
        assert registry.cdn.bytes_by_digest[blob.digest] <= 1.02 * blob.size


def test_other_clients_still_get_the_blob_from_a_get_without_range(
    registry: FakeRegistry, start_mirror: MirrorFactory
) -> None:
    """Only x/transfer's User-Agent is redirected: curl, registry clients and Ollama's GGUF path keep the body."""
    (blob,) = _model(registry, "6", [500_000], seed=360)
    mirror = start_mirror()
    url = f"{mirror.url()}/v2/library/img/blobs/{blob.digest}"
    for agent in ("curl/8.0", "ollama/0.32.15 (amd64 linux) Go/go1.26.0", "Go-http-client/1.1"):
        got = httpx.get(url, headers={"User-Agent": agent}, timeout=30)
        assert got.status_code == 200 and got.content == blob.path.read_bytes(), agent


@pytest.mark.parametrize("host,scheme,other", [
    ("mirror.lan:11435", "http", "MIRROR.LAN:11435"),
    ("Mirror.Lan", "http", "MIRROR.LAN"),
    ("MIRROR.LAN", "https", "mirror.lan"),
    ("127.0.0.1:11435", "http", "[::ffff:127.0.0.1]:11435"),
    ("10.0.0.5", "http", "10.0.0.5:80"),
    ("10.0.0.5:443", "https", "10.0.0.5"),
    ("[::1]:8080", "http", "[0000:0000:0000:0000:0000:0000:0000:0001]:8080"),
])
def test_respelled_hosts_differ_as_text_and_reach_the_same_server(host: str, scheme: str, other: str) -> None:
    assert respelled(host, scheme) == other != host



def test_proxy_mode_says_once_that_a_tensor_models_blobs_bypass_it(
    registry: FakeRegistry, dns_mirror: TransparentMirror
) -> None:
    """x/transfer's transport has no proxy: through HTTPS_PROXY only its manifest reaches the mirror."""
    _model(registry, "7", [100_000], seed=370)
    registry.add_model("library/gguf", "1", [write_blob(registry.directory, 100_000, seed=371)])
    context = ssl.create_default_context(cafile=str(dns_mirror.ca))
    with httpx.Client(proxy=dns_mirror.proxy, verify=context, timeout=30) as client:
        for _ in range(3):
            assert client.get(f"https://{REGISTRY}/v2/library/img/manifests/7").status_code == 200
        assert client.get(f"https://{REGISTRY}/v2/library/gguf/manifests/1").status_code == 200
    text = wait_for_text(dns_mirror.log, "proxy bypassed")
    lines = [line for line in text.splitlines() if "proxy bypassed" in line]
    assert len(lines) == 1 and f"model={REGISTRY}/library/img:7" in lines[0] and "--tls-listen" in lines[0]


def test_gguf_parts_of_a_cold_blob_all_get_bytes_in_time_under_a_tight_upstream_rate(
    registry: FakeRegistry, start_mirror: MirrorFactory, tmp_path: Path
) -> None:
    """Ollama 0.32+ counts a part's 30 s from when its request is sent: 16 parts at 16 offsets of a
    cold blob, through a mirror capped at 2 MiB/s for everything, each see bytes well within it
    (here 8 s, the blob taking 12 s to fill)."""
    layer = write_blob(registry.directory, 24 * MB, seed=380)
    registry.add_model("library/gguf", "tight", [layer])
    mirror = start_mirror(upstream_rate="2M")
    options = GgufOptions(min_part=1_000_000, stall_timeout=8.0)
    result = asyncio.run(GgufClient(mirror.url(), tmp_path / "client", options).pull("library/gguf", "tight"))
    assert result.error is None, (result.error, result.events)
    assert not result.events_of("stalled"), result.events_of("stalled")
    assert (tmp_path / "client" / layer.digest.replace(":", "-")).read_bytes() == layer.path.read_bytes()
