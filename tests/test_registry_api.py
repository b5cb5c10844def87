"""The registry protocol as clients see it, through a real uvicorn server."""

from __future__ import annotations

import hashlib
import http.client
import json
import time
from pathlib import Path

import httpx
import pytest

from .conftest import MirrorFactory
from .fakes import Blob, FakeRegistry, ServerThread, blob_from_bytes, write_blob

MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"


@pytest.fixture
def model(registry: FakeRegistry) -> tuple[bytes, Blob]:
    blob = write_blob(registry.directory, 3_000_000, seed=5)
    return registry.add_model("library/tiny", "latest", [blob]), blob


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and ".mirror" not in p.parts}


def test_v2_root(mirror: ServerThread) -> None:
    r = httpx.get(f"{mirror.url()}/v2/")
    assert r.status_code == 200 and r.json() == {}


def test_manifest_served_verbatim_with_headers(mirror: ServerThread, model: tuple[bytes, Blob]) -> None:
    manifest, _ = model
    r = httpx.get(f"{mirror.url()}/v2/library/tiny/manifests/latest")
    assert r.status_code == 200
    assert r.content == manifest
    assert r.headers["content-type"] == MANIFEST_TYPE
    assert r.headers["docker-content-digest"] == f"sha256:{hashlib.sha256(manifest).hexdigest()}"
    assert r.headers["content-length"] == str(len(manifest))


def test_manifest_bare_model_name_means_library(mirror: ServerThread, model: tuple[bytes, Blob]) -> None:
    r = httpx.get(f"{mirror.url()}/v2/tiny/manifests/latest")
    assert r.status_code == 200 and r.content == model[0]


def test_manifest_head_has_length_and_no_body(mirror: ServerThread, model: tuple[bytes, Blob]) -> None:
    r = httpx.head(f"{mirror.url()}/v2/library/tiny/manifests/latest")
    assert r.status_code == 200 and r.content == b""
    assert r.headers["content-length"] == str(len(model[0]))


def test_manifest_by_digest_from_store_only(mirror: ServerThread, model: tuple[bytes, Blob],
                                            registry: FakeRegistry) -> None:
    manifest, _ = model
    digest = f"sha256:{hashlib.sha256(manifest).hexdigest()}"
    r = httpx.get(f"{mirror.url()}/v2/library/tiny/manifests/{digest}")
    assert r.status_code == 404 and r.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    httpx.get(f"{mirror.url()}/v2/library/tiny/manifests/latest")
    r = httpx.get(f"{mirror.url()}/v2/library/tiny/manifests/{digest}")
    assert r.status_code == 200 and r.content == manifest
    assert registry.count("GET", f"/manifests/{digest}") == 0


def test_manifest_cache_is_an_ollama_models_directory(mirror: ServerThread, model: tuple[bytes, Blob],
                                                      registry: FakeRegistry, tmp_path: Path) -> None:
    manifest, blob = model
    httpx.get(f"{mirror.url()}/v2/library/tiny/manifests/latest")
    httpx.get(f"{mirror.url()}/v2/library/tiny/blobs/{blob.digest}")
    host = registry.url.removeprefix("http://")
    cache = tmp_path / "cache"
    assert (cache / "manifests" / host / "library" / "tiny" / "latest").read_bytes() == manifest
    assert (cache / "blobs" / blob.digest.replace(":", "-")).read_bytes() == blob.path.read_bytes()


def test_unknown_manifest_is_404(mirror: ServerThread) -> None:
    r = httpx.get(f"{mirror.url()}/v2/library/nothing/manifests/latest")
    assert r.status_code == 404 and r.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"


def test_blob_head_cold_costs_no_blob_bytes(mirror: ServerThread, model: tuple[bytes, Blob],
                                            registry: FakeRegistry) -> None:
    _, blob = model
    r = httpx.head(f"{mirror.url()}/v2/library/tiny/blobs/{blob.digest}")
    assert r.status_code == 200
    assert r.headers["content-length"] == str(blob.size)
    assert r.headers["docker-content-digest"] == blob.digest
    assert r.headers["accept-ranges"] == "bytes"
    assert "location" not in r.headers
    assert registry.cdn.bytes_sent == 0


def test_blob_head_falls_back_to_a_one_byte_range(mirror: ServerThread, model: tuple[bytes, Blob],
                                                  registry: FakeRegistry) -> None:
    registry.head_size = False  # HEAD redirects to a CDN that answers HEAD (as a presigned GET URL may not)
    _, blob = model
    r = httpx.head(f"{mirror.url()}/v2/library/other/blobs/{blob.digest}")
    assert r.status_code == 200 and r.headers["content-length"] == str(blob.size)


