"""Upstream health: what the log, /status.json, /metrics and the clients' error bodies say when the
registry is down, hung, unresolvable or speaks no TLS, and that it is said once, with the fix."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mirror import Settings
from mirror.errors import UpstreamStalled, UpstreamUnavailable
from mirror.health import State
from mirror.names import Name
from mirror.upstream import Upstream

from .conftest import MirrorFactory
from .fakes import FakeRegistry, ServerThread, write_blob

OLLAMA = {"User-Agent": "ollama/0.9.3 (amd64 linux) Go/go1.24.1"}
DOCKER = {"User-Agent": "docker/27.0.3 go/go1.22.5"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def refused(host: str) -> str:
    return (f"the mirror cannot connect to {host}: connection refused; check that the registry is up and that "
            "--upstream (or --registry) names the right host and port")


@pytest.fixture
def hung() -> Iterator[int]:
    """A port that accepts connections (the kernel completes the handshake) and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield sock.getsockname()[1]
    sock.close()


def _wait_for(condition: Callable[[], object], what: str, timeout: float = 10.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.02)
    raise AssertionError(f"{what} did not happen within {timeout} s")


def _health(url: str) -> dict[str, object]:
    """The first registry's record, once the start-up probe has answered."""
    def probed() -> dict[str, object] | None:
        [record] = httpx.get(f"{url}/status.json").json()["health"]
        return record if record["state"] != "unknown" else None

    return _wait_for(probed, "the start-up probe")  # type: ignore[return-value]


