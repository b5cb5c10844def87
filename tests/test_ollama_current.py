"""OLLAMA_HOST=mirror with a current CLI (v0.32.15): the exact JSON it parses from the mirror's API.

What the CLI does with each answer is read from cmd/cmd.go (versionHandler, pullModelWithProgress),
cmd/cloud_suggest.go (the ``:cloud`` probe), internal/modelref (``:local``, ``:cloud``) and
server/images.go (pullWithTransfer's progress).
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from mirror.names import Source, SourcedName

from .clients import OLLAMA_USER_AGENT, TENSOR_MEDIA_TYPE
from .fakes import (
    NEWER_OLLAMA_NEEDED,
    Blob,
    FakeRegistry,
    ServerThread,
    blob_from_bytes,
    write_blob,
)

CLI = {"User-Agent": OLLAMA_USER_AGENT}  # api/client.go: every API request says the CLI's version
STUB = {"model_format": "", "model_family": "", "model_families": None, "model_type": "", "file_type": "",
        "remote_host": "https://ollama.com:443", "remote_model": "gpt-oss:20b", "architecture": "amd64",
        "os": "linux"}


def _post(mirror: ServerThread, path: str, model: str, **extra: object) -> httpx.Response:
    return httpx.post(f"{mirror.url()}{path}", json={"model": model, **extra}, headers=CLI, timeout=60)


def _pull_lines(mirror: ServerThread, model: str) -> list[dict[str, object]]:
    with httpx.stream("POST", f"{mirror.url()}/api/pull", json={"model": model}, headers=CLI, timeout=60) as r:
        assert r.status_code == 200
        return [json.loads(line) for line in r.iter_lines() if line]


def _host(registry: FakeRegistry) -> str:
    return registry.url.removeprefix("http://")


@pytest.fixture
def tiny(registry: FakeRegistry) -> Blob:
    weights = write_blob(registry.directory, 300_000, seed=161)
    template = blob_from_bytes(registry.directory, b"{{ .Prompt }}")
    registry.add_model("library/tiny", "1b", [weights, (template, "template")])
    return weights


@pytest.fixture
def stub(registry: FakeRegistry) -> bytes:
    """A cloud model as the registry holds it: a config naming where it runs, and no weights."""
    config = blob_from_bytes(registry.directory, json.dumps(STUB).encode())
    return registry.add_model("library/gpt-oss", "20b-cloud", [], config=config)


@pytest.mark.parametrize("agent", [OLLAMA_USER_AGENT, "ollama/0.33.0-rc2 (arm64 darwin) Go/go1.26.0"])
def test_version_is_the_asking_clients_own_so_the_cli_does_not_warn(mirror: ServerThread, agent: str) -> None:
    r = httpx.get(f"{mirror.url()}/api/version", headers={"User-Agent": agent})
    own = agent.split()[0].removeprefix("ollama/")
    assert r.status_code == 200 and r.json() == {"version": own}  # versionHandler: warns if != version.Version


def test_version_for_other_clients_is_the_one_the_api_was_checked_against(mirror: ServerThread) -> None:
    assert httpx.get(f"{mirror.url()}/api/version", headers={"User-Agent": "curl/8.5.0"}).json() == \
        {"version": "0.9.3"}


def test_cloud_probe_after_a_missing_model_is_answered_as_ollama_com_answers(mirror: ServerThread,
                                                                             registry: FakeRegistry) -> None:
    lines = _pull_lines(mirror, "kimi")
    assert lines[0] == {"status": "pulling manifest"}
    assert str(lines[-1]["error"]).startswith("pull model manifest: file does not exist")  # isPullNotFoundErr
    r = _post(mirror, "/api/show", "kimi:cloud")  # pullWithCloudSuggestion's probe
    assert r.status_code == 404 and r.json() == {"error": "model 'kimi:cloud' not found"}
    # a cloud model the mirror holds (its registry tag, x:cloud) is answered as ollama.com would
    config = blob_from_bytes(registry.directory, json.dumps({**STUB, "remote_model": "kimi"}).encode())
    registry.add_model("library/kimi", "cloud", [], config=config)
    assert _post(mirror, "/api/pull", "kimi:cloud", stream=False).json() == {"status": "success"}
    shown = _post(mirror, "/api/show", "kimi:cloud")
    assert shown.status_code == 200
    assert (shown.json()["remote_model"], shown.json()["remote_host"]) == ("kimi", "https://ollama.com:443")


def test_cloud_names_pull_show_list_and_rm_the_registrys_cloud_tag(mirror: ServerThread, registry: FakeRegistry,
                                                                    stub: bytes) -> None:
    assert _post(mirror, "/api/pull", "gpt-oss:20b:cloud", stream=False).json() == {"status": "success"}
    assert registry.count("GET", "/gpt-oss/manifests/20b-cloud") == 1  # modelref.NormalizePullName
    listed = [m for m in httpx.get(f"{mirror.url()}/api/tags", headers=CLI).json()["models"]
              if m["name"] == f"{_host(registry)}/library/gpt-oss:20b-cloud"]
    assert len(listed) == 1
    assert (listed[0]["remote_model"], listed[0]["remote_host"]) == ("gpt-oss:20b", "https://ollama.com:443")
    for name in ("gpt-oss:20b:cloud", "gpt-oss:20b-cloud"):
        shown = _post(mirror, "/api/show", name)
        assert shown.status_code == 200 and shown.json()["remote_model"] == "gpt-oss:20b"
    r = httpx.request("DELETE", f"{mirror.url()}/api/delete", json={"model": "gpt-oss:20b:cloud"}, headers=CLI)
    assert r.status_code == 200
    r = httpx.request("DELETE", f"{mirror.url()}/api/delete", json={"model": "gpt-oss:20b:cloud"}, headers=CLI)
    assert r.status_code == 404 and r.json() == {"error": "model 'gpt-oss:20b:cloud' not found"}


def test_local_names_mean_the_model_without_the_suffix(mirror: ServerThread, registry: FakeRegistry,
                                                       tiny: Blob, tmp_path: Path) -> None:
    assert _post(mirror, "/api/pull", "tiny:1b:local", stream=False).json() == {"status": "success"}
    assert registry.count("GET", "/tiny/manifests/1b") == 1 and registry.count("GET", "/manifests/local") == 0
    shown = _post(mirror, "/api/show", "tiny:1b:local")
    assert shown.status_code == 200 and shown.json()["template"] == "{{ .Prompt }}"
    assert "remote_host" not in shown.json()
    r = httpx.request("DELETE", f"{mirror.url()}/api/delete", json={"model": "tiny:1b:local"}, headers=CLI)
    assert r.status_code == 200
    assert not (tmp_path / "cache" / "blobs" / tiny.digest.replace(":", "-")).exists()


@pytest.mark.parametrize(("method", "path"), [("POST", "/api/pull"), ("POST", "/api/show"),
                                              ("DELETE", "/api/delete")])
def test_both_suffixes_are_refused_in_ollamas_words(mirror: ServerThread, method: str, path: str) -> None:
    r = httpx.request(method, f"{mirror.url()}{path}", json={"model": "x:local:cloud"}, headers=CLI)
    assert r.status_code == 400 and r.json() == {"error": 'use either :local or :cloud, not both: "x:local:cloud"'}


def test_tensor_model_pull_progress_has_x_transfers_shape(mirror: ServerThread, registry: FakeRegistry) -> None:
    tensors = [write_blob(registry.directory, 400_000 + i, seed=170 + i) for i in range(3)]
    config = blob_from_bytes(registry.directory, json.dumps({"model_format": "safetensors"}).encode())
    registry.add_model("x/img", "1", [(t, TENSOR_MEDIA_TYPE.rsplit(".", 1)[1]) for t in tensors], config=config)
    total = sum(t.size for t in tensors) + config.size
    lines = _pull_lines(mirror, "x/img:1")
    assert lines[0] == {"status": "pulling manifest"}
    assert lines[-2:] == [{"status": "writing manifest"}, {"status": "success"}]  # no "verifying sha256 digest"
    bars = lines[1:-2]
    assert bars and all(set(b) == {"status", "digest", "total", "completed"} for b in bars)
    assert {(b["status"], b["digest"], b["total"]) for b in bars} == {("pulling model", "sha256:model", total)}
    done = [int(b["completed"]) for b in bars]  # type: ignore[call-overload]
    assert done == sorted(done) and done[-1] == total  # one bar, "pulling model:", to 100%
    # every blob already there: x/transfer reports no bar at all
    assert _pull_lines(mirror, "x/img:1") == [{"status": "pulling manifest"}, {"status": "writing manifest"},
                                              {"status": "success"}]


def test_pull_of_a_model_too_new_for_the_cli_fails_in_ollamas_words(mirror: ServerThread,
                                                                   registry: FakeRegistry, tiny: Blob) -> None:
    registry.min_ollama[("library/tiny", "1b")] = (0, 40, 0)
    lines = _pull_lines(mirror, "tiny:1b")
    assert lines == [{"status": "pulling manifest"},
                     {"error": f"pull model manifest: 412: {NEWER_OLLAMA_NEEDED.decode()}"}]


@pytest.mark.parametrize(("typed", "pulled", "local", "source"), [
    pytest.param("x", "library/x:latest", "library/x:latest", Source.ANY, id="plain"),
    pytest.param("x:cloud", "library/x:cloud", "library/x:latest", Source.CLOUD, id="cloud"),
    pytest.param("x:8b:cloud", "library/x:8b-cloud", "library/x:8b", Source.CLOUD, id="tag-cloud"),
    pytest.param("x:8b-cloud", "library/x:8b-cloud", "library/x:8b", Source.CLOUD, id="legacy-cloud"),
    pytest.param("X:8B:Cloud", "library/X:8B-cloud", "library/X:8B", Source.CLOUD, id="any-case"),
    pytest.param("x:8b:local", "library/x:8b", "library/x:8b", Source.LOCAL, id="local"),
    pytest.param("mirror.lan:11435/team/x:cloud", "mirror.lan:11435/team/x:cloud", "mirror.lan:11435/team/x:latest",
                 Source.CLOUD, id="host-port"),
    pytest.param("mirror.lan:11435/team/x", "mirror.lan:11435/team/x:latest", "mirror.lan:11435/team/x:latest",
                 Source.ANY, id="port-is-no-suffix"),
])
def test_source_suffixes_as_modelref_takes_them(typed: str, pulled: str, local: str, source: Source) -> None:
    sourced = SourcedName.parse(typed)
    assert (str(sourced.pull_ref()), str(sourced.ref()), sourced.source) == (pulled, local, source)
