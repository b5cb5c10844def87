"""An upstream that misbehaves: oversized manifests, sizes that lie, tags that move under us."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import httpx
import pytest

from .conftest import MirrorFactory
from .fakes import FakeRegistry, assert_store_verified, write_blob


def test_oversized_manifest_is_refused_and_not_cached(registry: FakeRegistry, start_mirror: MirrorFactory,
                                                      tmp_path: Path) -> None:
    huge = json.dumps({"schemaVersion": 2, "layers": [], "padding": "x" * (5 << 20)}).encode()
    registry.manifests[("library/huge", "1")] = huge
    mirror = start_mirror()
    with httpx.Client(base_url=mirror.url(), timeout=30) as client:
        got = client.get("/v2/library/huge/manifests/1")
    assert got.status_code == 502 and "exceeds" in got.json()["errors"][0]["message"]
    assert not list((tmp_path / "cache" / "manifests").rglob("1"))


def test_blob_whose_size_differs_from_the_manifest_is_never_stored(
    registry: FakeRegistry, start_mirror: MirrorFactory, tmp_path: Path
) -> None:
    layer = write_blob(registry.directory, 2_000_000, seed=150)
    manifest = json.loads(registry.add_model("library/liar", "1", [layer]))
    manifest["layers"][0]["size"] = layer.size + 10  # the manifest lies about the size
    registry.manifests[("library/liar", "1")] = json.dumps(manifest).encode()
    mirror = start_mirror()
    with httpx.Client(base_url=mirror.url(), timeout=30) as client:
        assert client.get("/v2/library/liar/manifests/1").status_code == 200
        try:
            got = client.get(f"/v2/library/liar/blobs/{layer.digest}")
            failed = got.status_code >= 500
        except httpx.HTTPError:
            failed = True  # cut off mid-body: a clean end is what must never happen
    assert failed
    assert not (tmp_path / "cache" / "blobs" / layer.digest.replace(":", "-")).exists()
    assert_store_verified(tmp_path / "cache")


def test_a_tag_that_moves_between_reads_is_stored_by_what_was_read(
    registry: FakeRegistry, start_mirror: MirrorFactory, tmp_path: Path
) -> None:
    layers = [write_blob(registry.directory, 1000, seed=151 + i) for i in range(2)]
    mirror = start_mirror(manifest_ttl=0)
    seen = []
    with httpx.Client(base_url=mirror.url(), timeout=30) as client:
        for layer in layers:
            registry.add_model("library/moving", "1", [layer])
            got = client.get("/v2/library/moving/manifests/1")
            digest = "sha256:" + hashlib.sha256(got.content).hexdigest()
            assert got.headers["Docker-Content-Digest"] == digest  # the digest names the bytes sent
            seen.append(digest)
            assert client.get(f"/v2/library/moving/manifests/{digest}").content == got.content
    assert seen[0] != seen[1]
    assert_store_verified(tmp_path / "cache")


def test_cdn_that_ignores_range_is_read_in_one_stream(
    registry: FakeRegistry, start_mirror: MirrorFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Splitting the blob would fetch it whole once per part (10x the blob for 200 MB): the first
    200 to a Range request switches the fill to one stream, said once in the log."""
    caplog.set_level(logging.WARNING, logger="mirror.fill")
    layer = write_blob(registry.directory, 60_000_000, seed=151)
    registry.add_model("library/norange", "1", [layer])
    registry.cdn.ignore_range = True
    mirror = start_mirror(chunk_size=4 << 20)
    url = f"{mirror.url()}/v2/library/norange/blobs/{layer.digest}"
    with httpx.Client(timeout=60) as client:
        tail = client.get(url, headers={"Range": f"bytes={layer.size - 1000}-"})
        whole = client.get(url)
    data = layer.path.read_bytes()
    assert tail.status_code == 206 and tail.content == data[-1000:]
    assert whole.status_code == 200 and whole.content == data
    assert registry.cdn.bytes_by_digest[layer.digest] <= 1.05 * layer.size
    assert len([r for r in caplog.records if "one-stream" in r.getMessage()]) == 1
    assert_store_verified(tmp_path / "cache")


def test_blob_the_registry_does_not_have_is_404_not_a_mirror_failure(
    registry: FakeRegistry, start_mirror: MirrorFactory
) -> None:
    layer = write_blob(registry.directory, 5000, seed=152)
    registry.add_model("library/ghost", "1", [layer])
    mirror = start_mirror()
    with httpx.Client(base_url=mirror.url(), timeout=30) as client:
        assert client.get("/v2/library/ghost/manifests/1").status_code == 200
        del registry.cdn.blobs[layer.digest]  # the registry lists it, yet answers 404 for it
        got = client.get(f"/v2/library/ghost/blobs/{layer.digest}")
    assert got.status_code == 404 and got.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
