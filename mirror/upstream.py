"""The upstream registry and its CDN, over httpx. The only module that imports httpx.

Above this module nothing sees an httpx exception or a status code: failures
become ``UpstreamError`` subclasses (see ``errors.py``), picked by what the
caller should do next (retry, resolve again, give up, pass through).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import os
import re
import ssl
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import httpcore
import httpx
from cachetools import TTLCache

from . import __version__
from .errors import (
    RangeIgnored,
    UpstreamError,
    UpstreamInvalid,
    UpstreamRefused,
    UpstreamStalled,
    UpstreamUnavailable,
    UpstreamUrlExpired,
)
from .health import Health
from .layout import registry_host
from .names import Digest, Name
from .netpolicy import Classifier, IPNetwork, NetPolicy, PolicyBackend, Resolver

log = logging.getLogger(__name__)

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
    """The registry and its CDN. Registry requests (manifests, tokens, HEADs, blob resolves)
    and blob bytes have a connection pool each, so a manifest never queues behind fills."""

    REGISTRY_CONNECTIONS = 16
    ANSWER_TIMEOUT = 10.0  # seconds a registry request waits for a byte (a hung registry: 504 sooner)

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float = 10.0,
        stall_timeout: float = 20.0,
        max_connections: int = 64,
        pool_timeout: float | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        allow_networks: Sequence[IPNetwork] = (),
        resolve: Resolver | None = None,
        is_public: Classifier | None = None,
        pinned: Mapping[str, str] | None = None,
        throttle: Throttle | None = None,
        health: Health | None = None,
        headers: Mapping[str, str] | None = None,
        token: str | None = None,
    ) -> None:
        """``max_connections``: blob range requests, all fills together. A registry request waits
        at most ``pool_timeout`` (default: ``connect_timeout``) for one of its own connections, and
        at most ``ANSWER_TIMEOUT`` (or ``stall_timeout`` if shorter) for each byte of the answer:
        a manifest is a few KiB, and a registry that says nothing for that long is hung."""
        self.base_url = base_url.rstrip("/")
        self.health = health or Health(registry_host(self.base_url), self.base_url)  # told of every registry request
        self._throttle = throttle
        sent = {"User-Agent": f"ollama-mirror/{__version__}", **(headers or {})}  # on every request
        self._origin = _origin(self.base_url)
        self._policy = NetPolicy(self._origin[1], allow_networks=allow_networks, pinned=pinned,
                                 resolve=resolve, is_public=is_public)
        self.cdn_hosts: set[str] = set()  # hosts (host:port unless default) the registry redirected blobs to
        self._make_registry_client = lambda: self._client(
            transport or PolicyTransport(PolicyBackend(self._policy), max_connections=self.REGISTRY_CONNECTIONS),
            connect_timeout, min(stall_timeout, self.ANSWER_TIMEOUT),
            connect_timeout if pool_timeout is None else pool_timeout, sent)
        self._make_blob_client = lambda: self._client(  # fills wait their turn for a connection
            transport or PolicyTransport(PolicyBackend(self._policy), max_connections=max_connections),
            connect_timeout, stall_timeout, None, sent)
        # Connections belong to the event loop they were made on: fills run on a loop of their own.
        self._by_loop: dict[asyncio.AbstractEventLoop, tuple[httpx.AsyncClient, httpx.AsyncClient]] = {}
        self._tokens: TTLCache[str, str] = TTLCache(maxsize=1024, ttl=240)
        self._tokens_lock = threading.Lock()  # both loops' threads read and write the tokens
        self._static_token = token  # sent to this origin alone when no challenge gave another

    @staticmethod
    def _client(transport: httpx.AsyncBaseTransport, connect: float, stall: float,
                pool: float | None, headers: Mapping[str, str]) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            timeout=httpx.Timeout(connect, read=stall, write=connect, pool=pool),
            headers=headers,
            transport=transport,
        )

    def _clients(self) -> tuple[httpx.AsyncClient, httpx.AsyncClient]:
        """This event loop's registry client and blob client, made on first use."""
        loop = asyncio.get_running_loop()
        clients = self._by_loop.get(loop)
        if clients is None:
            clients = self._by_loop[loop] = (self._make_registry_client(), self._make_blob_client())
        return clients

    @property
    def client(self) -> httpx.AsyncClient:
        """The registry client of the running event loop."""
        return self._clients()[0]

    async def aclose(self) -> None:
        """Close the running loop's clients (each loop closes its own)."""
        clients = self._by_loop.pop(asyncio.get_running_loop(), None)
        for client in clients or ():
            await client.aclose()

    def _token(self, name: Name) -> str | None:
        with self._tokens_lock:
            return self._tokens.get(str(name)) or self._static_token

    # -- registry requests, with token challenges --------------------------------

    async def _registry_send(
        self, method: str, url: str, name: Name, headers: Mapping[str, str], *, follow: bool = False
    ) -> httpx.Response:
        """Send to the registry (streamed); answer one Bearer challenge with an anonymous token."""
        for attempt in range(2):
            sent = dict(headers)
            token = self._token(name)
            if token:
                sent["Authorization"] = f"Bearer {token}"
            response = await self._send(self.client.build_request(method, url, headers=sent), url, follow=follow)
            challenge = response.headers.get("WWW-Authenticate", "")
            if response.status_code != 401 or attempt or not challenge.lower().startswith("bearer"):
                return response
            await response.aclose()
            token = await self._fetch_token(challenge, url)
            with self._tokens_lock:
                self._tokens[str(name)] = token
        raise AssertionError("unreachable")

    async def _send(self, request: httpx.Request, url: str, *, follow: bool = False) -> httpx.Response:
        """Send a registry request (streamed), and tell ``health`` how it went: any answer below 500
        means the registry is reachable; no connection, no answer, a 5xx or a 429 that it is not."""
        started = time.monotonic()
        try:
            with _mapped(url):
                response = await self.client.send(request, stream=True, follow_redirects=follow)
        except (UpstreamUnavailable, UpstreamStalled) as exc:
            self.health.failed(exc)
            raise
        except UpstreamError as exc:  # reached, but refused (netpolicy) or nonsense: said, not "down"
            self.health.met(exc)
            raise
        if response.status_code >= 500 or response.status_code == 429:
            self.health.failed(_status_error(response, url, b""))
        else:
            self.health.reached(time.monotonic() - started)
        return response

    async def probe(self) -> None:
        """Ask the registry's ``/v2/`` once, for ``health`` (registry.ollama.ai answers it 404,
        which is as good an answer as any: the registry is there)."""
        url = f"{self.base_url}/v2/"
        with contextlib.suppress(UpstreamError):
            response = await self._send(self.client.build_request("GET", url), url)
            await response.aclose()

    async def _fetch_token(self, challenge: str, url: str) -> str:
        params = dict(_CHALLENGE_PARAM.findall(challenge))
        realm = params.pop("realm", "")
        if urlsplit(realm).scheme not in ("http", "https"):
            raise UpstreamInvalid(f"token challenge from {url} names no usable realm")
        response = await self._send(self.client.build_request("GET", realm, params=params), realm)
        try:
            data = await _read_capped(response, 64 << 10, realm)
        finally:
            await response.aclose()
        if response.status_code != 200:
            raise UpstreamRefused(f"token request to {realm} answered {response.status_code}", response.status_code)
        try:
            body = json.loads(data)
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
        async with self._range(self.client, location, 0, 1, None, accept_whole=True) as stream:
            if stream.partial:  # one byte: read, so the connection is reused; a whole body is not read
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
                    await self._policy.addresses(urlsplit(target).hostname or "")  # refused before it is a CDN host
                    self.cdn_hosts.add(registry_host(target))
                    return BlobLocation(target, version=version + 1)
                url = target
            elif response.status_code == 200:
                target = _absolute(url, response.headers.get("Location", "") or url)
                return BlobLocation(target, self._credentials(name, target), version + 1)
            else:
                raise _status_error(response, url, b"")
        raise UpstreamInvalid(f"more than {MAX_REDIRECTS} redirects resolving {url}")

    def _credentials(self, name: Name, url: str) -> dict[str, str]:
        token = self._token(name)
        if token and _origin(url) == self._origin:
            return {"Authorization": f"Bearer {token}"}
        return {}

    def open_range(
        self, location: BlobLocation, start: int, stop: int, size: int | None, *, accept_whole: bool = False
    ) -> contextlib.AbstractAsyncContextManager[RangeStream]:
        """Stream bytes ``[start, stop)`` of the blob at ``location``, on the blob connections.

        A 206 must start where we asked. A 200 (the server ignores Range) for anything but
        the whole blob raises ``RangeIgnored`` before its body is read, unless ``accept_whole``:
        then it is read from 0 and the bytes before ``start`` are dropped, so what the caller
        gets is always exactly the bytes from ``start`` on.
        """
        return self._range(self._clients()[1], location, start, stop, size, accept_whole=accept_whole)

    @contextlib.asynccontextmanager
    async def _range(
        self, client: httpx.AsyncClient, location: BlobLocation, start: int, stop: int, size: int | None,
        *, accept_whole: bool,
    ) -> AsyncIterator[RangeStream]:
        headers = {"Range": f"bytes={start}-{stop - 1}", "Accept-Encoding": "identity", **location.headers}
        request = client.build_request("GET", location.url, headers=headers)
        with _mapped(location.url):
            response = await client.send(request, stream=True, follow_redirects=True)
        try:
            yield RangeStream(response, start, stop, size, location.url, self._throttle, accept_whole=accept_whole)
        finally:
            await response.aclose()


