"""Per-client-version manifests: upstream's 412 ("requires a newer version of Ollama") for the
clients it refuses, the manifest for the others, whichever asked first, and without upstream."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from mirror.clients import Answer, ClientAgent, Refusal, TagAnswers

from .clients import OLLAMA_USER_AGENT, GgufClient, GgufOptions
from .conftest import MirrorFactory
from .fakes import NEWER_OLLAMA_NEEDED, FakeRegistry, ServerThread, write_blob

NEW = OLLAMA_USER_AGENT  # v0.32.15, the stand-in's
OLD = "ollama/0.9.3 (amd64 linux) Go/go1.24.1"
MIDDLE = "ollama/0.31.0 (arm64 darwin) Go/go1.25.0"  # neither refused nor accepted yet
OLDER = "ollama/0.5.7 (amd64 windows) Go/go1.23.4"  # older than a refused one
NEWEST = "ollama/0.33.0-rc2 (amd64 linux) Go/go1.26.0"  # newer than an accepted one
TOO_OLD = f"pull model manifest: 412: {NEWER_OLLAMA_NEEDED.decode()}"  # what `ollama pull` fails with


@pytest.fixture
def gated(registry: FakeRegistry) -> bytes:
    """A model the registry serves to Ollama 0.30.0 and newer only, as it did for gpt-oss."""
    manifest = registry.add_model("library/gated", "1", [write_blob(registry.directory, 200_000, seed=151)])
    registry.min_ollama[("library/gated", "1")] = (0, 30, 0)
    return manifest


def _pull(url: str, dest: Path, user_agent: str) -> str | None:
    """A current client's pull (server/images.go, download.go) as ``user_agent``: its error, or None."""
    client = GgufClient(url, dest, GgufOptions(user_agent=user_agent))
    return asyncio.run(client.pull("library/gated", "1")).error


def _get(mirror: ServerThread, user_agent: str) -> httpx.Response:
    return httpx.get(f"{mirror.url()}/v2/library/gated/manifests/1", headers={"User-Agent": user_agent}, timeout=30)


def _asked(registry: FakeRegistry, user_agent: str) -> int:
    return sum(1 for m, p, ua in registry.requests if m == "GET" and p.endswith("/gated/manifests/1") and ua == user_agent)


def _assert_refused_as_upstream_does(r: httpx.Response) -> None:
    assert r.status_code == 412 and r.content == NEWER_OLLAMA_NEEDED
    assert r.headers["content-type"] == "text/plain; charset=utf-8"


def test_older_client_is_refused_after_a_newer_one_cached_the_tag(registry: FakeRegistry, gated: bytes,
                                                                  start_mirror: MirrorFactory,
                                                                  tmp_path: Path) -> None:
    mirror = start_mirror()
    assert _pull(mirror.url(), tmp_path / "new", NEW) is None
    assert _pull(mirror.url(), tmp_path / "old", OLD) == TOO_OLD  # as a direct pull fails
    assert _pull(registry.url, tmp_path / "direct", OLD) == TOO_OLD
    assert _asked(registry, OLD) == 2  # the mirror asked once, the direct pull once

    _assert_refused_as_upstream_does(_get(mirror, OLD))  # learned: not asked again
    _assert_refused_as_upstream_does(_get(mirror, OLDER))  # older than a refused client: refused too
    assert _get(mirror, NEWEST).content == gated  # newer than an accepted client: served from the cache
    assert _asked(registry, OLD) == 2 and _asked(registry, OLDER) == 0 and _asked(registry, NEWEST) == 0
    middle = _get(mirror, MIDDLE)  # between the two: only upstream knows
    assert middle.status_code == 200 and middle.content == gated and _asked(registry, MIDDLE) == 1


def test_newer_client_is_served_after_an_older_one_was_refused(registry: FakeRegistry, gated: bytes,
                                                               start_mirror: MirrorFactory, tmp_path: Path) -> None:
    mirror = start_mirror()
    assert _pull(mirror.url(), tmp_path / "old", OLD) == TOO_OLD
    assert _pull(mirror.url(), tmp_path / "new", NEW) is None
    assert (tmp_path / "new").exists()
    _assert_refused_as_upstream_does(_get(mirror, OLD))
    assert _get(mirror, NEW).headers["x-cache"] == "HIT"
    assert _asked(registry, OLD) == 1 and _asked(registry, NEW) == 1  # each answer learned once


def test_other_clients_are_answered_as_upstream_answers_them(registry: FakeRegistry, gated: bytes,
                                                             start_mirror: MirrorFactory) -> None:
    registry.refused_agents = {"curl"}
    mirror = start_mirror()
    assert _get(mirror, "skopeo/1.13.3").content == gated
    _assert_refused_as_upstream_does(_get(mirror, "curl/8.5.0"))
    _assert_refused_as_upstream_does(_get(mirror, "curl/7.88.1"))  # curl is curl, whatever its version
    assert _get(mirror, "skopeo/1.15.0").headers["x-cache"] == "HIT"
    assert registry.count("GET", "/gated/manifests/1") == 2


def test_offline_mirror_answers_from_what_was_learned(registry: FakeRegistry, gated: bytes,
                                                      start_mirror: MirrorFactory) -> None:
    registry.refused_agents = {"curl"}
    online = start_mirror()
    for agent in (OLD, NEW, "curl/8.5.0"):
        _get(online, agent)
    online.stop()  # the same cache, served offline by another server
    offline = start_mirror(offline=True)
    _assert_refused_as_upstream_does(_get(offline, OLD))
    _assert_refused_as_upstream_does(_get(offline, "curl/8.5.0"))
    assert _get(offline, NEW).content == gated
    assert _get(offline, MIDDLE).content == gated  # nothing learned: the cached manifest (README says why)


