"""HTTP responses: blobs (full, ranged, multi-range), manifests, registry errors.

The only place where an error class becomes a status code. A ``BlobResponse``
streams a ``BlobBody`` and never opens a path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import Iterable, Mapping

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from . import errors, zerocopy
from .blobs import BlobBody
from .errors import MirrorError, UpstreamRefused
from .manifests import CachedManifest
from .ranges import Span

log = logging.getLogger("mirror.access")
OLLAMA_AGENTS = ("ollama/", "Go-http-client/")  # Ollama's registry requests; its blob parts (Go's default)

STATUS = {
    errors.RangeNotSatisfiable: 416,
    errors.Unsupported: 405,
    errors.RouteUnknown: 404,
    errors.Unauthorized: 401,
    errors.Denied: 403,
    errors.ManifestUnknown: 404,
    errors.BlobUnknown: 404,
    errors.ClientError: 400,
    errors.UpstreamStalled: 504,
    errors.UpstreamError: 502,
    errors.DigestMismatch: 502,
    errors.FillFailed: 502,
    errors.StoreFull: 507,
    errors.StoreUnavailable: 503,
}


def status_for(exc: MirrorError) -> int:
    for kind in type(exc).__mro__:
        if kind in STATUS:
            return STATUS[kind]
    return 500


def registry_error(exc: MirrorError, headers: Mapping[str, str] | None = None, *, ollama: bool = False,
                   named: bool = True) -> Response:
    """``{"errors": [{"code", "message", "detail"}]}`` with the status the error calls for; for
    Ollama's own requests (``ollama``), the message alone (see ``_for_ollama``). ``named``: the
    client named the mirror itself, not a mirrored registry (proxy and DNS modes)."""
    if isinstance(exc, UpstreamRefused) and 400 <= exc.status < 500:
        return _passed_through(exc)
    status = status_for(exc)
    extra = dict(headers or {})
    if isinstance(exc, errors.RangeNotSatisfiable):
        extra["Content-Range"] = f"bytes */{exc.size}"  # RFC 9110 section 15.5.17
    if ollama:
        return _for_ollama(exc, status, named, extra)
    return error_response(status, exc.code, str(exc), extra)


def is_ollama(headers: Mapping[str, str]) -> bool:
    """A request from Ollama itself: its User-Agent on registry requests, Go's default on blob parts."""
    return headers.get("user-agent", "").startswith(OLLAMA_AGENTS)


def _for_ollama(exc: MirrorError, status: int, named: bool, headers: dict[str, str]) -> Response:
    """The error as Ollama shows it: it prints a registry error's body as it is, after the status
    (``Error: pull model manifest: 502: <body>``, server/images.go makeRequestWithRetry), so the body
    is our one sentence, not JSON. A 404's body it never prints ("file does not exist"): a manifest
    named through the mirror (``mirror.lan/library/x``) that it cannot give answers 400, so the
    reason reaches the user. Through the proxy and DNS modes it stays 404, as the registry answers
    (Ollama 0.32 offers a ``:cloud`` model on that answer)."""
    if status == 404 and named and isinstance(exc, errors.ManifestUnknown):
        status = 400
    return Response(str(exc), status, headers=headers, media_type="text/plain; charset=utf-8")