class RangeStream:
    """The body of one range response, as an async iterator of byte strings."""

    def __init__(self, response: httpx.Response, start: int, stop: int, size: int | None, url: str,
                 throttle: Throttle | None = None, *, accept_whole: bool = False) -> None:
        self.url = _redact(url)
        self._throttle = throttle
        status = response.status_code
        self.partial = status == 206
        if status in (401, 403, 404, 410):
            raise UpstreamUrlExpired(f"CDN answered {status} for {self.url}")
        if status == 200:
            length = response.headers.get("Content-Length", "")
            self.total = int(length) if length.isdigit() else (size or 0)
            self.skip = start
        elif status == 206:
            self.skip = 0
            first, self.total = _parse_content_range(response.headers.get("Content-Range", ""))
            if first != start:
                raise UpstreamInvalid(f"CDN sent bytes from {first}, not {start}, for {self.url}")
        else:
            raise _status_error(response, self.url, b"")
        if size is not None and self.total != size:
            raise UpstreamInvalid(f"CDN says the blob has {self.total} bytes, expected {size}: {self.url}")
        if status == 200 and not (accept_whole or (start == 0 and stop == self.total)):
            raise RangeIgnored(f"CDN ignored Range bytes={start}-{stop - 1} and sent all {self.total} bytes "
                               f"of {self.url}")
        if self.skip:
            log.warning("upstream ignored Range url=%s start=%d: reading from 0", self.url, start)
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
    except httpx.PoolTimeout as exc:
        raise UpstreamUnavailable(f"no upstream connection came free in time for {url}: "
                                  "too many registry requests at once, try again", cause="busy") from exc
    except httpx.UnsupportedProtocol as exc:
        raise UpstreamInvalid(f"unsupported URL scheme: {url}") from exc
    except (httpx.TransportError, httpx.DecodingError) as exc:
        raise _failure(exc, url) from exc


