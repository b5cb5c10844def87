"""One store shared by a server and the commands: what each removes, and what the server then answers."""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mirror.manifest import Manifest, ManifestInvalid

from .conftest import MirrorFactory
from .fakes import Blob, FakeRegistry, ServerThread, blob_from_bytes, wait_for_file, write_blob
from .test_seeding import blob_path, cli


def _host(registry: FakeRegistry) -> str:
    return registry.url.removeprefix("http://")


def _manifest_until(url: str, done: object, timeout: float = 10.0) -> httpx.Response:
    """The first answer for which ``done(response)`` holds: a server looks at the cache's
    generation at most once a second, so a change on disk shows within about that."""
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(url)
        if done(r):  # type: ignore[operator]
            return r
        assert time.monotonic() < deadline, f"still {r.status_code} {r.headers.get('x-cache')} after {timeout}s"
        time.sleep(0.05)


def test_rm_command_while_serving_makes_the_server_fetch_the_tag_again(
    registry: FakeRegistry, mirror: ServerThread, tmp_path: Path
) -> None:
    weights = write_blob(registry.directory, 1_000_000, seed=81)
    manifest = registry.add_model("library/tiny", "1b", [weights])
    url = f"{mirror.url()}/v2/library/tiny/manifests/1b"
    assert httpx.get(url).headers["x-cache"] == "MISS"
    assert httpx.get(url).headers["x-cache"] == "HIT"
    assert httpx.get(f"{mirror.url()}/v2/library/tiny/blobs/{weights.digest}").status_code == 200
    cache = tmp_path / "cache"

    result = cli("rm", "tiny:1b", cache=cache, upstream=registry.url)
    assert result.returncode == 0, result.stderr
    assert not blob_path(cache, weights).exists()

    again = _manifest_until(url, lambda r: r.headers.get("x-cache") != "HIT")
    assert again.status_code == 200 and again.content == manifest and again.headers["x-cache"] == "MISS"
    assert registry.count("GET", "/manifests/1b") == 2  # asked upstream again, not answered from memory
    # written to disk just after it was answered: a client never waits for the fsync
    assert wait_for_file(cache / "manifests" / _host(registry) / "library" / "tiny" / "1b").read_bytes() == manifest
    assert "removed model=" in result.stderr and f"removed blob digest={weights.digest[:19]}" in result.stderr


def test_rm_command_while_serving_offline_makes_the_tag_unknown(
    registry: FakeRegistry, start_mirror: MirrorFactory, tmp_path: Path
) -> None:
    registry.add_model("library/tiny", "1b", [write_blob(registry.directory, 1000, seed=82)])
    cache = tmp_path / "cache"
    assert cli("pull", "tiny:1b", cache=cache, upstream=registry.url).returncode == 0
    offline = start_mirror(offline=True)
    url = f"{offline.url()}/v2/library/tiny/manifests/1b"
    assert httpx.get(url).headers["x-cache"] == "HIT"

    assert cli("rm", "tiny:1b", cache=cache, upstream=registry.url).returncode == 0
    gone = _manifest_until(url, lambda r: r.status_code != 200)
    assert gone.status_code == 404 and gone.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"


def test_import_while_serving_offline_replaces_the_tag_the_server_remembers(
    registry: FakeRegistry, start_mirror: MirrorFactory, tmp_path: Path
) -> None:
    cache, other, usb = tmp_path / "cache", tmp_path / "other", tmp_path / "usb"
    old = registry.add_model("library/tiny", "1b", [write_blob(registry.directory, 1000, seed=83)])
    assert cli("pull", "tiny:1b", cache=cache, upstream=registry.url).returncode == 0
    offline = start_mirror(offline=True)
    url = f"{offline.url()}/v2/library/tiny/manifests/1b"
    assert httpx.get(url).content == old

    weights = write_blob(registry.directory, 2000, seed=84)
    new = registry.add_model("library/tiny", "1b", [weights])  # the tag moved; another machine has it
    assert cli("pull", "tiny:1b", cache=other, upstream=registry.url).returncode == 0
    assert cli("export", "tiny:1b", "--to", str(usb), cache=other, upstream=registry.url).returncode == 0
    result = cli("import", str(usb), cache=cache, upstream=registry.url)
    assert result.returncode == 0, result.stderr

    served = _manifest_until(url, lambda r: r.content != old)
    assert served.status_code == 200 and served.content == new
    blob = httpx.get(f"{offline.url()}/v2/library/tiny/blobs/{weights.digest}")
    assert blob.status_code == 200 and blob.content == weights.path.read_bytes()


