"""Limits an admin sets: who may use the mirror (networks, tokens) and how much of the uplink fills may take."""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path

import httpx

from .conftest import MirrorFactory
from .fakes import FakeRegistry, write_blob


def test_clients_outside_the_allowed_networks_are_refused(registry: FakeRegistry, start_mirror: MirrorFactory,
                                                          tmp_path: Path) -> None:
    registry.add_model("library/net", "1", [write_blob(registry.directory, 1000, seed=91)])
    elsewhere = start_mirror(allow_clients="10.0.0.0/8,192.168.0.0/16")
    with httpx.Client(base_url=elsewhere.url(), timeout=10) as client:
        refused = client.get("/v2/library/net/manifests/1")
        assert refused.status_code == 403 and refused.json()["errors"][0]["code"] == "DENIED"
        assert client.post("/api/pull", json={"model": "net:1"}).status_code == 403
        assert client.get("/metrics").status_code == 403
        assert client.get("/").status_code == 200  # says only that it runs
    assert registry.count("GET", "/manifests/") == 0  # nothing reached upstream
    here = start_mirror(allow_clients="127.0.0.0/8", cache_dir=tmp_path / "cache2")
    with httpx.Client(base_url=here.url(), timeout=10) as client:
        assert client.get("/v2/library/net/manifests/1").status_code == 200


def test_tokens_guard_pulls_as_bearer_or_basic(registry: FakeRegistry, start_mirror: MirrorFactory) -> None:
    layer = write_blob(registry.directory, 1000, seed=92)
    registry.add_model("library/tok", "1", [layer])
    mirror = start_mirror(tokens="s3cret,other")
    with httpx.Client(base_url=mirror.url(), timeout=10) as client:
        missing = client.get("/v2/")
        assert missing.status_code == 401 and missing.json()["errors"][0]["code"] == "UNAUTHORIZED"
        assert missing.headers["WWW-Authenticate"].startswith("Basic")
        assert client.get("/v2/", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/v2/library/tok/manifests/1", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        basic = client.get(f"/v2/library/tok/blobs/{layer.digest}", auth=("anyone", "other"))
        assert basic.status_code == 200 and basic.content == layer.path.read_bytes()
    assert registry.count("GET", "/manifests/") == 1  # the refused requests never reached upstream


def test_bandwidth_cap_holds_all_fills_together_under_it(registry: FakeRegistry, start_mirror: MirrorFactory) -> None:
    blobs = [write_blob(registry.directory, 1_500_000, seed=93 + i) for i in range(2)]
    registry.add_model("library/capped", "1", blobs)
    mirror = start_mirror(upstream_rate="1M", connections=4)  # 1 MiB/s for both fills together
    began = time.monotonic()
    with httpx.Client(base_url=mirror.url(), timeout=60) as client:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            got = list(pool.map(lambda b: client.get(f"/v2/library/capped/blobs/{b.digest}"), blobs))
    elapsed = time.monotonic() - began
    assert [g.content for g in got] == [b.path.read_bytes() for b in blobs]
    floor = 3_000_000 / (1 << 20) - 0.25  # bytes over the cap, less the throttle's slack
    assert elapsed >= floor * 0.9, elapsed