def test_blob_get_full_has_location_and_body(mirror: ServerThread, model: tuple[bytes, Blob]) -> None:
    _, blob = model
    url = f"{mirror.url()}/v2/library/tiny/blobs/{blob.digest}"
    r = httpx.get(url)
    assert r.status_code == 200
    assert r.headers["location"] == url
    assert r.content == blob.path.read_bytes()
    r = httpx.get(url)  # warm
    assert r.status_code == 200 and r.content == blob.path.read_bytes()


@pytest.mark.parametrize("header,start,stop", [("bytes=0-0", 0, 1), ("bytes=1000-2999999", 1000, 3_000_000),
                                               ("bytes=-100", 2_999_900, 3_000_000), ("bytes=2999990-", 2_999_990,
                                                                                        3_000_000)])
def test_blob_range_cold_and_warm(mirror: ServerThread, model: tuple[bytes, Blob], header: str, start: int,
                                  stop: int) -> None:
    _, blob = model
    url = f"{mirror.url()}/v2/library/tiny/blobs/{blob.digest}"
    for _ in range(2):
        r = httpx.get(url, headers={"Range": header})
        assert r.status_code == 206
        assert r.headers["content-range"] == f"bytes {start}-{stop - 1}/{blob.size}"
        assert r.content == blob.path.read_bytes()[start:stop]


def test_blob_multi_range_is_multipart(mirror: ServerThread, model: tuple[bytes, Blob]) -> None:
    _, blob = model
    data = blob.path.read_bytes()
    r = httpx.get(f"{mirror.url()}/v2/library/tiny/blobs/{blob.digest}", headers={"Range": "bytes=0-9,100-109"})
    assert r.status_code == 206
    assert r.headers["content-type"].startswith("multipart/byteranges; boundary=")
    assert int(r.headers["content-length"]) == len(r.content)
    boundary = r.headers["content-type"].split("boundary=")[1].encode()
    parts = [p for p in r.content.split(b"--" + boundary) if p.strip() not in (b"", b"--")]
    bodies = [p.split(b"\r\n\r\n", 1)[1].removesuffix(b"\r\n") for p in parts]
    assert bodies == [data[0:10], data[100:110]]
    assert b"Content-Range: bytes 100-109/3000000" in parts[1]


def test_blob_unsatisfiable_range_is_416(mirror: ServerThread, model: tuple[bytes, Blob]) -> None:
    _, blob = model
    r = httpx.get(f"{mirror.url()}/v2/library/tiny/blobs/{blob.digest}", headers={"Range": "bytes=5000000-"})
    assert r.status_code == 416
    assert r.headers["content-range"] == f"bytes */{blob.size}"
    assert r.json()["errors"][0]["code"] == "RANGE_INVALID"


def test_blob_malformed_range_is_400(mirror: ServerThread, model: tuple[bytes, Blob]) -> None:
    _, blob = model
    r = httpx.get(f"{mirror.url()}/v2/library/tiny/blobs/{blob.digest}", headers={"Range": "bytes=x-y"})
    assert r.status_code == 400 and r.json()["errors"][0]["code"] == "RANGE_INVALID"


def test_blob_shared_across_names(mirror: ServerThread, model: tuple[bytes, Blob], registry: FakeRegistry) -> None:
    _, blob = model
    httpx.get(f"{mirror.url()}/v2/library/tiny/blobs/{blob.digest}")
    sent = registry.cdn.bytes_sent
    r = httpx.get(f"{mirror.url()}/v2/someone/else/blobs/{blob.digest}")
    assert r.status_code == 200 and r.content == blob.path.read_bytes()
    assert registry.cdn.bytes_sent == sent


def test_unknown_blob_is_404(mirror: ServerThread) -> None:
    r = httpx.get(f"{mirror.url()}/v2/library/tiny/blobs/sha256:{'0' * 64}")
    assert r.status_code == 404 and r.json()["errors"][0]["code"] == "BLOB_UNKNOWN"


@pytest.mark.parametrize("method,path", [
    ("PUT", "/v2/library/tiny/manifests/latest"),
    ("DELETE", "/v2/library/tiny/manifests/latest"),
    ("POST", "/v2/library/tiny/blobs/uploads/"),
    ("PATCH", "/v2/library/tiny/blobs/uploads/abc"),
    ("PUT", "/v2/library/tiny/blobs/uploads/abc"),
    ("DELETE", f"/v2/library/tiny/blobs/sha256:{'0' * 64}"),
])
def test_push_methods_unsupported(mirror: ServerThread, method: str, path: str) -> None:
    r = httpx.request(method, f"{mirror.url()}{path}", content=b"x")
    assert r.status_code == 405 and r.json()["errors"][0]["code"] == "UNSUPPORTED"


