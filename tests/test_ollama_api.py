"""OLLAMA_HOST=mirror: the real Ollama CLI managing the mirror's cache."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import httpx
import pytest

from .conftest import MirrorFactory
from .fakes import Blob, FakeRegistry, ServerThread, blob_from_bytes, write_blob

TEMPLATE = "{{ if .System }}<|system|>{{ .System }}{{ end }}<|user|>{{ .Prompt }}<|assistant|>"
PARAMS = {"stop": ["<|user|>", "<|end|>"], "temperature": 0.7, "num_ctx": 4096}
OLLAMA_AGENT = "ollama/0.9.3 (amd64 linux) Go/go1.24.1"
CONFIG = {"model_format": "gguf", "model_family": "llama", "model_families": ["llama"], "model_type": "1B",
          "file_type": "Q4_0"}


@pytest.fixture
def model(registry: FakeRegistry) -> tuple[bytes, Blob, list[Blob]]:
    weights = write_blob(registry.directory, 12_000_000, seed=41)
    small = [blob_from_bytes(registry.directory, TEMPLATE.encode()),
             blob_from_bytes(registry.directory, json.dumps(PARAMS).encode()),
             blob_from_bytes(registry.directory, b"Apache License 2.0 (test)")]
    config = blob_from_bytes(registry.directory, json.dumps(CONFIG).encode())
    manifest = registry.add_model("library/tiny", "1b", [weights, (small[0], "template"), (small[1], "params"),
                                                          (small[2], "license")], config=config)
    return manifest, weights, [*small, config]


def _upstream_host(registry: FakeRegistry) -> str:
    return registry.url.removeprefix("http://")


def test_api_pull_streams_ollama_progress_shapes(mirror: ServerThread, model: tuple[bytes, Blob, list[Blob]],
                                                 tmp_path: Path) -> None:
    _, weights, _ = model
    lines = []
    with httpx.stream("POST", f"{mirror.url()}/api/pull", json={"model": "tiny:1b"}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert lines[0] == {"status": "pulling manifest"}
    layer_lines = [x for x in lines if x["status"].startswith("pulling ") and "digest" in x]
    assert {x["digest"] for x in layer_lines} >= {weights.digest}
    for x in layer_lines:
        assert x["status"] == f"pulling {x['digest'][7:19]}"
        assert 0 <= x["completed"] <= x["total"]
    assert [x for x in layer_lines if x["digest"] == weights.digest][-1]["completed"] == weights.size
    assert [x["status"] for x in lines[-3:]] == ["verifying sha256 digest", "writing manifest", "success"]
    assert (tmp_path / "cache" / "blobs" / weights.digest.replace(":", "-")).read_bytes() == weights.path.read_bytes()


def test_api_pull_without_stream_and_errors(mirror: ServerThread, model: tuple[bytes, Blob, list[Blob]]) -> None:
    r = httpx.post(f"{mirror.url()}/api/pull", json={"name": "tiny:1b", "stream": False}, timeout=60)
    assert r.status_code == 200 and r.json() == {"status": "success"}
    r = httpx.post(f"{mirror.url()}/api/pull", json={"model": "nothing:here", "stream": False}, timeout=60)
    assert r.status_code == 500 and "file does not exist" in r.json()["error"]
    r = httpx.post(f"{mirror.url()}/api/pull", json={"model": "../etc:passwd"})
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(f"{mirror.url()}/api/pull", content=b"not json")
    assert r.status_code == 400


def test_api_pull_says_success_once_the_model_is_on_disk(mirror: ServerThread, model: tuple[bytes, Blob, list[Blob]],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The manifest is written in the background (a client is served from memory meanwhile);
    a pull's "success" waits for it: a busy disk once kept it from ``/api/tags`` for a second."""
    from mirror.store import BlobStore

    write = BlobStore.write_manifest

    def slow_write(self: BlobStore, *args: object, **kwargs: object) -> None:
        time.sleep(1.5)  # what fsync waits for behind gigabytes of writeback
        write(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(BlobStore, "write_manifest", slow_write)
    r = httpx.post(f"{mirror.url()}/api/pull", json={"model": "tiny:1b", "stream": False}, timeout=60)
    assert r.status_code == 200 and r.json() == {"status": "success"}
    listed = httpx.get(f"{mirror.url()}/api/tags").json()["models"]
    assert [m["name"].rsplit("/", 1)[-1] for m in listed] == ["tiny:1b"]
    assert httpx.post(f"{mirror.url()}/api/show", json={"model": "tiny:1b"}).status_code == 200


def test_api_tags_show_delete(mirror: ServerThread, registry: FakeRegistry,
                              model: tuple[bytes, Blob, list[Blob]], tmp_path: Path) -> None:
    manifest, weights, small = model
    other = registry.add_model("library/other", "latest", [weights])  # shares the weights blob
    for name in ("tiny:1b", "other"):
        httpx.post(f"{mirror.url()}/api/pull", json={"model": name, "stream": False}, timeout=60)
    entries = {m["name"]: m for m in httpx.get(f"{mirror.url()}/api/tags").json()["models"]}
    name = f"{_upstream_host(registry)}/library/tiny:1b"
    assert entries[name]["digest"] == hashlib.sha256(manifest).hexdigest()
    assert entries[name]["size"] == weights.size + sum(b.size for b in small)
    assert entries[name]["details"]["family"] == "llama" and entries[name]["details"]["quantization_level"] == "Q4_0"
    shown = httpx.post(f"{mirror.url()}/api/show", json={"model": "tiny:1b"}).json()
    assert shown["template"] == TEMPLATE
    assert '"<|user|>"' in shown["parameters"] and "temperature" in shown["parameters"]
    assert "model_info" not in shown  # not invented
    r = httpx.request("DELETE", f"{mirror.url()}/api/delete", json={"model": "tiny:1b"})
    assert r.status_code == 200
    blobs = tmp_path / "cache" / "blobs"
    assert (blobs / weights.digest.replace(":", "-")).exists()  # still used by library/other
    assert not (blobs / small[0].digest.replace(":", "-")).exists()
    r = httpx.post(f"{mirror.url()}/api/show", json={"model": "tiny:1b"})
    assert r.status_code == 404 and "not found" in r.json()["error"]
    assert other  # the other model is still listed
    assert f"{_upstream_host(registry)}/library/other:latest" in {
        m["name"] for m in httpx.get(f"{mirror.url()}/api/tags").json()["models"]}


@pytest.mark.parametrize(("method", "path"), [("POST", "/api/show"), ("DELETE", "/api/delete")])
def test_show_and_delete_of_a_missing_model_answer_in_ollamas_words(mirror: ServerThread, method: str,
                                                                    path: str) -> None:
    r = httpx.request(method, f"{mirror.url()}{path}", json={"model": "nothere"})
    assert r.status_code == 404 and r.json() == {"error": "model 'nothere' not found"}  # what `ollama rm` prints


def test_ollamas_resolving_get_is_logged_as_resolved_at_debug_and_a_reader_leaving_as_client_gone(
    mirror: ServerThread, registry: FakeRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    """Every pull's resolving GET reads the headers (Location) and hangs up: routine, not an error."""
    caplog.set_level(logging.DEBUG, logger="mirror.access")
    layer = write_blob(registry.directory, 12_000_000, seed=43)
    registry.add_model("library/res", "1", [layer])
    registry.cdn.rate = 1_000_000  # bytes/s per connection: the ranged read starts long before the fill ends
    url = f"{mirror.url()}/v2/library/res/blobs/{layer.digest}"
    with httpx.Client(timeout=30) as client:
        client.get(f"{mirror.url()}/v2/library/res/manifests/1")
        with client.stream("GET", url, headers={"User-Agent": OLLAMA_AGENT}) as r:
            assert r.status_code == 200 and r.headers["location"]  # all Ollama reads; then it hangs up
        with client.stream("GET", url, headers={"Range": f"bytes=0-{layer.size - 1}"}) as r:  # leaves mid-range
            next(r.iter_raw(65536))

    def blob_lines() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "mirror.access" and f"/blobs/{layer.digest}" in r.getMessage()]

    deadline = time.monotonic() + 10
    while len(blob_lines()) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)  # the access line is written when the server notices the hang-up
    lines = {r.getMessage().split()[2]: r for r in blob_lines()}  # by status
    assert lines["206"].levelno == logging.INFO and lines["206"].getMessage().endswith("outcome='client gone'")
    assert lines["200"].levelno == logging.DEBUG and lines["200"].getMessage().endswith("outcome='resolved'")


