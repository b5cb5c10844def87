"""The disk: --max-size eviction of least-recently-used models, `gc`, and refusing fills the disk cannot hold."""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from mirror.metadata import Metadata
from mirror.names import Digest, Name

from .conftest import MirrorFactory
from .fakes import Blob, FakeRegistry, assert_store_verified, write_blob
from .test_seeding import blob_path, cli

MB = 1_000_000


def _models(registry: FakeRegistry) -> dict[str, list[Blob]]:
    """old (2 MB + shared), pinned (2 MB + shared), new (2 MB): a shared 1 MB blob, as models share licenses."""
    shared = write_blob(registry.directory, 1 * MB, seed=71)
    layers = {"old": [write_blob(registry.directory, 2 * MB, seed=72), shared],
              "pinned": [write_blob(registry.directory, 2 * MB, seed=73), shared],
              "new": [write_blob(registry.directory, 2 * MB, seed=74)]}
    for model, blobs in layers.items():
        registry.add_model(f"library/{model}", "latest", blobs)
    return layers


def _pull(base: str, model: str, layers: list[Blob]) -> None:
    with httpx.Client(base_url=base, timeout=60) as client:
        assert client.get(f"/v2/library/{model}/manifests/latest").status_code == 200
        for blob in layers:
            assert client.get(f"/v2/library/{model}/blobs/{blob.digest}").status_code == 200


def _manifest_path(cache: Path, registry: FakeRegistry, model: str) -> Path:
    return cache / "manifests" / registry.url.removeprefix("http://") / "library" / model / "latest"


def _age(cache: Path, blobs: list[Blob], seconds_ago: float) -> None:
    """Set last access, as if the blobs were last read that long ago."""
    meta = Metadata(cache / ".mirror" / "meta")
    try:
        for blob in blobs:
            meta.touch_blob(Digest.parse(blob.digest), time.time() - seconds_ago)
    finally:
        meta.close()


def _pin(cache: Path, registry: FakeRegistry, model: str) -> None:
    meta = Metadata(cache / ".mirror" / "meta")
    try:
        meta.set_pinned(registry.url.removeprefix("http://"), Name.parse(f"library/{model}"), "latest", True)
    finally:
        meta.close()


def test_gc_evicts_least_recently_used_models_whole_and_keeps_pinned_and_shared(
    registry: FakeRegistry, start_mirror: MirrorFactory, tmp_path: Path
) -> None:
    layers = _models(registry)
    mirror = start_mirror()
    for model, blobs in layers.items():
        _pull(mirror.url(), model, blobs)
    mirror.stop()
    cache = tmp_path / "cache"
    _age(cache, layers["pinned"], 3000)  # oldest, but pinned
    _age(cache, layers["old"], 2000)
    _age(cache, layers["new"], 10)
    _pin(cache, registry, "pinned")

    # store ~8 MB; a 7 MB limit with a 0.9 low watermark must free ~1.7 MB: the oldest unpinned model
    dry = cli("gc", "--max-size", "7000000", "--dry-run", cache=cache, upstream=registry.url)
    assert dry.returncode == 0, dry.stderr
    assert "would evict" in dry.stdout and "old:latest" in dry.stdout
    assert "pinned" not in dry.stdout and "new:latest" not in dry.stdout
    assert all(blob_path(cache, b).exists() for bs in layers.values() for b in bs)  # dry run: nothing gone

    done = cli("gc", "--max-size", "7000000", cache=cache, upstream=registry.url)
    assert done.returncode == 0, done.stderr
    assert not _manifest_path(cache, registry, "old").exists()
    assert not blob_path(cache, layers["old"][0]).exists()
    assert blob_path(cache, layers["old"][1]).exists()  # shared with the pinned model: kept
    assert _manifest_path(cache, registry, "pinned").exists() and _manifest_path(cache, registry, "new").exists()
    assert all(blob_path(cache, b).exists() for b in layers["pinned"] + layers["new"])
    assert_store_verified(cache)

    # the evicted model is simply filled again on the next pull
    again = start_mirror()
    _pull(again.url(), "old", layers["old"])
    assert blob_path(cache, layers["old"][0]).exists()


@contextlib.contextmanager
def _streaming(base: str, path: str) -> Iterator[None]:
    """A client in the middle of reading a blob."""
    with httpx.Client(base_url=base, timeout=60) as client, client.stream("GET", path) as response:
        assert response.status_code == 200
        next(response.iter_raw(64 << 10))
        yield


