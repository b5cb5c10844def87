"""What a Go ``http.Client`` puts on the wire, over httpx, and the record the stand-ins return.

Go sends few headers: ``Host``, ``User-Agent``, the ones the caller set, and
``Accept-Encoding: gzip`` on a GET without ``Range`` (which it then decodes).
It follows 301/302/303/307/308 as its ``CheckRedirect`` says, copying the first
request's headers (``Authorization`` only while every hop stays on that host
name or a subdomain) and adding ``Referer``. httpx would send its own defaults
and strip credentials when the port changes, so requests are built here.
"""

from __future__ import annotations

import ipaddress
import ssl
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import httpcore
import httpx

from mirror.upstream import PolicyTransport

GO_USER_AGENT = "Go-http-client/1.1"  # net/http: the User-Agent when the caller sets none
REDIRECTS = (301, 302, 303, 307, 308)  # net/http: client.go redirectBehavior
SENSITIVE = ("authorization", "www-authenticate", "cookie", "cookie2")


class RedirectStop(Exception):
    """CheckRedirect returned an error: ``Client.Do`` fails with it."""


# A CheckRedirect: (next URL, requests made so far) -> True follows, False hands back the redirect
# (http.ErrUseLastResponse), raising RedirectStop fails the request.
CheckRedirect = Callable[[str, int], bool]


def go_default_redirects(url: str, via: int) -> bool:
    """net/http: client.go defaultCheckRedirect."""
    if via >= 10:
        raise RedirectStop("stopped after 10 redirects")
    return True


def never_follow(url: str, via: int) -> bool:
    """x/transfer/transfer.go: defaultClient's CheckRedirect (http.ErrUseLastResponse)."""
    return False


def host_port(url: str) -> str:
    """Go's ``url.URL.Host``: the host and the port as written, no user info."""
    return urlsplit(url).netloc.rpartition("@")[2]


def hostname(url: str) -> str:
    """Go's ``url.URL.Hostname()``: the port ignored."""
    return urlsplit(url).hostname or ""


def _domain_or_subdomain(sub: str, parent: str) -> bool:
    """net/http: client.go isDomainOrSubdomain, as used by shouldCopyHeaderOnRedirect."""
    return sub == parent or sub.endswith("." + parent)


@dataclass
class WireRequest:
    """One request as sent, one per redirect hop."""

    at: float  # seconds since the pull began
    method: str
    url: str
    headers: dict[str, str]  # lower-case names, as sent (Host left out)
    digest: str | None = None  # the blob it was for; None for manifests and tokens
    status: int | None = None  # None: no response (connection failed)

    @property
    def range(self) -> str | None:
        return self.headers.get("range")


@dataclass
class Event:
    """Something the real client would log: a retry, a stall, a cancellation, the final error."""

    at: float
    kind: str  # "stalled", "too slow", "retry", "interrupted", "resolve retry", "error"
    digest: str | None
    detail: str = ""


@dataclass
class BlobRecord:
    digest: str
    size: int
    cache_hit: bool = False  # already on disk: nothing requested
    received: int = 0  # body bytes read from the network for this blob, every attempt and resolve included
    resolve_bytes: int = 0  # of which bodies of resolving GETs (read and discarded)
    direct_url: str | None = None
    started: float | None = None
    resolved: float | None = None
    finished: float | None = None


@dataclass
class PullResult:
    """What a stand-in did: the manifest bytes, per blob records, every request, and what went wrong."""

    manifest: bytes | None = None
    blobs: dict[str, BlobRecord] = field(default_factory=dict)
    requests: list[WireRequest] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    error: str | None = None
    elapsed: float = 0.0

    def blob_requests(self, digest: str) -> list[WireRequest]:
        return [r for r in self.requests if r.digest == digest]

    def events_of(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.kind == kind]


