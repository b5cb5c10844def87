"""The network policy at the connection: nothing the upstream says reaches a private address.

Tests cannot use public addresses, so a classifier (an ``Upstream`` constructor argument) calls
127.0.0.1 and ::1 public; a "private service" listens on 127.0.0.2, which it calls private.
Every way upstream can point the mirror at it is tried, and the service must see nothing.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mirror import app
from mirror.ca import CertificateAuthority
from mirror.errors import UpstreamInvalid, UpstreamUnavailable
from mirror.names import Name
from mirror.netpolicy import IPAddress, system_resolve
from mirror.upstream import BlobLocation, Upstream

from .conftest import MirrorFactory
from .fakes import FakeCDN, FakeRegistry, ServerThread, write_blob

PRIVATE = "127.0.0.2"
PUBLIC = frozenset(ipaddress.ip_address(a) for a in ("127.0.0.1", "::1"))


def loopback_is_public(ip: IPAddress) -> bool:
    return ip in PUBLIC


@pytest.fixture
def private(cdn: FakeCDN) -> Iterator[FakeCDN]:
    """A service on 127.0.0.2 that would serve the CDN's blobs, and counts every request."""
    service = FakeCDN()
    service.blobs, service.tokens = cdn.blobs, cdn.tokens
    server = ServerThread(service, host=PRIVATE).start()
    service.url = server.url(PRIVATE)
    yield service
    server.stop()


@pytest.fixture
def public_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mirrors started from here on build their upstream with the tests' classifier."""
    monkeypatch.setattr(app, "Upstream", functools.partial(Upstream, is_public=loopback_is_public))


@pytest.fixture
def refusals(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING, logger="mirror.netpolicy")
    return caplog


def _refused(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("upstream refused")]


def _model(registry: FakeRegistry, seed: int) -> str:
    layer = write_blob(registry.directory, 2_000_000, seed=seed)
    registry.add_model("library/ssrf", "1", [layer])
    return layer.digest


@pytest.mark.usefixtures("public_loopback")
def test_cdn_redirect_to_a_private_address_during_a_fill_reaches_nothing(
    registry: FakeRegistry, cdn: FakeCDN, private: FakeCDN, start_mirror: MirrorFactory,
    refusals: pytest.LogCaptureFixture,
) -> None:
    digest = _model(registry, seed=170)
    cdn.redirect = private.url  # the registry's redirect is fine; the CDN's own 302 is not
    mirror = start_mirror(connections=4, max_retries=1)
    served = []
    with httpx.Client(base_url=mirror.url(), timeout=30) as client:
        for _ in range(2):  # two fills, each refused
            try:
                got = client.get(f"/v2/library/ssrf/blobs/{digest}")
                served.append(got.status_code == 200 and len(got.content) == 2_000_000)
            except httpx.HTTPError:
                served.append(False)
    assert served == [False, False]
    assert private.requests == []
    assert _refused(refusals) == [f"upstream refused host={PRIVATE} address={PRIVATE} "
                                  f"registry=127.0.0.1 reason=private address"]  # once, however many tries
    assert len(cdn.requests) >= 2


@pytest.mark.usefixtures("public_loopback")
def test_registry_head_redirect_to_a_private_address_reaches_nothing(
    registry: FakeRegistry, private: FakeCDN, start_mirror: MirrorFactory
) -> None:
    digest = _model(registry, seed=171)
    registry.head_size = False  # HEAD answers 307, to the private service
    registry.cdn_url = private.url
    mirror = start_mirror()
    with httpx.Client(base_url=mirror.url(), timeout=30) as client:
        got = client.head(f"/v2/library/ssrf/blobs/{digest}")
    assert got.status_code == 502
    assert private.requests == []


@pytest.mark.usefixtures("public_loopback")
def test_token_realm_on_a_private_address_reaches_nothing(
    registry: FakeRegistry, private: FakeCDN, start_mirror: MirrorFactory
) -> None:
    _model(registry, seed=172)
    registry.require_token = True
    registry.token_realm = f"{private.url}/token"
    mirror = start_mirror()
    with httpx.Client(base_url=mirror.url(), timeout=30) as client:
        got = client.get("/v2/library/ssrf/manifests/1")
    assert got.status_code == 502
    message = got.json()["errors"][0]["message"]
    assert PRIVATE in message and "--allow-networks" in message
    assert private.requests == []


@pytest.mark.usefixtures("public_loopback")
def test_an_allowed_network_may_be_redirected_to(
    registry: FakeRegistry, cdn: FakeCDN, private: FakeCDN, start_mirror: MirrorFactory
) -> None:
    digest = _model(registry, seed=173)
    cdn.redirect = private.url
    mirror = start_mirror(allow_networks=f"{PRIVATE}/32")
    with httpx.Client(base_url=mirror.url(), timeout=30) as client:
        got = client.get(f"/v2/library/ssrf/blobs/{digest}")
    assert got.status_code == 200 and got.content == cdn.blobs[digest].path.read_bytes()
    assert private.requests


