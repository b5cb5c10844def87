"""The upstream registry and its CDN, over httpx. The only module that imports httpx.

Above this module nothing sees an httpx exception or a status code: failures
become ``UpstreamError`` subclasses (see ``errors.py``), picked by what the
caller should do next (retry, resolve again, give up, pass through).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import ipaddress
import logging
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import httpcore
import httpx
from cachetools import TTLCache

from . import __version__
from .errors import (
    UpstreamError,
    UpstreamInvalid,
    UpstreamRefused,
    UpstreamStalled,
    UpstreamUnavailable,
    UpstreamUrlExpired,
)
from .layout import registry_host
from .names import Digest, Name

log = logging.getLogger(__name__)

# httpcore reads 64 KiB per socket read; a fill runs several connections at hundreds of MB/s
# and spends its time in per-read overhead at that size (perf-notes.md: 1 MiB reads go 1.6x faster).
httpcore.AsyncHTTP11Connection.READ_NUM_BYTES = 1 << 20

MAX_MANIFEST_BYTES = 4 << 20  # real manifests are a few KiB; anything near this is hostile
MAX_REDIRECTS = 5
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


@dataclass(frozen=True)
class BlobLocation:
    """Where a blob's bytes are fetched from, resolved once per fill."""

    url: str
    headers: Mapping[str, str] = field(default_factory=dict)  # credentials, only for the registry's own host
    version: int = 0  # bumped on every resolve, so concurrent re-resolves collapse into one


@dataclass(frozen=True)
class Manifest:
    data: bytes
    content_type: str


class Throttle:
    """A bandwidth cap shared by every fill: each piece read waits for its turn in virtual time,
    with a quarter second of slack so the connections' reads interleave smoothly."""

    SLACK = 0.25

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._next = time.monotonic()

    async def take(self, n: int) -> None:
        now = time.monotonic()
        self._next = max(self._next, now - self.SLACK) + n / self.rate
        delay = self._next - now - self.SLACK
        if delay > 0:
            await asyncio.sleep(delay)