@contextlib.contextmanager
def _reading_slowly(mirror: ServerThread, path: str) -> Iterator[None]:
    """A client that received the first bytes of a blob and reads no more: the server is still
    sending (its socket buffers are full) until the client hangs up."""
    with socket.create_connection(("127.0.0.1", mirror.port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        yield


def test_api_delete_keeps_a_blob_being_served_and_gc_removes_it_after(
    registry: FakeRegistry, mirror: ServerThread, tmp_path: Path
) -> None:
    weights = write_blob(registry.directory, 24_000_000, seed=85)
    template = blob_from_bytes(registry.directory, b"{{ .Prompt }} 85")
    registry.add_model("library/tiny", "1b", [weights, (template, "template")])
    cache = tmp_path / "cache"
    assert httpx.post(f"{mirror.url()}/api/pull", json={"model": "tiny:1b", "stream": False},
                      timeout=60).status_code == 200

    with _reading_slowly(mirror, f"/v2/library/tiny/blobs/{weights.digest}"):
        r = httpx.request("DELETE", f"{mirror.url()}/api/delete", json={"model": "tiny:1b"})
        assert r.status_code == 200
        assert not (cache / "manifests" / _host(registry) / "library" / "tiny").exists()
        assert not blob_path(cache, template).exists()
        assert blob_path(cache, weights).exists()  # in use: being served

    result = cli("gc", cache=cache, upstream=registry.url)  # no --max-size: only blobs no manifest names
    assert result.returncode == 0, result.stderr
    assert f"remove unused blob {weights.digest[:19]}" in result.stdout
    assert not blob_path(cache, weights).exists()


def _descriptor(blob: Blob, media_type: str = "application/vnd.ollama.image.model") -> dict[str, object]:
    return {"mediaType": media_type, "digest": blob.digest, "size": blob.size}


def test_import_refuses_manifests_the_server_would_refuse(registry: FakeRegistry, tmp_path: Path) -> None:
    """One parser decides for upstream, the store and imports: what a fetch would refuse is not imported."""
    source, cache = tmp_path / "models", tmp_path / "cache"
    (source / "blobs").mkdir(parents=True)
    weights = blob_from_bytes(source / "blobs", b"weights 86")
    config = blob_from_bytes(source / "blobs", b'{"model_format": "gguf"}')
    good = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": _descriptor(config, "application/vnd.docker.container.image.v1+json"),
            "layers": [_descriptor(weights)]}
    negative = {**good, "layers": [{**_descriptor(weights), "size": -1}]}
    manifests = {"good": good, "noschema": {k: v for k, v in good.items() if k != "schemaVersion"},
                 "negative": negative, "noconfig": {k: v for k, v in good.items() if k != "config"}}
    for model, doc in manifests.items():
        path = source / "manifests" / "registry.ollama.ai" / "library" / model / "latest"
        path.parent.mkdir(parents=True)
        path.write_bytes(json.dumps(doc).encode())

    result = cli("import", str(source), cache=cache)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["models"] == ["registry.ollama.ai/library/good:latest"]
    refused = {key.split("/")[-2]: why for key, why in report["refused"].items()}
    assert refused == {"noschema": "manifest is not a schema 2 image manifest",
                       "negative": "manifest has a layer without a valid size",
                       "noconfig": "manifest has no valid config descriptor"}
    listed = [row["name"] for row in json.loads(cli("ls", "--json", cache=cache).stdout)]
    assert listed == ["registry.ollama.ai/library/good:latest"]


HEX = "a" * 64
CONFIG = {"mediaType": "c", "digest": f"sha256:{HEX}", "size": 2}


@pytest.mark.parametrize("data,reason", [
    pytest.param(b"\xff", "not JSON", id="not-utf8"),
    pytest.param(b"[]", "not a schema 2", id="a-list"),
    pytest.param(b'{"schemaVersion": 1}', "not a schema 2", id="schema-1"),
    pytest.param(json.dumps({"schemaVersion": 2, "layers": []}).encode(), "no valid config", id="no-config"),
    pytest.param(json.dumps({"schemaVersion": 2, "config": CONFIG, "layers": {}}).encode(), "not a list",
                 id="layers-object"),
    pytest.param(json.dumps({"schemaVersion": 2, "config": {**CONFIG, "size": True}}).encode(), "valid size",
                 id="size-bool"),
    pytest.param(json.dumps({"schemaVersion": 2, "config": {**CONFIG, "digest": "sha256:../x"}}).encode(),
                 "invalid digest", id="digest-path"),
])
def test_manifest_parse_rejects(data: bytes, reason: str) -> None:
    with pytest.raises(ManifestInvalid, match=reason):
        Manifest.parse(data)


def test_manifest_parse_reads_blobs_in_pull_order() -> None:
    layer = {"mediaType": "application/vnd.ollama.image.template", "digest": f"sha256:{'b' * 64}", "size": 5}
    parsed = Manifest.parse(json.dumps({"schemaVersion": 2, "config": CONFIG, "layers": [layer]}).encode())
    assert [b.kind for b in parsed.blobs] == ["template", "c"]  # layers first, the config last
    assert parsed.size == 7 and parsed.media_type == "application/vnd.docker.distribution.manifest.v2+json"


def test_a_removed_model_is_not_answered_by_its_digest_nor_through_a_lock(
    registry: FakeRegistry, start_mirror: MirrorFactory, tmp_path: Path
) -> None:
    """Its blobs may be gone: a client pulling it by digest (or by a locked tag) would fail half-way."""
    manifest = registry.add_model("library/tiny", "1b", [write_blob(registry.directory, 1000, seed=85)])
    digest = f"sha256:{hashlib.sha256(manifest).hexdigest()}"
    cache = tmp_path / "cache"
    assert cli("pull", "tiny:1b", cache=cache, upstream=registry.url).returncode == 0
    lock = tmp_path / "models.lock"
    freeze = cli("freeze", cache=cache, upstream=registry.url)
    lock.write_text(freeze.stdout)
    offline = start_mirror(offline=True, lock=lock)
    by_digest = f"{offline.url()}/v2/library/tiny/manifests/{digest}"
    locked = f"{offline.url()}/v2/library/tiny/manifests/1b"
    assert httpx.get(by_digest).content == manifest and httpx.get(locked).content == manifest

    assert cli("rm", "tiny:1b", cache=cache, upstream=registry.url).returncode == 0
    assert _manifest_until(by_digest, lambda r: r.status_code != 200).status_code == 404
    assert httpx.get(locked).json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