def _upstream_up(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    return {s.labels["registry"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "ollama_mirror_upstream_up"}


def _lines(caplog: pytest.LogCaptureFixture, start: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(start)]


def test_unreachable_upstream_is_said_at_start_once_with_the_fix_and_shown(
    start_mirror: MirrorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mirror")
    host = f"127.0.0.1:{_free_port()}"
    mirror = start_mirror(upstream=f"http://{host}")
    record = _health(mirror.url())
    assert record["state"] == "down" and record["last_error"] == refused(host) and record["last_reached"] is None
    assert _upstream_up(mirror.url()) == {host: 0.0}
    with httpx.Client(base_url=mirror.url(), timeout=10) as client:
        for _ in range(5):
            got = client.get("/v2/library/m/manifests/1", headers=DOCKER)
            assert got.status_code == 502
            assert got.json()["errors"] == [{"code": "UPSTREAM_ERROR", "message": refused(host), "detail": None}]
        got = client.get("/v2/library/m/manifests/1", headers=OLLAMA)
    # Ollama prints the body after the status: "Error: pull model manifest: 502: <this sentence>"
    assert got.status_code == 502 and got.text == refused(host)
    assert got.headers["content-type"] == "text/plain; charset=utf-8"
    assert _lines(caplog, "upstream") == [  # the probe's line; the six requests within the minute add none
        f"upstream down registry={host} url=http://{host} cause=refused reason={refused(host)}"]


def test_upstream_up_at_start_then_down_then_recovered(
    registry: FakeRegistry, start_mirror: MirrorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mirror")
    host = registry.url.removeprefix("http://")
    registry.add_model("library/m", "1", [write_blob(registry.directory, 1000, seed=190)])
    mirror = start_mirror(manifest_ttl=0, revalidate_timeout=0.5)
    record = _health(mirror.url())
    assert record["state"] == "up" and record["latency_ms"] >= 0 and record["last_error"] is None
    assert _upstream_up(mirror.url()) == {host: 1.0}
    [line] = _lines(caplog, "upstream up")
    assert line.startswith(f"upstream up registry={host} url={registry.url} latency_ms=")

    url = f"{mirror.url()}/v2/library/m/manifests/1"
    assert httpx.get(url).status_code == 200
    port = registry.server.port
    registry.server.stop()
    assert httpx.get(url).headers["x-cache"] == "STALE"  # the cached copy, and the failure is recorded
    record = _health(mirror.url())
    assert record["state"] == "down" and record["last_error"] == refused(host) and record["last_reached"]
    assert _upstream_up(mirror.url()) == {host: 0.0}

    again = ServerThread(registry, port=port).start()  # the same registry comes back on its port
    try:
        assert httpx.get(url).headers["x-cache"] == "REVALIDATED"
    finally:
        again.stop()
    assert _health(mirror.url())["state"] == "up"
    assert [line.split(" latency_ms=")[0] for line in _lines(caplog, "upstream")] == [
        f"upstream up registry={host} url={registry.url}",
        f"upstream down registry={host} url={registry.url} cause=refused reason={refused(host)}",
        f"upstream up registry={host} url={registry.url}",
    ]
    assert _lines(caplog, "upstream up")[-1].endswith(" (recovered)")


def test_hung_upstream_answers_504_with_the_reason_sooner_than_the_stall_timeout(
    start_mirror: MirrorFactory, hung: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert Upstream.ANSWER_TIMEOUT < Settings().stall_timeout  # 10 s, where it was the 20 s stall timeout
    monkeypatch.setattr(Upstream, "ANSWER_TIMEOUT", 1.0)
    host = f"127.0.0.1:{hung}"
    mirror = start_mirror(upstream=f"http://{host}")
    began = time.monotonic()
    got = httpx.get(f"{mirror.url()}/v2/library/m/manifests/1", headers=OLLAMA, timeout=8)
    assert time.monotonic() - began < 3
    assert got.status_code == 504
    assert got.text == (f"{host} accepted the mirror's connection but sent nothing for 1 s: it is overloaded or "
                        "hung; try again later, or point --upstream at a registry that answers")
    assert _health(mirror.url())["state"] == "down"


def test_missing_model_and_offline_are_sentences_for_ollama_and_404_for_registry_clients(
    registry: FakeRegistry, start_mirror: MirrorFactory
) -> None:
    mirror = start_mirror()
    url = f"{mirror.url()}/v2/library/nothing/manifests/here"
    expected = f"library/nothing:here is not in the upstream registry {registry.url}: check the model's name and tag"
    docker = httpx.get(url, headers=DOCKER)
    assert docker.status_code == 404 and docker.json()["errors"][0]["message"] == expected
    ollama = httpx.get(url, headers=OLLAMA)  # Ollama never prints a 404's body ("file does not exist")
    assert ollama.status_code == 400 and ollama.text == expected
    mirror.stop()
    offline = start_mirror(offline=True)
    got = httpx.get(f"{offline.url()}/v2/library/nothing/manifests/here", headers=OLLAMA)
    assert got.status_code == 400 and got.text == (
        "library/nothing:here is not cached and this mirror is offline: bring it here with `ollama-mirror export` "
        "on a connected mirror and `ollama-mirror import`")
    assert httpx.get(f"{offline.url()}/status.json").json()["health"][0]["state"] == "offline"
    assert _upstream_up(offline.url()) == {}


def test_through_the_proxy_or_dns_modes_a_missing_model_stays_404_for_ollama(
    registry: FakeRegistry, start_mirror: MirrorFactory
) -> None:
    """The client believes it talks to the registry: it gets the registry's answer (v0.32 then
    offers a ``:cloud`` model)."""
    mirror = start_mirror(upstream="https://registry.ollama.ai", registries=f"registry.ollama.ai={registry.url}")
    got = httpx.get(f"{mirror.url()}/v2/library/nothing/manifests/here",
                    headers={**OLLAMA, "Host": "registry.ollama.ai"})
    assert got.status_code == 404


def test_a_model_the_disk_cannot_take_is_refused_at_its_manifest_for_ollama(
    registry: FakeRegistry, start_mirror: MirrorFactory
) -> None:
    """Ollama prints why a manifest failed, but for a blob only "context deadline exceeded" 30 s later."""
    layer = write_blob(registry.directory, 100_000, seed=191)
    registry.add_model("library/m", "1", [layer])
    mirror = start_mirror(min_free="100T")  # no disk has that much free: every fill is refused
    url = f"{mirror.url()}/v2/library/m/manifests/1"
    got = httpx.get(url, headers=OLLAMA)
    assert got.status_code == 507
    assert got.text.startswith(f"not enough disk space for blob {layer.digest[:19]} ({layer.size} bytes): ")
    assert got.text.endswith("must stay free (--min-free); free space, or set --max-size to evict old models")
    assert httpx.get(url, headers=DOCKER).status_code == 200  # registry clients get the manifest as before


# -- the cause, as the upstream client names it (no mirror: Upstream alone) ----------------------


def _manifest_failure(upstream: Upstream) -> UpstreamUnavailable | UpstreamStalled:
    async def run() -> UpstreamUnavailable | UpstreamStalled:
        try:
            with pytest.raises((UpstreamUnavailable, UpstreamStalled)) as caught:
                await upstream.get_manifest(Name.parse("library/m"), "1", {})
            return caught.value
        finally:
            await upstream.aclose()

    return asyncio.run(run())


async def _no_addresses(host: str) -> list[object]:
    return []


def test_dns_failure_names_the_host_and_the_fix() -> None:
    upstream = Upstream("https://registry.example:8443", resolve=_no_addresses)  # type: ignore[arg-type]
    failure = _manifest_failure(upstream)
    assert str(failure) == (
        "the mirror cannot resolve registry.example: its DNS does not know the name; check the name in --upstream "
        "(or --registry) and the mirror's DNS, or pin an address with --resolve registry.example=IP")
    assert failure.detail["cause"] == "dns"
    assert upstream.health.state is State.DOWN and upstream.health.last_error == str(failure)


def test_tls_failure_names_the_reason_and_the_fix(registry: FakeRegistry) -> None:
    host = registry.url.removeprefix("http://")
    failure = _manifest_failure(Upstream(f"https://{host}", connect_timeout=5))  # it speaks plain http
    assert str(failure).startswith(f"the mirror's TLS handshake with {host} failed ([SSL: WRONG_VERSION_NUMBER]")
    assert str(failure).endswith("check the name in --upstream (or --registry), or let the mirror trust the "
                                 "registry's CA with SSL_CERT_FILE")
    assert failure.detail["cause"] == "tls"


def test_tls_handshake_that_never_finishes_is_a_timeout_with_the_fix(hung: int) -> None:
    failure = _manifest_failure(Upstream(f"https://127.0.0.1:{hung}", connect_timeout=0.5))
    assert str(failure) == (f"the mirror's TLS handshake with 127.0.0.1:{hung} did not finish within 0.5 s: "
                            "check that it speaks https on that port")


def test_5xx_names_the_status_and_marks_the_registry_down(registry: FakeRegistry) -> None:
    registry.manifest_status = 503
    upstream = Upstream(registry.url)
    failure = _manifest_failure(upstream)
    host = registry.url.removeprefix("http://")
    assert str(failure) == f"{host} answered the mirror with 503: the registry is failing or busy; try again later"
    assert upstream.health.state is State.DOWN and failure.detail["cause"] == "http-503"