def test_upstream_down_answers_from_what_was_learned(registry: FakeRegistry, gated: bytes,
                                                     start_mirror: MirrorFactory) -> None:
    mirror = start_mirror(manifest_ttl=0)  # everything learned is old at once: upstream is asked each time
    _assert_refused_as_upstream_does(_get(mirror, OLD))
    assert _get(mirror, NEW).content == gated
    registry.server.stop()
    _assert_refused_as_upstream_does(_get(mirror, OLD))
    served = _get(mirror, NEW)
    assert served.content == gated and served.headers["x-cache"] == "STALE"
    assert _get(mirror, MIDDLE).content == gated


def test_what_was_learned_is_trusted_for_the_ttl_only(registry: FakeRegistry, gated: bytes,
                                                      start_mirror: MirrorFactory) -> None:
    mirror = start_mirror(manifest_ttl=0.5)
    _assert_refused_as_upstream_does(_get(mirror, OLD))
    _assert_refused_as_upstream_does(_get(mirror, OLD))
    assert _asked(registry, OLD) == 1
    del registry.min_ollama[("library/gated", "1")]  # the registry now serves it to every client
    time.sleep(0.6)  # past the TTL
    assert _get(mirror, OLD).content == gated and _asked(registry, OLD) == 2


def test_a_moved_tag_forgets_the_old_manifests_answers(registry: FakeRegistry, gated: bytes,
                                                       start_mirror: MirrorFactory) -> None:
    mirror = start_mirror(manifest_ttl=600)
    _assert_refused_as_upstream_does(_get(mirror, OLD))
    assert _get(mirror, NEW).content == gated
    moved = registry.add_model("library/gated", "1", [write_blob(registry.directory, 300_000, seed=152)])
    del registry.min_ollama[("library/gated", "1")]
    assert _get(mirror, NEW).content == gated  # within the TTL: the cached manifest
    served = httpx.post(f"{mirror.url()}/api/pull", json={"model": "gated:1", "stream": False},
                        headers={"User-Agent": NEW}, timeout=30)  # an explicit pull asks upstream
    assert served.json() == {"status": "success"}
    assert _get(mirror, NEW).content == moved
    assert _get(mirror, OLD).content == moved  # refused for the old manifest; asked again for the new one
    assert _asked(registry, OLD) == 2


@pytest.mark.parametrize(("agent", "expected"), [
    pytest.param(NEW, ClientAgent("ollama", "0.32.15"), id="current"),
    pytest.param("ollama/0.33.0-rc2 (amd64 linux) Go/go1.26.0", ClientAgent("ollama", "0.33.0-rc2"), id="rc"),
    pytest.param("ollama/0.0.0 (amd64 linux) Go/go1.26.0", ClientAgent("ollama", "0.0.0"), id="dev-build"),
    pytest.param("ollama-transfer/1.0", ClientAgent("ollama-transfer"), id="tensor-downloader"),
    pytest.param("curl/8.5.0", ClientAgent("curl"), id="curl"),
    pytest.param("docker/24.0.7 go/go1.20.10 git-commit/311b9ff", ClientAgent("docker"), id="docker"),
    pytest.param("", ClientAgent(""), id="none"),
    pytest.param("ollama/<script>", ClientAgent("ollama"), id="not-a-version"),
])
def test_client_agent_from_user_agent(agent: str, expected: ClientAgent) -> None:
    assert ClientAgent.parse(agent) == expected
    assert ClientAgent.parse(expected.key) == expected


def test_ollama_versions_compare_as_numbers() -> None:
    versions = ["0.5.7", "0.9.3", "0.10.0", "0.32.2", "0.32.15", "0.33.0-rc1", "0.33.0-rc2", "0.33.0", "1.0.0"]
    orders = [ClientAgent("ollama", v).order for v in versions]
    assert orders == sorted(orders)  # type: ignore[type-var]
    assert ClientAgent("ollama", "0.32.15-3-gabc").order is None and ClientAgent("curl").order is None


def test_tag_answers_decide_by_order_and_survive_a_round_trip() -> None:
    refusal = Refusal(412, NEWER_OLLAMA_NEEDED, "text/plain")
    answers = TagAnswers().refused(ClientAgent("ollama", "0.9.3"), refusal, 10.0)
    answers = answers.accepted(ClientAgent("ollama", "0.32.15"), "sha256:" + "a" * 64, 20.0)
    assert answers.answer_for(ClientAgent("ollama", "0.5.7")) == Answer(10.0, refusal)
    assert answers.answer_for(ClientAgent("ollama", "1.0.0")) == Answer(20.0)
    assert answers.answer_for(ClientAgent("ollama", "0.31.0")) is None
    assert answers.answer_for(ClientAgent("curl")) is None
    assert TagAnswers.from_dict(answers.to_dict()) == answers
    assert TagAnswers.from_dict({"digest": 3}) == TagAnswers()  # damaged: nothing learned
    # upstream now refuses a version it accepted: the tag moved, the old acceptance goes
    later = answers.refused(ClientAgent("ollama", "0.32.15"), refusal, 30.0)
    assert later.answer_for(ClientAgent("ollama", "0.32.15")) == Answer(30.0, refusal)
