"""The stand-ins for current Ollama clients (tests/clients), against the fakes, a mirror and the real 0.9.3.

The registry and the CDN are wrapped in ``Recording`` here, so that a test sees
the order in which requests reached upstream across both servers.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from .clients import (
    GO_USER_AGENT,
    OLLAMA_USER_AGENT,
    TRANSFER_USER_AGENT,
    GgufClient,
    GgufOptions,
    PullResult,
    TensorClient,
    TensorOptions,
)
from .conftest import MirrorFactory
from .fakes import Blob, FakeRegistry, Fault, PacedCDN, Recording, Seen, ServerThread, write_blob

SMALL_PARTS = GgufOptions(min_part=100_000)  # a 1 MB blob in 10 parts


@pytest.fixture
def seen() -> list[Seen]:
    return []


@pytest.fixture
def cdn(seen: list[Seen]) -> Iterator[PacedCDN]:
    """conftest's CDN, recorded, and able to send chosen blobs slowly."""
    fake = PacedCDN()
    server = ServerThread(Recording(fake, "cdn", seen)).start()
    fake.url = server.url("localhost")
    yield fake
    server.stop()


@pytest.fixture
def registry(cdn: PacedCDN, tmp_path: Path, seen: list[Seen]) -> Iterator[FakeRegistry]:
    """conftest's registry, recorded."""
    directory = tmp_path / "upstream"
    directory.mkdir()
    fake = FakeRegistry(cdn, cdn.url, directory)
    server = ServerThread(Recording(fake, "registry", seen)).start()
    fake.url = server.url()
    fake.server = server
    yield fake
    server.stop()


def _blobs(registry: FakeRegistry, sizes: list[int], seed: int) -> list[Blob]:
    return [write_blob(registry.directory, size, seed + i) for i, size in enumerate(sizes)]


def _config(registry: FakeRegistry, name: str, tag: str) -> str:
    return json.loads(registry.manifests[(name, tag)])["config"]["digest"]


def _assert_pulled(result: PullResult, dest: Path, blobs: list[Blob]) -> None:
    assert result.error is None, result.events
    for blob in blobs:
        assert (dest / blob.digest.replace(":", "-")).read_bytes() == blob.path.read_bytes(), blob.digest


def _cdn_ranges(seen: list[Seen], digest: str) -> list[str | None]:
    return [s.headers.get("range") for s in seen if s.server == "cdn" and s.digest == digest]


# --- GGUF path (server/download.go) ---------------------------------------------------------------


def test_gguf_standin_direct_pull_gets_each_byte_once(registry: FakeRegistry, seen: list[Seen],
                                                      tmp_path: Path) -> None:
    registry.require_token = True
    model, template = _blobs(registry, [1_000_000, 3_000], seed=1)
    registry.add_model("library/m", "1", [model, (template, "template")])
    config = _config(registry, "library/m", "1")
    dest = tmp_path / "client"

    result = asyncio.run(GgufClient(registry.url, dest, SMALL_PARTS).pull("library/m", "1"))

    _assert_pulled(result, dest, [model, template])
    assert result.manifest == registry.manifests[("library/m", "1")]
    for blob in (model, template):
        assert registry.cdn.bytes_by_digest[blob.digest] == blob.size
        assert result.blobs[blob.digest].received == blob.size
    # One blob at a time, the layers then the config: HEAD, resolving GET, then the parts at the CDN.
    order = [s.digest for s in seen if s.digest and s.method == "HEAD"]
    assert order == [model.digest, template.digest, config]
    steps = [(s.server, s.method, s.headers.get("range") is not None) for s in seen if s.digest == model.digest]
    assert steps == [("registry", "HEAD", False), ("registry", "GET", False)] + [("cdn", "GET", True)] * 10
    assert sorted(_cdn_ranges(seen, model.digest), key=lambda r: int(r[6:].split("-")[0])) == [
        f"bytes={a}-{a + 99_999}" for a in range(0, 1_000_000, 100_000)]
    for s in seen:
        if s.server == "cdn":  # parts: Go's default User-Agent, never credentials
            assert s.headers["user-agent"] == GO_USER_AGENT and "authorization" not in s.headers
        elif s.digest:
            assert s.headers["user-agent"] == OLLAMA_USER_AGENT and s.headers["authorization"].startswith("Bearer ")


def test_gguf_standin_through_mirror(registry: FakeRegistry, start_mirror: MirrorFactory, tmp_path: Path) -> None:
    model, params = _blobs(registry, [1_000_000, 96], seed=2)
    registry.add_model("library/m", "2", [model, (params, "params")])
    mirror = start_mirror()
    dest = tmp_path / "client"

    result = asyncio.run(GgufClient(mirror.url(), dest, SMALL_PARTS).pull("library/m", "2"))

    _assert_pulled(result, dest, [model, params])
    assert result.blobs[model.digest].direct_url == f"{mirror.url()}/v2/library/m/blobs/{model.digest}"
    assert all(r.url.startswith(mirror.url()) for r in result.requests)
    for blob in (model, params):
        assert result.blobs[blob.digest].received == blob.size  # the resolving GET's body is never read
        assert registry.cdn.bytes_by_digest[blob.digest] <= 1.02 * blob.size  # one fill