def test_server_evicts_after_a_fill_but_never_what_is_being_served(
    registry: FakeRegistry, start_mirror: MirrorFactory, tmp_path: Path
) -> None:
    layers = _models(registry)
    cache = tmp_path / "cache"
    mirror = start_mirror(max_size="6900000")
    _pull(mirror.url(), "old", layers["old"])
    _pull(mirror.url(), "pinned", layers["pinned"])
    _age(cache, layers["old"], 2000)
    _age(cache, layers["pinned"], 1000)
    # a client still reading the oldest model's blob: that model must survive, the next oldest goes
    with _streaming(mirror.url(), f"/v2/library/old/blobs/{layers['old'][0].digest}"):
        _pull(mirror.url(), "new", layers["new"])  # the store passes 6.9 MB: the fill's end starts eviction
        deadline = time.monotonic() + 20
        while blob_path(cache, layers["pinned"][0]).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _manifest_path(cache, registry, "pinned").exists()
        assert not blob_path(cache, layers["pinned"][0]).exists()
        assert blob_path(cache, layers["old"][0]).exists() and _manifest_path(cache, registry, "old").exists()
    assert _manifest_path(cache, registry, "new").exists()
    used = sum(p.stat().st_size for p in (cache / "blobs").iterdir())
    assert used <= 6_900_000 * 0.9
    assert_store_verified(cache)


def test_a_fill_the_disk_cannot_hold_is_refused_with_507(
    registry: FakeRegistry, start_mirror: MirrorFactory, tmp_path: Path
) -> None:
    blob = write_blob(registry.directory, 2 * MB, seed=75)
    registry.add_model("library/huge", "latest", [blob])
    free = shutil.disk_usage(tmp_path).free
    mirror = start_mirror(min_free=str(free + (1 << 30)))  # more than the disk has: nothing fits
    with httpx.Client(base_url=mirror.url(), timeout=30) as client:
        got = client.get(f"/v2/library/huge/blobs/{blob.digest}")
        assert got.status_code == 507
        assert got.json()["errors"][0]["code"] == "STORE_FULL"
        assert "--min-free" in got.json()["errors"][0]["message"]
        pulled = client.post("/api/pull", json={"model": f"{registry.url.removeprefix('http://')}/library/huge"})
        assert "not enough disk space" in pulled.text
    assert registry.cdn.bytes_by_digest.get(blob.digest, 0) == 0  # refused before any byte was fetched
    assert not blob_path(tmp_path / "cache", blob).exists()
    assert not list((tmp_path / "cache" / ".mirror" / "staging").glob("*.data"))


def test_full_disk_fails_the_fill_cleanly_and_the_store_stays_consistent(
    registry: FakeRegistry, start_mirror: MirrorFactory, small_disk: Path
) -> None:
    fits = write_blob(registry.directory, 4 * MB, seed=76)
    too_big = write_blob(registry.directory, 9 * MB, seed=77)
    registry.add_model("library/fits", "latest", [fits])
    registry.add_model("library/toobig", "latest", [too_big])
    cache = small_disk / "cache"
    mirror = start_mirror(cache_dir=cache, min_free="0")  # no margin: the disk itself says no (ENOSPC)
    _pull(mirror.url(), "fits", [fits])
    with httpx.Client(base_url=mirror.url(), timeout=30) as client:
        got = client.get(f"/v2/library/toobig/blobs/{too_big.digest}")
        assert got.status_code == 507, got.text
        assert client.get(f"/v2/library/fits/blobs/{fits.digest}").content == fits.path.read_bytes()
    assert not blob_path(cache, too_big).exists()
    assert_store_verified(cache)


def test_a_disk_filled_by_something_else_fails_requests_cleanly(
    registry: FakeRegistry, start_mirror: MirrorFactory, small_disk: Path
) -> None:
    """Another program eats the disk while the mirror runs: new fills and manifests fail with
    clear errors, cached models keep being served, and nothing half-written appears."""
    cached = write_blob(registry.directory, 3 * MB, seed=78)
    fresh = write_blob(registry.directory, 1 * MB, seed=79)
    registry.add_model("library/cached", "latest", [cached])
    registry.add_model("library/fresh", "latest", [fresh])
    cache = small_disk / "cache"
    mirror = start_mirror(cache_dir=cache, min_free="0", manifest_ttl=0)
    _pull(mirror.url(), "cached", [cached])
    filler = small_disk / "filler"
    with contextlib.suppress(OSError), open(filler, "wb") as f:  # up to ENOSPC (closing it may say so again)
        while True:
            f.write(b"\0" * (256 << 10))
            f.flush()
    with httpx.Client(base_url=mirror.url(), timeout=30) as client:
        manifest = client.get("/v2/library/fresh/manifests/latest")
        assert manifest.status_code in (200, 507), manifest.text  # served uncached, or refused: never a 500
        blob = client.get(f"/v2/library/fresh/blobs/{fresh.digest}")
        assert blob.status_code == 507, blob.text
        assert client.get("/v2/library/cached/manifests/latest").status_code == 200
        assert client.get(f"/v2/library/cached/blobs/{cached.digest}").content == cached.path.read_bytes()
    filler.unlink()
    assert_store_verified(cache)
    with httpx.Client(base_url=mirror.url(), timeout=30) as client:  # space again: it works again
        assert client.get(f"/v2/library/fresh/blobs/{fresh.digest}").content == fresh.path.read_bytes()
