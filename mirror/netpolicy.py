"""Where upstream connections are made: name resolution, ``--resolve`` pins, the private-address
rule, and the socket itself, in one place, for every hop (registry, token realm, CDN, redirects).

The rule: a registry on the LAN or on loopback may send us anywhere near. When the registry
resolves to public addresses (judged once, at its first lookup), every connection must go to a
public address or one in ``--allow-networks``: to its CDN, its token realm, any redirect, and
the registry's own name too, so neither a public registry nor a name rebound to a private
address later can point the mirror at a service on its LAN (SSRF). Addresses the admin pinned
with ``--resolve`` are always allowed.

The address checked is the address connected to: a name is resolved once per connection, so a
second lookup that answers differently (DNS rebinding) is never used.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

import httpcore
from cachetools import LRUCache

from .errors import UpstreamInvalid

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str], Awaitable[list[IPAddress]]]
Classifier = Callable[[IPAddress], bool]

# httpcore asks for 64 KiB per socket read; at hundreds of MB/s over several connections a fill
# then spends its time in per-read overhead (docs/performance.md: 1 MiB reads go 1.6x faster).
READ_SIZE = 1 << 20


async def system_resolve(host: str) -> list[IPAddress]:
    """The addresses a host name resolves to (none when it does not resolve)."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return []
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))


def is_global(ip: IPAddress) -> bool:
    return ip.is_global


class NetPolicy:
    """Which addresses a connection to a host may use. ``resolve`` and ``is_public`` are
    injectable so tests can call one loopback address public and another private."""

    def __init__(
        self,
        registry_host: str,
        *,
        allow_networks: Sequence[IPNetwork] = (),
        pinned: Mapping[str, str] | None = None,
        resolve: Resolver | None = None,
        is_public: Classifier | None = None,
    ) -> None:
        self.registry_host = registry_host.lower()
        self._allow_networks = tuple(allow_networks)
        self._pinned = {host.lower(): ipaddress.ip_address(ip) for host, ip in (pinned or {}).items()}
        self._resolve = resolve or system_resolve
        self._is_public = is_public or is_global
        self._registry_public: bool | None = None
        self._refused: LRUCache[str, bool] = LRUCache(maxsize=1024)  # hosts already logged

    async def addresses(self, host: str) -> list[IPAddress]:
        """The addresses to connect to for ``host``, every one of them allowed; raises
        ``UpstreamInvalid`` when the host resolves to an address the rule refuses."""
        host = host.lower()
        found = await self._lookup(host)
        if host in self._pinned or not await self._public_registry():
            return found
        for ip in found:
            if not self._allowed(ip):
                self._refuse(host, ip)
        return found

    async def _lookup(self, host: str) -> list[IPAddress]:
        """An address literal is itself, a pinned name its pin; any other name is resolved."""
        pinned = self._pinned.get(host)
        if pinned is not None:
            return [pinned]
        try:
            return [ipaddress.ip_address(host)]
        except ValueError:
            return await self._resolve(host)

    async def _public_registry(self) -> bool:
        """Whether the registry resolves to public addresses; remembered once it resolves at all
        (a registry that does not resolve yet counts as public: the strict side)."""
        if self._registry_public is None:
            found = await self._lookup(self.registry_host)
            if not found:
                return True
            self._registry_public = all(self._is_public(ip) for ip in found)
        return self._registry_public

    def _allowed(self, ip: IPAddress) -> bool:
        return self._is_public(ip) or any(ip in net for net in self._allow_networks)

    def _refuse(self, host: str, ip: IPAddress) -> None:
        if host not in self._refused:
            self._refused[host] = True
            log.warning("upstream refused host=%s address=%s registry=%s reason=private address",
                        host, ip, self.registry_host)
        raise UpstreamInvalid(
            f"refused to connect to {host} ({ip}): the public registry {self.registry_host} may not send the "
            "mirror to private addresses; allow the network with --allow-networks if intended")


class PolicyBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, with every TCP connection decided by a ``NetPolicy``: the
    host name is resolved and checked here, and the socket goes to exactly that address.

    TLS is unaffected: httpcore starts it on our stream with the origin's host name as
    ``server_hostname``, so the certificate is still verified against the name."""

    def __init__(self, policy: NetPolicy, inner: httpcore.AsyncNetworkBackend | None = None,
                 read_size: int = READ_SIZE) -> None:
        self.policy = policy
        self._inner = inner or httpcore.AnyIOBackend()
        self._read_size = read_size

    async def connect_tcp(
        self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                addresses = await self.policy.addresses(host)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"resolving {host} took longer than {timeout} s") from None
        if not addresses:
            raise httpcore.ConnectError(f"{host} does not resolve to any address")
        error: Exception | None = None
        for ip in addresses:
            try:
                stream = await self._inner.connect_tcp(str(ip), port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
                continue
            return LargeReads(stream, self._read_size)
        assert error is not None
        raise error

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class LargeReads(httpcore.AsyncNetworkStream):
    """A stream that reads up to ``read_size`` bytes whatever smaller size httpcore asks for.
    Safe: httpcore hands every read to h11's ``receive_data``, which buffers any amount."""

    def __init__(self, inner: httpcore.AsyncNetworkStream, read_size: int) -> None:
        self._inner = inner
        self._read_size = read_size

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._inner.read(max(max_bytes, self._read_size), timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore.AsyncNetworkStream:
        return LargeReads(await self._inner.start_tls(ssl_context, server_hostname, timeout), self._read_size)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)