def _failure(exc: httpx.HTTPError, url: str) -> UpstreamError:
    """What a person reads when a connection or a read failed: one sentence with the cause and the
    fix. The cause is also a word (``detail["cause"]``) for the health log's once-a-minute limit."""
    parts = urlsplit(url)
    host, name = parts.netloc, parts.hostname or parts.netloc
    if isinstance(exc, (httpx.ReadTimeout, httpx.WriteTimeout)):
        return UpstreamStalled(
            f"{host} accepted the mirror's connection but sent nothing for {_seconds(exc, 'read')} s: it is "
            "overloaded or hung; try again later, or point --upstream at a registry that answers",
            cause="no-answer", url=url)
    if isinstance(exc, httpx.TimeoutException):
        if _in_chain(exc, ssl.SSLError):
            return UpstreamUnavailable(
                f"the mirror's TLS handshake with {host} did not finish within {_seconds(exc, 'connect')} s: "
                "check that it speaks https on that port", cause="tls-timeout", url=url)
        return UpstreamUnavailable(
            f"the mirror cannot connect to {host}: no answer within {_seconds(exc, 'connect')} s; check the "
            "network path to it (firewall, routing, --resolve)", cause="connect-timeout", url=url)
    reason = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ConnectError) and "does not resolve" in reason:  # netpolicy.PolicyBackend's words
        return UpstreamUnavailable(
            f"the mirror cannot resolve {name}: its DNS does not know the name; check the name in --upstream "
            f"(or --registry) and the mirror's DNS, or pin an address with --resolve {name}=IP",
            cause="dns", url=url)
    if isinstance(exc, httpx.ConnectError) and _in_chain(exc, ssl.SSLError):
        return UpstreamUnavailable(
            f"the mirror's TLS handshake with {host} failed ({reason}): check the name in --upstream (or "
            "--registry), or let the mirror trust the registry's CA with SSL_CERT_FILE", cause="tls", url=url)
    if isinstance(exc, httpx.ConnectError) and _in_chain(exc, ConnectionRefusedError):
        return UpstreamUnavailable(
            f"the mirror cannot connect to {host}: connection refused; check that the registry is up and that "
            "--upstream (or --registry) names the right host and port", cause="refused", url=url)
    detail = _os_reason(exc) or f"{type(exc).__name__}: {reason}"
    return UpstreamUnavailable(f"the connection from the mirror to {host} failed ({detail}): check the network "
                               "path to it and try again", cause="network", url=url)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what caused it, outermost first (httpx wraps httpcore wraps the OSError)."""
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return
        yield seen
        seen = seen.__cause__ or seen.__context__


def _in_chain(exc: BaseException, kind: type[BaseException]) -> bool:
    return any(isinstance(cause, kind) for cause in _chain(exc))


def _os_reason(exc: BaseException) -> str:
    """The system's words for the errno behind ``exc`` ("no route to host"), if there is one."""
    errnos = (cause.errno for cause in _chain(exc) if isinstance(cause, OSError) and cause.errno)
    return next((os.strerror(number).lower() for number in errnos), "")