def test_a_name_is_resolved_once_per_connection_and_that_address_is_used(
    registry: FakeRegistry, cdn: FakeCDN
) -> None:
    """DNS rebinding: cdn.test answers public once, then private (a service on the CDN's port)."""
    blob = registry.add_blob(write_blob(registry.directory, 100_000, seed=174))
    cdn_port = int(cdn.url.rsplit(":", 1)[1])
    rebound = FakeCDN()
    server = ServerThread(rebound, host=PRIVATE, port=cdn_port).start()
    lookups: list[str] = []

    async def rebinding(host: str) -> list[IPAddress]:
        if host != "cdn.test":
            return await system_resolve(host)
        lookups.append(host)
        return [ipaddress.ip_address("127.0.0.1" if len(lookups) == 1 else PRIVATE)]

    location = BlobLocation(f"http://cdn.test:{cdn_port}/objects/{blob.digest}?t={cdn.issue_token()}")

    async def fetch() -> bytes:
        upstream = Upstream(registry.url, resolve=rebinding, is_public=loopback_is_public)
        try:
            async with upstream.open_range(location, 0, blob.size, blob.size) as body:
                return b"".join([piece async for piece in body])
        finally:
            await upstream.aclose()

    try:
        assert asyncio.run(fetch()) == blob.path.read_bytes()  # connected to the address it checked
        with pytest.raises(UpstreamInvalid, match="cdn.test"):
            asyncio.run(fetch())  # a new connection resolves again, and is refused
    finally:
        server.stop()
    assert lookups == ["cdn.test", "cdn.test"]  # one lookup per connection: none behind the check's back
    assert rebound.requests == []


def test_tls_is_verified_against_the_host_name_while_connecting_to_the_checked_address(
    registry: FakeRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = registry.add_model("library/tls", "1", [write_blob(registry.directory, 1000, seed=175)])
    ca = CertificateAuthority(tmp_path / "ca")
    ca.init()
    cert, key = ca.mint("registry.test")
    (tmp_path / "leaf.pem").write_bytes(cert)
    (tmp_path / "leaf.key").write_bytes(key)
    server = ServerThread(registry, ssl_certfile=str(tmp_path / "leaf.pem"),
                          ssl_keyfile=str(tmp_path / "leaf.key")).start()
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.cert_path))  # the CA httpx's default context trusts

    async def fetch(host: str) -> bytes:
        upstream = Upstream(f"https://{host}:{server.port}", pinned={host: "127.0.0.1"}, connect_timeout=5)
        try:
            return (await upstream.get_manifest(Name.parse("library/tls"), "1", {})).data
        finally:
            await upstream.aclose()

    try:
        assert asyncio.run(fetch("registry.test")) == manifest
        with pytest.raises(UpstreamUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            asyncio.run(fetch("other.test"))  # same address, a name the certificate does not carry
    finally:
        server.stop()


def test_the_registry_name_rebound_to_a_private_address_is_refused_too(registry: FakeRegistry) -> None:
    """A public registry's own name, answering a private address on a later lookup: the registry
    is not exempt once it was judged public."""
    registry_port = int(registry.url.rsplit(":", 1)[1])
    rebound = FakeRegistry(registry.cdn, registry.cdn_url, registry.directory)
    rebound.manifests = registry.manifests
    server = ServerThread(rebound, host=PRIVATE, port=registry_port).start()
    manifest = registry.add_model("library/rebind", "1", [write_blob(registry.directory, 1000, seed=176)])
    lookups: list[str] = []

    async def rebinding(host: str) -> list[IPAddress]:
        lookups.append(host)
        return [ipaddress.ip_address("127.0.0.1" if len(lookups) <= 2 else PRIVATE)]

    async def twice() -> bytes:
        upstream = Upstream(f"http://registry.test:{registry_port}", resolve=rebinding, is_public=loopback_is_public)
        try:
            first = (await upstream.get_manifest(Name.parse("library/rebind"), "1", {})).data
            await upstream.aclose()  # the next request opens a new connection, looked up anew
            with pytest.raises(UpstreamInvalid, match=r"registry\.test \(127\.0\.0\.2\)"):
                await upstream.get_manifest(Name.parse("library/rebind"), "1", {})
            return first
        finally:
            await upstream.aclose()

    try:
        assert asyncio.run(twice()) == manifest
    finally:
        server.stop()
    assert rebound.requests == []