class Upstream:
    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float = 10.0,
        stall_timeout: float = 20.0,
        max_connections: int = 64,
        transport: httpx.AsyncBaseTransport | None = None,
        allow_networks: Sequence[IPNetwork] = (),
        resolve: Resolver | None = None,
        pinned: Mapping[str, str] | None = None,
        throttle: Throttle | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._throttle = throttle
        self._origin = _origin(self.base_url)
        self._allow_networks = tuple(allow_networks)
        self._pinned = dict(pinned or {})
        self._resolve = _pinned_resolver(self._pinned, resolve or _resolve)
        self._public: bool | None = None  # whether the upstream itself resolves to public addresses
        self.cdn_hosts: set[str] = set()  # hosts (host:port unless default) the registry redirected blobs to
        if transport is None and self._pinned:
            transport = _pinned_transport(self._pinned, max_connections)
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(connect_timeout, read=stall_timeout, write=connect_timeout, pool=None),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=16),
            headers={"User-Agent": f"ollama-mirror/{__version__}"},
            transport=transport,
        )
        self._tokens: TTLCache[str, str] = TTLCache(maxsize=1024, ttl=240)

    async def aclose(self) -> None:
        await self.client.aclose()

    # -- registry requests, with token challenges --------------------------------

    async def _registry_send(
        self, method: str, url: str, name: Name, headers: Mapping[str, str], *, follow: bool = False
    ) -> httpx.Response:
        """Send to the registry (streamed); answer one Bearer challenge with an anonymous token."""
        for attempt in range(2):
            sent = dict(headers)
            token = self._tokens.get(str(name))
            if token:
                sent["Authorization"] = f"Bearer {token}"
            request = self.client.build_request(method, url, headers=sent)
            with _mapped(url):
                response = await self.client.send(request, stream=True, follow_redirects=follow)
            challenge = response.headers.get("WWW-Authenticate", "")
            if response.status_code != 401 or attempt or not challenge.lower().startswith("bearer"):
                return response
            await response.aclose()
            self._tokens[str(name)] = await self._fetch_token(challenge, url)
        raise AssertionError("unreachable")

    async def _fetch_token(self, challenge: str, url: str) -> str:
        params = dict(_CHALLENGE_PARAM.findall(challenge))
        realm = params.pop("realm", "")
        if urlsplit(realm).scheme not in ("http", "https"):
            raise UpstreamInvalid(f"token challenge from {url} names no usable realm")
        with _mapped(realm):
            response = await self.client.get(realm, params=params)
        if response.status_code != 200:
            raise UpstreamRefused(f"token request to {realm} answered {response.status_code}", response.status_code)
        try:
            body = response.json()
            return str(body.get("token") or body["access_token"])
        except (ValueError, KeyError, AttributeError):
            raise UpstreamInvalid(f"token response from {realm} has no token") from None

    # -- manifests ---------------------------------------------------------------

    async def get_manifest(self, name: Name, tag: str, headers: Mapping[str, str]) -> Manifest:
        """The raw manifest bytes for a tag. ``headers``: User-Agent and Accept from the client."""
        url = f"{self.base_url}/v2/{name}/manifests/{tag}"
        response = await self._registry_send("GET", url, name, headers)
        try:
            if response.status_code != 200:
                body = await _read_capped(response, 64 << 10, url)
                raise _status_error(response, url, body)
            data = await _read_capped(response, MAX_MANIFEST_BYTES, url)
            return Manifest(data, response.headers.get("Content-Type", ""))
        finally:
            await response.aclose()

    # -- blobs -------------------------------------------------------------------

    def blob_url(self, name: Name, digest: Digest) -> str:
        return f"{self.base_url}/v2/{name}/blobs/{digest}"

    async def blob_size(self, name: Name, digest: Digest) -> int:
        """The blob's size without downloading it: HEAD, or a one-byte range if HEAD will not say."""
        url = self.blob_url(name, digest)
        response = await self._registry_send("HEAD", url, name, {}, follow=True)
        await response.aclose()
        length = response.headers.get("Content-Length", "")
        if response.status_code == 200 and length.isdigit():
            return int(length)
        if response.status_code == 404:
            raise _status_error(response, url, b"")
        location = await self.resolve_blob(name, digest)
        async with self.open_range(location, 0, 1, size=None) as stream:
            async for _ in stream:
                pass
            return stream.total

    async def resolve_blob(self, name: Name, digest: Digest, version: int = 0) -> BlobLocation:
        """Follow the registry's redirect to the CDN URL, without reading the body.

        As Ollama does: a redirect to the registry's own host is followed, one to
        another host is where the bytes are; a 200 names its source in Location.
        """
        url = self.blob_url(name, digest)
        for _ in range(MAX_REDIRECTS):
            response = await self._registry_send("GET", url, name, {"Accept-Encoding": "identity"})
            await response.aclose()
            if response.status_code in (301, 302, 303, 307, 308):
                target = _absolute(url, response.headers.get("Location", ""))
                if _origin(target) != self._origin:
                    await self._check_redirect(target)
                    self.cdn_hosts.add(registry_host(target))
                    return BlobLocation(target, version=version + 1)
                url = target
            elif response.status_code == 200:
                target = _absolute(url, response.headers.get("Location", "") or url)
                return BlobLocation(target, self._credentials(name, target), version + 1)
            else:
                raise _status_error(response, url, b"")
        raise UpstreamInvalid(f"more than {MAX_REDIRECTS} redirects resolving {url}")

    async def _check_redirect(self, target: str) -> None:
        """A public registry that redirects to a private, loopback or link-local address is
        refused (SSRF), unless the admin allowed that network."""
        if self._public is None:
            self._public = all(ip.is_global for ip in await self._resolve(self._origin[1]))
        if not self._public:
            return  # a registry on the LAN (or the tests' on loopback) may redirect anywhere near
        host = urlsplit(target).hostname or ""
        for ip in await self._resolve(host):
            if not ip.is_global and not any(ip in net for net in self._allow_networks):
                raise UpstreamInvalid(
                    f"refused redirect from {self._origin[1]} to {host} ({ip}): a public registry does not "
                    "send clients to private addresses; allow the network with --allow-networks if intended")

    def _credentials(self, name: Name, url: str) -> dict[str, str]:
        token = self._tokens.get(str(name))
        if token and _origin(url) == self._origin:
            return {"Authorization": f"Bearer {token}"}
        return {}

    @contextlib.asynccontextmanager
    async def open_range(
        self, location: BlobLocation, start: int, stop: int, size: int | None
    ) -> AsyncIterator[RangeStream]:
        """Stream bytes ``[start, stop)`` of the blob at ``location``.

        A 206 must start where we asked; a 200 (server ignores Range) is read
        from 0 and the bytes before ``start`` are dropped, so what the caller
        gets is always exactly the bytes from ``start`` on.
        """
        headers = {"Range": f"bytes={start}-{stop - 1}", "Accept-Encoding": "identity", **location.headers}
        request = self.client.build_request("GET", location.url, headers=headers)
        with _mapped(location.url):
            response = await self.client.send(request, stream=True, follow_redirects=True)
        try:
            yield RangeStream(response, start, stop, size, location.url, self._throttle)
        finally:
            await response.aclose()