def _seconds(exc: httpx.TimeoutException, which: str) -> str:
    """The timeout that ran out, as the request was sent with it ("?" when unknown)."""
    try:
        value = exc.request.extensions.get("timeout", {}).get(which)
    except RuntimeError:  # no request attached
        value = None
    return f"{value:g}" if isinstance(value, int | float) else "?"


def _status_error(response: httpx.Response, url: str, body: bytes) -> UpstreamError:
    status = response.status_code
    if status == 429 or status >= 500:
        host = urlsplit(url).netloc
        what = "429 (too many requests)" if status == 429 else str(status)
        return UpstreamUnavailable(f"{host} answered the mirror with {what}: the registry is failing or busy; "
                                   "try again later", _retry_after(response), cause=f"http-{status}", url=_redact(url),
                                   status=status)
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


class PolicyTransport(httpx.AsyncBaseTransport):
    """httpx over an httpcore pool of our own, whose every connection is made by a
    ``PolicyBackend``: built from public constructors, as httpx's own transport is."""

    def __init__(self, backend: httpcore.AsyncNetworkBackend, *, max_connections: int,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context or httpx.create_ssl_context(),  # certifi, or SSL_CERT_FILE/DIR
            max_connections=max_connections,
            max_keepalive_connections=min(max_connections, 16),
            keepalive_expiry=5.0,
            network_backend=backend,
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.AsyncByteStream)
        url = request.url
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        with _httpcore_mapped(request):
            response = await self._pool.handle_async_request(core_request)
        return httpx.Response(response.status, headers=response.headers, extensions=response.extensions,
                              stream=_CoreBody(response, request))

    async def aclose(self) -> None:
        await self._pool.aclose()


class _CoreBody(httpx.AsyncByteStream):
    def __init__(self, response: httpcore.Response, request: httpx.Request) -> None:
        self._response, self._request = response, request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _httpcore_mapped(self._request):
            async for piece in self._response.aiter_stream():
                yield piece

    async def aclose(self) -> None:
        with _httpcore_mapped(self._request):
            await self._response.aclose()


# httpcore's exceptions and httpx's of the same meaning, most specific first.
_HTTPCORE_TO_HTTPX: tuple[tuple[type[Exception], type[httpx.TransportError]], ...] = (
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.ProtocolError, httpx.ProtocolError),
)


@contextlib.contextmanager
def _httpcore_mapped(request: httpx.Request) -> Iterator[None]:
    try:
        yield
    except tuple(core for core, _ in _HTTPCORE_TO_HTTPX) as exc:
        mapped = next(ours for core, ours in _HTTPCORE_TO_HTTPX if isinstance(exc, core))
        raise mapped(str(exc) or type(exc).__name__, request=request) from exc


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


def _redact(url: str) -> str:
    """A URL fit for a log line: presigned query strings are credentials."""
    return url.split("?", 1)[0]