@pytest.mark.parametrize("path,status,code", [
    pytest.param("/v2/../../etc/manifests/passwd", 400, "NAME_INVALID", id="dotdot"),
    pytest.param("/v2/library/%2e%2e/manifests/latest", 400, "NAME_INVALID", id="encoded-dotdot"),
    pytest.param("/v2/library/tiny/manifests/..", 400, "NAME_INVALID", id="dotdot-tag"),
    pytest.param("/v2/library/tiny/manifests/%2e%2e%2fx", 400, "NAME_INVALID", id="encoded-slash-tag"),
    pytest.param("/v2/a\\b/tiny/manifests/latest", 400, "NAME_INVALID", id="backslash"),
    pytest.param("/v2/library/ti%00ny/manifests/latest", 400, "NAME_INVALID", id="nul"),
    pytest.param("/v2/a/b/c/manifests/latest", 400, "NAME_INVALID", id="three-parts"),
    pytest.param("/v2/library/tiny/blobs/sha256:../../x", 400, "DIGEST_INVALID", id="digest-traversal"),
    pytest.param("/v2/library/tiny/blobs/md5:abc", 400, "DIGEST_INVALID", id="digest-algo"),
    pytest.param("/v2/library/tiny/blobs/sha256:" + "A" * 64, 400, "DIGEST_INVALID", id="digest-upper"),
    pytest.param("/v2/_catalog", 404, "NOT_FOUND", id="catalog"),
    pytest.param("/nothing/here", 404, "NOT_FOUND", id="unknown"),
])
def test_bad_input_rejected_store_untouched(mirror: ServerThread, registry: FakeRegistry, tmp_path: Path,
                                            path: str, status: int, code: str) -> None:
    before = _files(tmp_path / "cache")
    connection = http.client.HTTPConnection("127.0.0.1", mirror.port, timeout=10)
    connection.request("GET", path)  # http.client sends the path as is, dot segments included
    response = connection.getresponse()
    body = response.read()
    connection.close()
    assert response.status == status, body
    assert json.loads(body)["errors"][0]["code"] == code
    assert _files(tmp_path / "cache") == before
    assert not any("etc" in p or "passwd" in p for _, p, _ in registry.requests)


def test_offline_serves_cache_and_refuses_the_rest(start_mirror: MirrorFactory, model: tuple[bytes, Blob],
                                                   registry: FakeRegistry) -> None:
    manifest, blob = model
    online = start_mirror()
    httpx.get(f"{online.url()}/v2/library/tiny/manifests/latest")
    httpx.get(f"{online.url()}/v2/library/tiny/blobs/{blob.digest}")
    online.stop()
    other = write_blob(registry.directory, 1000, seed=6)
    registry.add_model("library/other", "latest", [other])
    requests = len(registry.requests)
    offline = start_mirror(offline=True, manifest_ttl=0)
    r = httpx.get(f"{offline.url()}/v2/library/tiny/manifests/latest")
    assert r.status_code == 200 and r.content == manifest
    r = httpx.get(f"{offline.url()}/v2/library/tiny/blobs/{blob.digest}", headers={"Range": "bytes=0-99"})
    assert r.status_code == 206 and r.content == blob.path.read_bytes()[:100]
    r = httpx.get(f"{offline.url()}/v2/library/other/manifests/latest")
    assert r.status_code == 404 and "offline" in r.json()["errors"][0]["message"]
    r = httpx.head(f"{offline.url()}/v2/library/other/blobs/{other.digest}")
    assert r.status_code == 404
    assert len(registry.requests) == requests


def test_empty_blob_on_a_cold_cache_answers_at_once(mirror: ServerThread, registry: FakeRegistry) -> None:
    """A zero-byte layer (an empty template, say): nothing to wait for before the head."""
    empty = blob_from_bytes(registry.directory, b"")
    registry.add_model("library/empty", "1", [(empty, "template")])
    began = time.monotonic()
    r = httpx.get(f"{mirror.url()}/v2/library/empty/blobs/{empty.digest}", timeout=30)
    assert r.status_code == 200 and r.content == b"" and r.headers["content-length"] == "0"
    assert time.monotonic() - began < 3