def test_gguf_standin_takes_a_200_to_a_range_for_its_part(registry: FakeRegistry, tmp_path: Path) -> None:
    """No status or Content-Range check: every part but the first gets the blob's first bytes."""
    (model,) = _blobs(registry, [1_000_000], seed=3)
    registry.add_model("library/m", "3", [model])
    registry.cdn.ignore_range = True
    dest = tmp_path / "client"

    result = asyncio.run(GgufClient(registry.url, dest, SMALL_PARTS).pull("library/m", "3"))

    assert result.error is not None and result.error.startswith("digest mismatch, file must be downloaded again")
    assert result.blobs[model.digest].received == model.size  # exactly each part's length was read
    assert not (dest / model.digest.replace(":", "-")).exists()


def test_gguf_standin_stall_clock_starts_when_the_part_is_sent(registry: FakeRegistry, seen: list[Seen],
                                                               tmp_path: Path) -> None:
    """v0.32.2+: headers then silence is a stall (0.9.3 waited for a first byte for ever)."""
    (model,) = _blobs(registry, [100_000], seed=4)
    registry.add_model("library/m", "4", [model])
    registry.cdn.faults.append(Fault("stall", after=0, seconds=1.0))
    options = GgufOptions(min_part=100_000, stall_timeout=0.4)
    dest = tmp_path / "client"

    result = asyncio.run(GgufClient(registry.url, dest, options).pull("library/m", "4"))

    _assert_pulled(result, dest, [model])
    assert [e.digest for e in result.events_of("stalled")] == [model.digest]
    assert _cdn_ranges(seen, model.digest) == ["bytes=0-99999", "bytes=0-99999"]
    assert result.blobs[model.digest].received == model.size


# --- Tensor path (x/transfer) -------------------------------------------------------------------


def _tensor_model(registry: FakeRegistry, name: str, tag: str, blobs: list[Blob]) -> None:
    registry.add_model(name, tag, [(b, "tensor") for b in blobs])


def test_tensor_standin_resolves_then_fetches_each_blob(registry: FakeRegistry, seen: list[Seen],
                                                        tmp_path: Path) -> None:
    registry.require_token = True
    blobs = _blobs(registry, [300_000] * 5 + [1_000], seed=10)
    _tensor_model(registry, "library/img", "1", blobs)
    config = _config(registry, "library/img", "1")
    dest = tmp_path / "client"

    result = asyncio.run(TensorClient(registry.url, dest).pull("library/img", "1"))

    _assert_pulled(result, dest, blobs)
    assert {s.headers["user-agent"] for s in seen if "/manifests/" in s.path} == {OLLAMA_USER_AGENT}
    for digest in [b.digest for b in blobs] + [config]:
        steps = [(s.server, s.method, s.headers.get("range"), s.headers["user-agent"]) for s in seen
                 if s.digest == digest]
        assert steps == [("registry", "GET", None, TRANSFER_USER_AGENT), ("cdn", "GET", None, TRANSFER_USER_AGENT)]
        assert result.blobs[digest].resolve_bytes == 0  # a 307 to another host is the answer, not fetched
    for blob in blobs:
        assert registry.cdn.bytes_by_digest[blob.digest] == blob.size == result.blobs[blob.digest].received
    assert all(s.headers["authorization"].startswith("Bearer ") for s in seen if s.server == "registry" and s.digest)
    assert not registry.cdn.saw_authorization  # the token goes only to the registry's own host:port


FAST_TIMERS = TensorOptions(slow_after=0.2, tick=0.05, stall_timeout=5.0)


def _slow_model(registry: FakeRegistry, cdn: PacedCDN, tag: str, seed: int, times: int) -> tuple[list[Blob], Blob]:
    """Eight 1 MB blobs, then one far slower than their median (16 KB/s, below a tenth of the median
    even on a busy machine): with 4 body slots it starts after five of them finished, so the median
    exists (speedTracker wants five samples)."""
    fast = _blobs(registry, [1 << 20] * 8, seed=seed)
    (slow,) = _blobs(registry, [12 << 10], seed=seed + 100)
    _tensor_model(registry, "library/img", tag, [*fast, slow])
    cdn.piece = 2 << 10
    cdn.pace(slow.digest, 16 << 10, times=times)
    return fast, slow


def test_tensor_standin_cancels_a_blob_far_below_the_median_as_too_slow(
        registry: FakeRegistry, cdn: PacedCDN, seen: list[Seen], tmp_path: Path) -> None:
    fast, slow = _slow_model(registry, cdn, "3", seed=30, times=1)
    dest = tmp_path / "client"

    result = asyncio.run(TensorClient(registry.url, dest, FAST_TIMERS).pull("library/img", "3"))

    _assert_pulled(result, dest, [*fast, slow])
    assert [(e.kind, e.digest) for e in result.events] == [("too slow", slow.digest)]
    assert _cdn_ranges(seen, slow.digest) == [None, None]  # whole-blob GETs: it is under resume_threshold
    # Cancelled, yet the slow body is read to its end (the deferred io.Copy(io.Discard)) before the retry.
    assert cdn.bytes_by_digest[slow.digest] == 2 * slow.size == result.blobs[slow.digest].received
    assert all(cdn.bytes_by_digest[b.digest] == b.size for b in fast)


