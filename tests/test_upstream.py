"""The upstream client without sockets (httpx.MockTransport): redirects, SSRF rules."""

from __future__ import annotations

import asyncio
import ipaddress

import httpx
import pytest

from mirror.errors import UpstreamInvalid
from mirror.names import Digest, Name
from mirror.upstream import Upstream

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
    with pytest.raises(UpstreamInvalid, match="refused to connect to"):
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
