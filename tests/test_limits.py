"""Limits an admin sets: who may use the mirror (networks, tokens) and how much of the uplink fills may take."""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import re
import struct
import time
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

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


def _ollama_signature(private: Ed25519PrivateKey, url: str) -> str:
    """What Ollama's client sends to a registry's token realm (server/auth.go, auth/auth.go)."""
    raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    blob = struct.pack(">I", 11) + b"ssh-ed25519" + struct.pack(">I", 32) + raw
    empty = base64.b64encode(hashlib.sha256(b"").hexdigest().encode()).decode()
    signature = private.sign(f"GET,{url},{empty}".encode())
    return f"{base64.b64encode(blob).decode()}:{base64.b64encode(signature).decode()}"


def _public_line(private: Ed25519PrivateKey) -> str:
    return private.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                             serialization.PublicFormat.OpenSSH).decode() + " lab-machine"


def test_ollama_key_challenge_gives_allowed_machines_a_token(registry: FakeRegistry, start_mirror: MirrorFactory,
                                                              tmp_path: Path) -> None:
    layer = write_blob(registry.directory, 1000, seed=95)
    registry.add_model("library/keyed", "1", [layer])
    allowed, stranger = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    keys = tmp_path / "keys"
    keys.write_text(f"# machines of the lab\n{_public_line(allowed)}\n")
    mirror = start_mirror(keys_file=keys)
    with httpx.Client(base_url=mirror.url(), timeout=10) as client:
        challenge = client.get("/v2/library/keyed/manifests/1")
        assert challenge.status_code == 401
        realm = re.search(r'realm="([^"]+)"', challenge.headers["WWW-Authenticate"])[1]
        assert realm == f"{mirror.url()}/token"

        def token_request(key: Ed25519PrivateKey, ts: float, nonce: str) -> httpx.Response:
            url = f"{realm}?nonce={nonce}&scope=pull&service=ollama-mirror&ts={int(ts)}"
            return client.get(url, headers={"Authorization": _ollama_signature(key, url)})

        assert token_request(stranger, time.time(), "n1").status_code == 403
        assert token_request(allowed, time.time() - 3600, "n2").status_code == 401  # stale
        granted = token_request(allowed, time.time(), "n3")
        assert granted.status_code == 200
        assert token_request(allowed, time.time(), "n3").status_code == 401  # a nonce is good once
        token = granted.json()["token"]
        got = client.get("/v2/library/keyed/manifests/1", headers={"Authorization": f"Bearer {token}"})
        assert got.status_code == 200
        # the blob's Location carries a grant: Ollama fetches its parts there without credentials
        whole = client.get(f"/v2/library/keyed/blobs/{layer.digest}", headers={"Authorization": f"Bearer {token}"})
        location = whole.headers["Location"]
        assert "grant=" in location
        part = client.get(location, headers={"Range": "bytes=10-19"})
        assert part.status_code == 206 and part.content == layer.path.read_bytes()[10:20]
        forged = location[:-4] + ("0000" if not location.endswith("0000") else "1111")
        assert client.get(forged, headers={"Range": "bytes=10-19"}).status_code == 401
        other = location.replace(layer.digest, "sha256:" + "0" * 64)  # a grant opens only its own blob
        assert client.get(other).status_code == 401
    assert registry.count("GET", "/manifests/") == 1


@pytest.mark.real_client
def test_real_client_pulls_with_an_allowed_ollama_key_and_a_stranger_cannot(
    registry: FakeRegistry, start_mirror: MirrorFactory, ollama, tmp_path: Path
) -> None:
    layer = write_blob(registry.directory, 2_000_000, seed=96)
    manifest = registry.add_model("library/keyed", "1", [layer])
    member, stranger = ollama("member"), ollama("stranger")  # each makes its key pair on first start
    keys = tmp_path / "keys"
    keys.write_text((member.home / ".ollama" / "id_ed25519.pub").read_text())
    mirror = start_mirror(keys_file=keys)
    name = f"127.0.0.1:{mirror.port}/library/keyed:1"
    result = member.pull(name)
    assert result.returncode == 0, result.stderr[-2000:]
    assert member.list_models()[name] == hashlib.sha256(manifest).hexdigest()[:12]
    refused = stranger.pull(name)
    assert refused.returncode != 0 and "403" in refused.stderr
