"""Manifest freshness: TTL, revalidation, stale serving, negative caching, pass-through."""

from __future__ import annotations

import hashlib
import time

import httpx

from .conftest import MirrorFactory
from .fakes import FakeRegistry, write_blob

UA = "ollama/0.9.3 (amd64 linux) Go/go1.24.0"


def _model(registry: FakeRegistry, seed: int) -> bytes:
    return registry.add_model("library/tag", "latest", [write_blob(registry.directory, 1000 + seed, seed=seed)])


def test_fresh_tag_is_served_without_asking_upstream(registry: FakeRegistry, start_mirror: MirrorFactory) -> None:
    manifest = _model(registry, 1)
    mirror = start_mirror(manifest_ttl=600)
    for _ in range(3):
        r = httpx.get(f"{mirror.url()}/v2/library/tag/manifests/latest")
        assert r.content == manifest
    assert registry.count("GET", "/manifests/latest") == 1
    assert r.headers["x-cache"] == "HIT"


def test_moved_tag_is_picked_up_after_the_ttl(registry: FakeRegistry, start_mirror: MirrorFactory) -> None:
    _model(registry, 1)
    mirror = start_mirror(manifest_ttl=0.5)
    httpx.get(f"{mirror.url()}/v2/library/tag/manifests/latest")
    moved = _model(registry, 2)
    time.sleep(0.6)
    r = httpx.get(f"{mirror.url()}/v2/library/tag/manifests/latest")
    assert r.content == moved and r.headers["x-cache"] == "REVALIDATED"
    assert r.headers["docker-content-digest"] == f"sha256:{hashlib.sha256(moved).hexdigest()}"


def test_stale_manifest_served_when_upstream_is_down(registry: FakeRegistry, start_mirror: MirrorFactory) -> None:
    manifest = _model(registry, 1)
    mirror = start_mirror(manifest_ttl=0)
    httpx.get(f"{mirror.url()}/v2/library/tag/manifests/latest")
    registry.server.stop()
    r = httpx.get(f"{mirror.url()}/v2/library/tag/manifests/latest")
    assert r.status_code == 200 and r.content == manifest
    assert r.headers["x-cache"] == "STALE" and "110" in r.headers["warning"]


def test_stale_manifest_served_when_upstream_is_slow(registry: FakeRegistry, start_mirror: MirrorFactory) -> None:
    manifest = _model(registry, 1)
    mirror = start_mirror(manifest_ttl=0, revalidate_timeout=0.5)
    httpx.get(f"{mirror.url()}/v2/library/tag/manifests/latest")
    registry.manifest_delay = 3
    began = time.monotonic()
    r = httpx.get(f"{mirror.url()}/v2/library/tag/manifests/latest")
    assert time.monotonic() - began < 2
    assert r.content == manifest and r.headers["x-cache"] == "STALE"


def test_stale_manifest_served_on_upstream_5xx_and_5xx_never_cached(registry: FakeRegistry,
                                                                   start_mirror: MirrorFactory) -> None:
    mirror = start_mirror(manifest_ttl=0)
    registry.manifest_status = 503
    r = httpx.get(f"{mirror.url()}/v2/library/tag/manifests/latest")
    assert r.status_code == 502 and r.json()["errors"]
    registry.manifest_status = None
    manifest = _model(registry, 1)
    r = httpx.get(f"{mirror.url()}/v2/library/tag/manifests/latest")
    assert r.status_code == 200 and r.content == manifest
    registry.manifest_status = 500
    r = httpx.get(f"{mirror.url()}/v2/library/tag/manifests/latest")
    assert r.status_code == 200 and r.headers["x-cache"] == "STALE"


def test_upstream_404_keeps_a_cached_tag(registry: FakeRegistry, start_mirror: MirrorFactory) -> None:
    manifest = _model(registry, 1)
    mirror = start_mirror(manifest_ttl=0)
    httpx.get(f"{mirror.url()}/v2/library/tag/manifests/latest")
    registry.manifests.clear()
    r = httpx.get(f"{mirror.url()}/v2/library/tag/manifests/latest")
    assert r.status_code == 200 and r.content == manifest


def test_upstream_404_is_cached_only_briefly(registry: FakeRegistry, start_mirror: MirrorFactory) -> None:
    mirror = start_mirror(negative_ttl=0.5)
    for _ in range(3):
        assert httpx.get(f"{mirror.url()}/v2/library/tag/manifests/latest").status_code == 404
    assert registry.count("GET", "/manifests/latest") == 1
    manifest = _model(registry, 1)
    time.sleep(0.6)
    r = httpx.get(f"{mirror.url()}/v2/library/tag/manifests/latest")
    assert r.status_code == 200 and r.content == manifest


def test_412_passes_through_and_is_learned_for_that_client_only(registry: FakeRegistry,
                                                                start_mirror: MirrorFactory) -> None:
    mirror = start_mirror()
    registry.manifest_status = 412
    for _ in range(2):
        r = httpx.get(f"{mirror.url()}/v2/library/tag/manifests/latest", headers={"User-Agent": UA})
        assert r.status_code == 412 and r.json()["errors"][0]["message"] == "injected"
    assert registry.count("GET", "/manifests/latest") == 1  # within the TTL, the 412 learned is the answer
    registry.manifest_status = None
    manifest = _model(registry, 1)
    assert httpx.get(f"{mirror.url()}/v2/library/tag/manifests/latest").content == manifest


def test_client_user_agent_is_forwarded(registry: FakeRegistry, start_mirror: MirrorFactory) -> None:
    _model(registry, 1)
    mirror = start_mirror()
    httpx.get(f"{mirror.url()}/v2/library/tag/manifests/latest", headers={"User-Agent": UA})
    assert [ua for m, p, ua in registry.requests if "/manifests/" in p] == [UA]


def test_concurrent_cold_requests_make_one_upstream_request(registry: FakeRegistry,
                                                            start_mirror: MirrorFactory) -> None:
    manifest = _model(registry, 1)
    registry.manifest_delay = 0.5
    mirror = start_mirror()

    import asyncio

    async def many() -> list[httpx.Response]:
        async with httpx.AsyncClient() as client:
            return await asyncio.gather(*(client.get(f"{mirror.url()}/v2/library/tag/manifests/latest")
                                          for _ in range(20)))
    responses = asyncio.run(many())
    assert all(r.content == manifest for r in responses)
    assert registry.count("GET", "/manifests/latest") == 1


def test_token_challenge_answered_anonymously(registry: FakeRegistry, start_mirror: MirrorFactory) -> None:
    blob = write_blob(registry.directory, 2_000_000, seed=9)
    manifest = registry.add_model("library/tag", "latest", [blob])
    registry.require_token = True
    mirror = start_mirror()
    r = httpx.get(f"{mirror.url()}/v2/library/tag/manifests/latest")
    assert r.status_code == 200 and r.content == manifest
    r = httpx.get(f"{mirror.url()}/v2/library/tag/blobs/{blob.digest}")
    assert r.status_code == 200 and r.content == blob.path.read_bytes()
    assert registry.count("GET", "/token") >= 1
    assert not registry.cdn.saw_authorization