def test_tensor_standin_counts_slow_retries_from_the_third_on(registry: FakeRegistry, cdn: PacedCDN,
                                                              tmp_path: Path) -> None:
    """download(): ``if slowRetries++; slowRetries >= 3 { attempt++ }``: slow retries 1 and 2 are free,
    every later one is an attempt. With 2 attempts the pull fails at the fourth slow transfer."""
    _, slow = _slow_model(registry, cdn, "4", seed=40, times=100)
    options = TensorOptions(slow_after=0.2, tick=0.05, stall_timeout=5.0, max_retries=2)

    result = asyncio.run(TensorClient(registry.url, tmp_path / "client", options).pull("library/img", "4"))

    assert result.error == "max retries exceeded: download too slow"
    assert [e.digest for e in result.events_of("too slow")] == [slow.digest] * 4


def test_tensor_standin_resumes_only_large_blobs_with_a_range(registry: FakeRegistry, seen: list[Seen],
                                                              tmp_path: Path) -> None:
    large, small = _blobs(registry, [400_000, 150_000], seed=50)
    _tensor_model(registry, "library/img", "5", [large, small])
    half = {large.digest: large.size // 2, small.digest: small.size // 2}
    dropped_at: dict[str, int] = {}

    def interrupt(digest: str, received: int) -> bool:
        """Drop each model blob's first transfer once half of it is in."""
        if digest in half and digest not in dropped_at and received >= half[digest]:
            dropped_at[digest] = received
            return True
        return False

    client = TensorClient(registry.url, tmp_path / "client", TensorOptions(resume_threshold=200_000), interrupt)
    result = asyncio.run(client.pull("library/img", "5"))

    _assert_pulled(result, tmp_path / "client", [large, small])
    assert set(dropped_at) == {large.digest, small.digest}
    assert _cdn_ranges(seen, large.digest) == [None, f"bytes={dropped_at[large.digest]}-"]
    assert _cdn_ranges(seen, small.digest) == [None, None]  # under the threshold: from scratch
    assert [e.kind for e in result.events] == ["retry", "retry"]


# --- The GGUF stand-in against the real client (0.9.3) ---------------------------------------------

# What v0.32.15 sends differently from 0.9.3 on a pull without faults, as (0.9.3, v0.32.15) pairs.
# server/images.go makeRequest: "ollama/%s (%s %s) Go/%s" with version.Version and runtime.Version();
# v0.32.15's go.mod says go 1.26.0 (its Dockerfile and release workflow build with it), 0.9.3's 1.24.0.
# The other changes since 0.9.3 (server/download.go: the stall clock counts from each part's request,
# v0.32.2) change timing under faults, not the requests of a pull that goes well.
DIFFERENCES = {"user-agent": [("ollama/0.9.3 (amd64 linux) Go/go1.24.0", OLLAMA_USER_AGENT)]}


def _as_0_9_3(headers: dict[str, str]) -> dict[str, str]:
    translated = dict(headers)
    for name, pairs in DIFFERENCES.items():
        for old, new in pairs:
            if translated.get(name) == new:
                translated[name] = old
    return translated


def _pull_sequence(seen: list[Seen], translate: bool) -> list[tuple[object, ...]]:
    """Per blob in order: its registry requests in order, then its CDN requests (concurrent: sorted)."""
    def step(s: Seen) -> tuple[object, ...]:
        headers = _as_0_9_3(s.headers) if translate else s.headers
        sent = tuple(sorted((k, v) for k, v in headers.items() if k != "host"))
        return (s.server, s.method, s.path, sent)

    sequence: list[tuple[object, ...]] = [step(s) for s in seen if s.digest is None]
    digests = list(dict.fromkeys(s.digest for s in seen if s.digest))
    for digest in digests:
        mine = [s for s in seen if s.digest == digest]
        sequence.append((digest, [step(s) for s in mine if s.server == "registry"],
                         sorted(step(s) for s in mine if s.server == "cdn")))
    return sequence


@pytest.mark.real_client
def test_gguf_standin_sends_what_the_real_client_sends(registry: FakeRegistry, seen: list[Seen], ollama,
                                                       tmp_path: Path) -> None:
    model, template = _blobs(registry, [101_000_000, 3_000], seed=60)  # two parts of the real split
    registry.add_model("library/same", "1", [model, (template, "template")])
    real = ollama("real")
    done = real.pull(f"127.0.0.1:{registry.server.port}/library/same:1", timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    by_real = _pull_sequence(seen, translate=False)
    seen.clear()

    result = asyncio.run(GgufClient(registry.url, tmp_path / "standin").pull("library/same", "1"))

    assert result.error is None, result.events
    assert _pull_sequence(seen, translate=True) == by_real
    assert sorted(_cdn_ranges(seen, model.digest)) == ["bytes=0-99999999", "bytes=100000000-100999999"]
