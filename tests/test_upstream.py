"""The upstream client: redirects and SSRF rules without sockets (httpx.MockTransport); a CDN
that ignores Range and the separate connection pools on real ones."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from collections.abc import Callable

import httpx
import pytest

from mirror.errors import RangeIgnored, UpstreamInvalid, UpstreamUnavailable
from mirror.names import Digest, Name
from mirror.netpolicy import READ_SIZE
from mirror.upstream import BlobLocation, Upstream

from .conftest import MirrorFactory
from .fakes import Blob, FakeCDN, FakeRegistry, write_blob

DIGEST = Digest("b" * 64)
ADDRESSES = {
    "registry.example.com": "93.184.216.34",
    "lan-registry": "192.168.1.10",
    "cdn.example.net": "151.101.1.1",
    "cdn.internal": "10.0.0.5",
    "metadata": "169.254.169.254",
}


async def _fake_resolve(host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        return [ipaddress.ip_address(ADDRESSES[host])] if host in ADDRESSES else []


def _resolve_blob(upstream_url: str, location: str, allow: list[str] | None = None) -> str:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(307, headers={"Location": location})

    async def run() -> str:
        upstream = Upstream(upstream_url, transport=httpx.MockTransport(handler), resolve=_fake_resolve,
                            allow_networks=[ipaddress.ip_network(n) for n in allow or []])
        try:
            return (await upstream.resolve_blob(Name("library", "x"), DIGEST)).url
        finally:
            await upstream.aclose()

    return asyncio.run(run())


@pytest.mark.parametrize("target", [
    pytest.param("https://cdn.internal/blob", id="private"),
    pytest.param("http://127.0.0.1:8080/blob", id="loopback"),
    pytest.param("http://metadata/latest/meta-data", id="link-local"),
    pytest.param("http://[::1]/blob", id="ipv6-loopback"),
])
def test_public_registry_redirect_to_private_address_is_refused(target: str) -> None:
    with pytest.raises(UpstreamInvalid, match="refused .*--allow-networks"):
        _resolve_blob("https://registry.example.com", target)


def test_redirect_to_an_allowed_network_or_a_public_cdn_is_followed() -> None:
    assert _resolve_blob("https://registry.example.com", "https://cdn.example.net/x") == "https://cdn.example.net/x"
    assert _resolve_blob("https://registry.example.com", "https://cdn.internal/x", allow=["10.0.0.0/8"]) == \
        "https://cdn.internal/x"


def test_lan_registry_may_redirect_to_the_lan() -> None:
    assert _resolve_blob("http://lan-registry:5000", "https://cdn.internal/x") == "https://cdn.internal/x"


@pytest.mark.parametrize("location", ["file:///etc/passwd", "gopher://cdn.example.net/x", "ftp://cdn.example.net/"])
def test_redirect_to_a_non_http_scheme_is_refused(location: str) -> None:
    with pytest.raises(UpstreamInvalid, match="non-http"):
        _resolve_blob("https://registry.example.com", location)


def test_redirect_loop_on_the_registry_is_refused() -> None:
    with pytest.raises(UpstreamInvalid, match="redirects"):
        _resolve_blob("https://registry.example.com", "https://registry.example.com/v2/again")


# -- on real sockets: a CDN that ignores Range, and the two connection pools --------------------------

MB = 1 << 20


async def _located(upstream: Upstream, blob: Blob) -> BlobLocation:
    return await upstream.resolve_blob(Name.parse("library/x"), Digest.parse(blob.digest))


def test_a_cdn_that_ignores_range_is_refused_before_its_body_is_read(registry: FakeRegistry, cdn: FakeCDN) -> None:
    blob = registry.add_blob(write_blob(registry.directory, 16 * MB, seed=160))
    cdn.ignore_range = True
    cdn.rate = 8 * MB  # slow enough that what was sent before the close is what the mirror let in

    async def run() -> None:
        upstream = Upstream(registry.url)
        try:
            location = await _located(upstream, blob)
            with pytest.raises(RangeIgnored, match="ignored Range"):
                async with upstream.open_range(location, 8 * MB, 9 * MB, blob.size) as body:
                    async for _ in body:
                        pass
        finally:
            await upstream.aclose()

    asyncio.run(run())
    assert cdn.bytes_sent <= READ_SIZE  # not the 9 MiB a read from 0 to the range's end costs


def test_a_cdn_that_ignores_range_still_serves_whole_blobs_and_callers_that_accept_it(
    registry: FakeRegistry, cdn: FakeCDN
) -> None:
    blob = registry.add_blob(write_blob(registry.directory, 3 * MB, seed=161))
    cdn.ignore_range = True
    data = blob.path.read_bytes()

    async def read(upstream: Upstream, start: int, stop: int, accept_whole: bool) -> bytes:
        location = await _located(upstream, blob)
        async with upstream.open_range(location, start, stop, blob.size, accept_whole=accept_whole) as body:
            return b"".join([piece async for piece in body])

    async def run() -> tuple[bytes, bytes]:
        upstream = Upstream(registry.url)
        try:
            return await read(upstream, 0, blob.size, False), await read(upstream, MB, blob.size, True)
        finally:
            await upstream.aclose()

    whole, tail = asyncio.run(run())
    assert whole == data and tail == data[MB:]


def test_a_cold_manifest_does_not_wait_behind_fills(registry: FakeRegistry, cdn: FakeCDN,
                                                    start_mirror: MirrorFactory) -> None:
    layers = [write_blob(registry.directory, 8 * MB, seed=162 + i) for i in range(2)]
    registry.add_model("library/big", "1", layers)
    registry.add_model("library/cold", "1", [write_blob(registry.directory, 1000, seed=164)])
    cdn.rate = 1 * MB  # per connection: every range takes seconds
    registry.manifest_delay = 0.2  # the registry's own time
    mirror = start_mirror(upstream_connections=2, connections=2)
    with httpx.Client(base_url=mirror.url(), timeout=30) as client, contextlib.ExitStack() as fills:
        assert client.get("/v2/library/big/manifests/1").status_code == 200
        for layer in layers:
            fills.enter_context(client.stream("GET", f"/v2/library/big/blobs/{layer.digest}"))
        _wait_until(lambda: len(cdn.requests) >= 2, "the fills never reached the CDN")
        began = time.monotonic()
        got = client.get("/v2/library/cold/manifests/1")
        elapsed = time.monotonic() - began
    assert got.status_code == 200
    assert elapsed < registry.manifest_delay + 1.0, f"a cold manifest took {elapsed:.1f} s during fills"


def test_registry_requests_wait_a_bounded_time_for_a_connection(registry: FakeRegistry) -> None:
    registry.add_model("library/slow", "1", [write_blob(registry.directory, 1000, seed=165)])
    registry.manifest_delay = 1.5

    class OneConnection(Upstream):
        REGISTRY_CONNECTIONS = 1

    async def run() -> list[object]:
        upstream = OneConnection(registry.url, pool_timeout=0.3)
        name = Name.parse("library/slow")
        try:
            return await asyncio.gather(upstream.get_manifest(name, "1", {}), upstream.get_manifest(name, "1", {}),
                                        return_exceptions=True)
        finally:
            await upstream.aclose()

    first, second = asyncio.run(run())
    assert not isinstance(first, Exception)
    assert isinstance(second, UpstreamUnavailable) and "no upstream connection came free" in str(second)


def _wait_until(condition: Callable[[], bool], message: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.02)