class GoDialer(httpcore.AsyncNetworkBackend):
    """How Go's net.Dial reaches a host: names in ``hosts`` first (the simulated machine's
    /etc/hosts, or a LAN DNS override), case-insensitively; an IPv4-mapped IPv6 address over IPv4
    (net: TCPAddr.family says AF_INET for it)."""

    def __init__(self, hosts: dict[str, str] | None = None) -> None:
        self._hosts = {name.lower(): ip for name, ip in (hosts or {}).items()}
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                          socket_options: Any = None) -> httpcore.AsyncNetworkStream:
        host = self._hosts.get(host.lower().rstrip("."), host)
        try:
            mapped = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            mapped = None
        if isinstance(mapped, ipaddress.IPv6Address) and mapped.ipv4_mapped is not None:
            host = str(mapped.ipv4_mapped)
        return await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Any = None) -> httpcore.AsyncNetworkStream:
        return await self._inner.connect_unix_socket(path, timeout, socket_options)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class GoHttp:
    """One Go http.Client (its CheckRedirect given per call) recording every hop into ``result``."""

    def __init__(self, result: PullResult, *, connect_timeout: float | None, hosts: dict[str, str] | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.result = result
        self.began = time.monotonic()
        # Go's clients have no read timeout; DefaultTransport dials for at most 30 s.
        timeout = httpx.Timeout(None, connect=connect_timeout)
        transport = PolicyTransport(GoDialer(hosts), max_connections=1000, ssl_context=ssl_context)
        self.client = httpx.AsyncClient(timeout=timeout, transport=transport)

    def now(self) -> float:
        return time.monotonic() - self.began

    def event(self, kind: str, digest: str | None, detail: str = "") -> None:
        self.result.events.append(Event(self.now(), kind, digest, detail))

    async def aclose(self) -> None:
        await self.client.aclose()

    async def open(self, method: str, url: str, headers: dict[str, str], *, check_redirect: CheckRedirect,
                   digest: str | None = None) -> httpx.Response:
        """net/http: Client.Do. The response is streaming: the caller reads or closes it."""
        first_host = hostname(url)
        strip = False
        via = 0
        sent = dict(headers)
        while True:
            response = await self._send(method, url, sent, digest)
            location = response.headers.get("location")
            if response.status_code not in REDIRECTS or not location:
                return response
            target = urljoin(url, location)
            try:
                follow = check_redirect(target, via + 1)
            except RedirectStop:
                await response.aclose()
                raise
            if not follow:
                return response
            await response.aclose()
            if response.status_code in (301, 302, 303) and method not in ("GET", "HEAD"):
                method = "GET"
            # client.go: once a hop leaves the first host name, credentials stay stripped (Go 1.24+).
            strip = strip or not _domain_or_subdomain(hostname(target), first_host)
            sent = {k: v for k, v in headers.items() if not (strip and k.lower() in SENSITIVE)}
            sent["Referer"] = url
            url = target
            via += 1

    async def _send(self, method: str, url: str, headers: dict[str, str], digest: str | None) -> httpx.Response:
        headers = dict(headers)
        if method == "GET" and not any(k.lower() in ("range", "accept-encoding") for k in headers):
            headers["Accept-Encoding"] = "gzip"  # net/http: transport.go requestedGzip
        headers.setdefault("User-Agent", GO_USER_AGENT)
        record = WireRequest(self.now(), method, url, {k.lower(): v for k, v in headers.items()}, digest)
        self.result.requests.append(record)
        request = httpx.Request(method, url, headers=headers)
        response = await self.client.send(request, stream=True)
        record.status = response.status_code
        return response


def body_chunks(response: httpx.Response) -> AsyncIterator[bytes]:
    """The body as Go's caller reads it: decoded only when the transport asked for gzip itself."""
    asked_gzip = response.request.headers.get("accept-encoding") == "gzip" and "range" not in response.request.headers
    return response.aiter_bytes() if asked_gzip else response.aiter_raw()


def describe(exc: BaseException | None) -> str:
    """An error as a pull reports it: its message, and the kind of a network error."""
    if exc is None:
        return "no error"
    text = str(exc)
    if isinstance(exc, httpx.HTTPError):
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text or type(exc).__name__