@pytest.mark.parametrize("path", ["/api/generate", "/api/chat", "/api/embed", "/api/create", "/api/push",
                                  "/api/copy"])
def test_inference_endpoints_answer_501(mirror: ServerThread, path: str) -> None:
    r = httpx.post(f"{mirror.url()}{path}", json={"model": "x"})
    assert r.status_code == 501 and "not an inference server" in r.json()["error"]


def test_version_and_heartbeat(mirror: ServerThread) -> None:
    assert httpx.get(f"{mirror.url()}/api/version").json()["version"]
    assert httpx.head(f"{mirror.url()}/").status_code == 200


@pytest.mark.real_client
def test_real_cli_manages_the_mirror(registry: FakeRegistry, start_mirror: MirrorFactory,
                                     model: tuple[bytes, Blob, list[Blob]], ollama, tmp_path: Path) -> None:
    manifest, weights, small = model
    mirror = start_mirror()
    admin = ollama("admin", start=False)  # only the CLI: it talks to the mirror
    host = f"127.0.0.1:{mirror.port}"

    result = admin.cli("-v", host=host, timeout=60)
    assert result.returncode == 0 and "Warning" not in result.stdout + result.stderr, result.stdout

    result = admin.cli("pull", "tiny:1b", host=host)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "success" in result.stderr + result.stdout

    listed = admin.list_models(host=host)
    name = f"{_upstream_host(registry)}/library/tiny:1b"
    assert listed[name] == hashlib.sha256(manifest).hexdigest()[:12]

    result = admin.cli("show", "--template", "tiny:1b", host=host)
    assert result.returncode == 0 and TEMPLATE in result.stdout, result.stderr
    result = admin.cli("show", "--parameters", "tiny:1b", host=host)
    assert result.returncode == 0 and "temperature" in result.stdout, result.stderr

    result = admin.cli("run", "tiny:1b", "hello", host=host)
    assert result.returncode != 0 and "not an inference server" in result.stderr

    registry.server.stop()  # an ordinary Ollama instance now pulls from the mirror alone
    machine = ollama("machine")
    result = machine.pull(f"{host}/library/tiny:1b")
    assert result.returncode == 0, result.stderr[-2000:]
    assert machine.list_models()[f"{host}/library/tiny:1b"] == hashlib.sha256(manifest).hexdigest()[:12]

    result = admin.cli("rm", "tiny:1b", host=host)
    assert result.returncode == 0, result.stderr
    assert name not in admin.list_models(host=host)
    assert not (tmp_path / "cache" / "blobs" / weights.digest.replace(":", "-")).exists()