class RangeStream:
    """The body of one range response, as an async iterator of byte strings."""

    def __init__(self, response: httpx.Response, start: int, stop: int, size: int | None, url: str,
                 throttle: Throttle | None = None) -> None:
        self.url = _redact(url)
        self._throttle = throttle
        status = response.status_code
        if status in (401, 403, 404, 410):
            raise UpstreamUrlExpired(f"CDN answered {status} for {self.url}")
        if status == 200:
            self.skip = start
            total = response.headers.get("Content-Length", "")
            self.total = int(total) if total.isdigit() else (size or 0)
            log.warning("upstream ignored Range url=%s start=%d: reading from 0", self.url, start)
        elif status == 206:
            self.skip = 0
            first, total = _parse_content_range(response.headers.get("Content-Range", ""))
            if first != start:
                raise UpstreamInvalid(f"CDN sent bytes from {first}, not {start}, for {self.url}")
            self.total = total
        else:
            raise _status_error(response, self.url, b"")
        if size is not None and self.total != size:
            raise UpstreamInvalid(f"CDN says the blob has {self.total} bytes, expected {size}: {self.url}")
        self._response = response
        self._remaining = stop - start

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _mapped(self.url):
            async for piece in self._response.aiter_raw():
                if self.skip:
                    drop = min(self.skip, len(piece))
                    piece, self.skip = piece[drop:], self.skip - drop
                if piece:
                    self._remaining -= len(piece)
                    if self._throttle is not None:
                        await self._throttle.take(len(piece))
                    yield piece
        if self._remaining > 0:
            raise UpstreamUnavailable(f"CDN closed the body {self._remaining} bytes early: {self.url}")


@contextlib.contextmanager
def _mapped(url: str) -> Iterator[None]:
    """Translate httpx's exceptions into ours, most specific first."""
    url = _redact(url)
    try:
        yield
    except UpstreamError:
        raise
    except (httpx.ReadTimeout, httpx.WriteTimeout) as exc:
        raise UpstreamStalled(f"no bytes from {url} in time") from exc
    except httpx.TimeoutException as exc:
        raise UpstreamUnavailable(f"timed out connecting to {url}") from exc
    except httpx.UnsupportedProtocol as exc:
        raise UpstreamInvalid(f"unsupported URL scheme: {url}") from exc
    except (httpx.TransportError, httpx.DecodingError) as exc:
        raise UpstreamUnavailable(f"{type(exc).__name__} from {url}: {exc}") from exc


def _status_error(response: httpx.Response, url: str, body: bytes) -> UpstreamError:
    status = response.status_code
    if status == 429 or status >= 500:
        return UpstreamUnavailable(f"upstream answered {status} for {_redact(url)}", _retry_after(response))
    return UpstreamRefused(
        f"upstream answered {status} for {_redact(url)}", status, body, response.headers.get("Content-Type", "")
    )


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), if any."""
    value = response.headers.get("Retry-After", "").strip()
    if value.isdigit():
        return float(value)
    try:
        return max(email.utils.parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
    except (TypeError, ValueError):
        return None


async def _read_capped(response: httpx.Response, limit: int, url: str) -> bytes:
    data = bytearray()
    with _mapped(url):
        async for piece in response.aiter_bytes():
            data += piece
            if len(data) > limit:
                raise UpstreamInvalid(f"response from {_redact(url)} exceeds {limit} bytes")
    return bytes(data)


def _parse_content_range(value: str) -> tuple[int, int]:
    match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", value.strip())
    if not match:
        raise UpstreamInvalid(f"unreadable Content-Range {value[:80]!r}")
    return int(match[1]), int(match[3])


def _absolute(base: str, location: str) -> str:
    target = urljoin(base, location)
    if urlsplit(target).scheme not in ("http", "https"):
        raise UpstreamInvalid(f"redirect to a non-http URL from {_redact(base)}")
    return target


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str], Awaitable[list[IPAddress]]]


async def _resolve(host: str) -> list[IPAddress]:
    """The addresses a host name resolves to (none when it does not resolve: the request fails later)."""
    try:
        ip = ipaddress.ip_address(host)
        return [ip]
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return []
    return [ipaddress.ip_address(info[4][0]) for info in infos]


def _pinned_resolver(pinned: Mapping[str, str], resolve: Resolver) -> Resolver:
    async def resolve_pinned(host: str) -> list[IPAddress]:
        if host.lower() in pinned:
            return [ipaddress.ip_address(pinned[host.lower()])]
        return await resolve(host)

    return resolve_pinned


class _PinnedBackend(httpcore.AsyncNetworkBackend):
    """Connects to the admin's address for a pinned host; TLS still checks the certificate
    against the host's name. With a LAN DNS override pointing the registry at us, this is
    how we reach the real one without looping to ourselves."""

    def __init__(self, pinned: Mapping[str, str], inner: httpcore.AsyncNetworkBackend) -> None:
        self._pinned, self._inner = pinned, inner

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None, socket_options: Any = None) -> httpcore.AsyncNetworkStream:
        return await self._inner.connect_tcp(self._pinned.get(host.lower(), host), port, timeout,
                                             local_address, socket_options)

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Any = None) -> httpcore.AsyncNetworkStream:
        return await self._inner.connect_unix_socket(path, timeout, socket_options)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def _pinned_transport(pinned: Mapping[str, str], max_connections: int) -> httpx.AsyncHTTPTransport:
    transport = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=max_connections,
                                                             max_keepalive_connections=16))
    pool = transport._pool  # httpx has no resolver option; its pool takes a network backend
    pool._network_backend = _PinnedBackend(pinned, pool._network_backend)
    return transport


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


def _redact(url: str) -> str:
    """A URL fit for a log line: presigned query strings are credentials."""
    return url.split("?", 1)[0]