def error_response(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> Response:
    body = json.dumps({"errors": [{"code": code, "message": message, "detail": None}]})
    return Response(body, status, headers=dict(headers or {}), media_type="application/json")


def _passed_through(exc: UpstreamRefused) -> Response:
    """Upstream's own 4xx (412: a newer Ollama is needed), so the client shows its message."""
    try:
        json.loads(exc.body)
        is_json = bool(exc.body)
    except ValueError:
        is_json = False
    if is_json:
        return Response(exc.body, exc.status, media_type="application/json")
    if exc.status == 412:  # the registry's text for "a newer Ollama is needed": Ollama prints it as it came
        return Response(exc.body, exc.status, media_type=exc.content_type or "text/plain; charset=utf-8")
    message = exc.body.decode("utf-8", "replace").strip()[:1000] or str(exc)
    return error_response(exc.status, "DENIED" if exc.status in (401, 403) else "UPSTREAM_ERROR", message)


def manifest_response(manifest: CachedManifest, head: bool, cache: str) -> Response:
    headers = {
        "Docker-Content-Digest": str(manifest.digest),
        "Content-Length": str(len(manifest.data)),
        "ETag": f'"{manifest.digest}"',
        "X-Cache": cache.upper(),
    }
    if cache == "stale":
        headers["Warning"] = '110 - "Response is Stale"'
    return Response(b"" if head else manifest.data, 200, headers=headers, media_type=manifest.media_type)


def blob_headers(digest: str, size: int) -> dict[str, str]:
    return {
        "Content-Length": str(size),
        "Content-Type": "application/octet-stream",
        "Docker-Content-Digest": digest,
        "Accept-Ranges": "bytes",
        "ETag": f'"{digest}"',
        "Cache-Control": "public, max-age=31536000, immutable",
    }


class BlobResponse:
    """A blob body for ``spans`` (None: the whole blob), streamed as bytes land.

    A 200 carries ``Location``: the Ollama client reads only that header to
    learn where to send its Range requests, then hangs up. A client hanging up
    stops only its own reader, never the fill behind it.
    """

    # Read size decides throughput (64 KiB serves 5x slower than 4 MiB, docs/performance.md), and each
    # stream holds about two reads (ours, and the transport's copy of what the socket did not take
    # yet). So the streams share a budget: one stream reads 4 MiB at a time, sixteen read 1 MiB.
    max_read = 4 << 20
    min_read = 256 << 10
    budget = 16 << 20
    active = 0  # blob bodies streaming now, in this process
    head_wait = 600.0  # at most, the head waits this long for a cold blob's first byte (the fill fails sooner)

    def __init__(self, body: BlobBody, spans: list[Span] | None, location: str, hold_head: bool = True) -> None:
        self.body = body
        self.spans = spans
        self.location = location
        self.hold_head = hold_head  # False: the client reads only the head (Ollama's resolving GET)
        self.boundary = secrets.token_hex(16)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope.setdefault("state", {})["cache"] = self.body.source
        status, headers, length, parts = self._plan()
        headers["Content-Length"] = str(length)
        try:
            # A fill that fails before its first byte answers an error status, not a 200 whose
            # body is cut: some clients (urllib's read(n)) take a cut body for a clean end.
            if self.hold_head:
                await self.body.ready(parts[0][1].start if parts else 0, self.head_wait)
        except BaseException:
            self.body.close()
            raise
        await send({"type": "http.response.start", "status": status, "headers": _encode(headers)})
        BlobResponse.active += 1
        zero_copy = zerocopy.EXTENSION in scope.get("extensions", {})
        body = asyncio.ensure_future(self._send_body(send, parts, zero_copy))
        watcher = asyncio.ensure_future(_until_disconnect(receive))
        try:
            await asyncio.wait({body, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (body, watcher):
                task.cancel()
            await asyncio.gather(body, watcher, return_exceptions=True)
            BlobResponse.active -= 1
            self.body.close()
        if self.spans is None and _user_agent(scope).startswith("ollama/") and (
                body.cancelled() or body.exception() is None):
            # Ollama's resolving GET: it reads the headers (Location) and hangs up, every pull, every blob.
            scope["state"]["outcome"], scope["state"]["log_level"] = "resolved", logging.DEBUG
        elif body.cancelled():
            scope["state"]["outcome"] = "client gone"  # it left before the end of what it asked for
        elif isinstance(body.exception(), MirrorError):
            # Cut short of its Content-Length (uvicorn closes the connection): never a clean end.
            scope["state"]["outcome"] = f"aborted: {body.exception()}"
            log.warning("blob aborted digest=%s reason=%s", self.body.digest.short, body.exception())
        elif body.exception() is not None:
            raise body.exception()  # type: ignore[misc]  # a bug: let the server log it

    def _plan(self) -> tuple[int, dict[str, str], int, list[tuple[bytes, Span]]]:
        """Status, headers, body length, and (part header, span) pairs to send."""
        size = self.body.size
        headers = blob_headers(str(self.body.digest), size)
        if self.spans is None:
            headers["Location"] = self.location
            return 200, headers, size, [(b"", Span(0, size))]
        if len(self.spans) == 1:
            span = self.spans[0]
            headers["Content-Range"] = span.content_range(size)
            return 206, headers, span.length, [(b"", span)]
        headers["Content-Type"] = f"multipart/byteranges; boundary={self.boundary}"
        parts = [(self._part_header(span, size), span) for span in self.spans]
        closing = f"\r\n--{self.boundary}--\r\n".encode()
        length = sum(len(h) + s.length for h, s in parts) + len(closing)
        return 206, headers, length, parts + [(closing, Span(0, 0))]

    def _read_size(self) -> int:
        return max(self.min_read, min(self.max_read, self.budget // max(BlobResponse.active, 1)))

    def _part_header(self, span: Span, size: int) -> bytes:
        return (
            f"\r\n--{self.boundary}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Range: {span.content_range(size)}\r\n\r\n"
        ).encode()

    async def _send_body(self, send: Send, parts: Iterable[tuple[bytes, Span]], zero_copy: bool) -> None:
        for header, span in parts:
            if header:
                await send({"type": "http.response.body", "body": header, "more_body": True})
            if span.length and zero_copy:
                await self._sendfile_span(send, span)
            elif span.length:
                iterator = self.body.iter_span(span.start, span.stop, self._read_size)
                async with contextlib.aclosing(iterator) as chunks:
                    async for data in chunks:
                        await send({"type": "http.response.body", "body": data, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _sendfile_span(self, send: Send, span: Span) -> None:
        """The kernel copies: a stored blob in one call, a filling one run by run as it lands."""
        async with contextlib.aclosing(self.body.extents(span.start, span.stop, _unlimited)) as extents:
            async for file, position, length in extents:
                await send({"type": zerocopy.EXTENSION, "file": file, "offset": position, "count": length,
                            "more_body": True})


class HeadResponse(Response):
    """Headers only, with the real Content-Length of what a GET would send."""

    def __init__(self, headers: Mapping[str, str], status: int = 200) -> None:
        super().__init__(b"", status, headers=dict(headers))


def _unlimited() -> int:
    return 1 << 62


def _user_agent(scope: Scope) -> str:
    for key, value in scope.get("headers", []):
        if key == b"user-agent":
            return value.decode("latin-1")
    return ""


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _encode(headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
