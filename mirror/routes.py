"""The registry's URL patterns and their handlers.

Path parameters are parsed into ``Name``, ``Digest`` and tags before anything
else happens, so nothing unvalidated reaches the store. Push methods are
registered on purpose, to answer UNSUPPORTED rather than a bare 404.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

from cachetools import LRUCache
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from .blobs import BlobBody, BlobService
from .errors import RouteUnknown, Unsupported
from .manifest import Manifest
from .manifests import ManifestService
from .names import Digest, Name, parse_tag, respelled
from .ranges import parse_range
from .replicas import PEER_HEADER
from .responses import BlobResponse, HeadResponse, blob_headers, is_ollama, manifest_response

if TYPE_CHECKING:
    from .app import Registry

log = logging.getLogger("mirror.proxy")
_CDN_BLOB = re.compile(r"sha256[:/-](?:[0-9a-f]{2}/)?([0-9a-f]{64})\b")
ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}
# On /v2/: the registry host this mirror's named mode mirrors. A mirror whose upstream is this one
# stores its tags under that host too, so a tier of mirrors keeps the registry's names.
REGISTRY_HEADER = "Ollama-Mirror-Registry"


def _read_only(request: Request) -> None:
    if request.method not in ("GET", "HEAD"):
        raise Unsupported(f"{request.method} is not supported: this is a read-only mirror")


def _registry(request: Request) -> Registry:
    """The registry this request is for, by its Host: the proxy and DNS modes keep the real name."""
    return request.app.state.mirror.registry_for_request(request.headers.get("host", ""))  # type: ignore[no-any-return]


async def v2_root(request: Request) -> Response:
    _read_only(request)
    return JSONResponse({}, headers={**API_VERSION, REGISTRY_HEADER: _registry(request).host})


async def manifest(request: Request) -> Response:
    _read_only(request)
    name = Name.parse(request.path_params["name"])
    reference = request.path_params["reference"]
    service: ManifestService = _registry(request).manifests
    head = request.method == "HEAD"
    if Digest.is_digest(reference):
        found = await service.by_digest(Digest.parse(reference))
        cache = "hit"
    else:
        answer = await service.by_tag(name, parse_tag(reference), request.headers)
        found, cache = answer.manifest, answer.cache
        if not head and is_ollama(request.headers):  # it shows a manifest's error, never a blob's
            await _registry(request).blobs.check_room(found.parsed)
        if getattr(request.state, "via", "") == "proxy":
            _warn_if_blobs_bypass_the_proxy(f"{_registry(request).host}/{name}:{reference}", found.parsed)
    request.state.cache = cache
    return manifest_response(found, head, cache)


_bypass_warned: LRUCache[str, bool] = LRUCache(maxsize=4096)


def _warn_if_blobs_bypass_the_proxy(model: str, parsed: Manifest) -> None:
    """Current Ollama fetches a tensor model's blobs (x/transfer) with a transport that has no
    proxy: only the manifest passes an ``HTTPS_PROXY`` mirror, the blobs go straight to the
    registry and its CDN, uncached. The mirror cannot see that traffic; it says so, once per model."""
    if model in _bypass_warned or not any(layer.kind == "tensor" for layer in parsed.layers):
        return
    _bypass_warned[model] = True
    log.warning("proxy bypassed model=%s reason=a tensor model: Ollama fetches its blobs without HTTPS_PROXY, "
                "straight from the registry, so they are not cached; DNS mode (--tls-listen with the LAN's DNS "
                "pointing the registry at the mirror) covers them", model)


async def blob(request: Request) -> Response | BlobResponse:
    _read_only(request)
    name = Name.parse(request.path_params["name"])
    digest = Digest.parse(request.path_params["digest"])
    service: BlobService = _registry(request).blobs
    if request.method == "HEAD":
        return HeadResponse(blob_headers(str(digest), await service.size(name, digest)))
    redirect = await _to_bucket(request, digest)
    if redirect is not None:
        return redirect
    from_peer = PEER_HEADER in request.headers
    body = await service.open(name, digest, from_peer)  # a cold blob's fill starts here
    if from_peer:
        body.source = "peer"  # another replica's fill: not a client served (metrics count those)
    if _tensor_resolve(request):
        body.close()
        request.state.cache = body.source
        location = _location(request, respelled(request.url.netloc, request.url.scheme), direct=True)
        return RedirectResponse(location, 307)
    return _blob_response(request, body)


async def _to_bucket(request: Request, digest: Digest) -> Response | None:
    """With --blob-redirect, a resolving GET (no Range) of a blob the bucket holds gets a 307 to a
    presigned URL of it: Ollama's clients send their parts there, so the bytes come from the object
    store and this replica's NIC is not the ceiling. HEAD and manifests stay here."""
    replicas = request.app.state.mirror.engine.replicas
    if (replicas is None or not replicas.settings.blob_redirect or "range" in request.headers
            or "direct" in request.query_params):
        return None
    url = await replicas.presigned(digest)
    if url is None:
        return None
    request.state.cache = "bucket"
    return RedirectResponse(url, 307)


def _tensor_resolve(request: Request) -> bool:
    """Ollama's tensor downloader (x/transfer) reads the whole body of its first GET of a blob,
    only to learn where to fetch it, then GETs the blob again: answered with the body, each blob
    would cross the LAN twice, and on a cold cache the first GET would last the whole fill. A 307
    to another host (as it compares them: the same server, spelled otherwise) is taken as the
    answer at once, without a body."""
    return ("range" not in request.headers and "direct" not in request.query_params
            and request.headers.get("user-agent", "").startswith("ollama-transfer/"))


def _location(request: Request, netloc: str | None = None, direct: bool = False) -> str:
    """This request's URL (on ``netloc`` if given), carrying access control's capability for the
    blob path: clients fetch there without their credentials, as from a presigned CDN URL.
    ``direct`` marks the URL a tensor client was sent to: a GET of it is the fetch, answered with bytes."""
    grant = getattr(request.state, "grant", None)
    query = "&".join(part for part in (f"grant={grant}" if grant else "", "direct=1" if direct else "") if part)
    url = request.url.replace(query=query)
    return str(url.replace(netloc=netloc) if netloc else url)


def _blob_response(request: Request, body: BlobBody) -> BlobResponse:
    try:
        header = request.headers.get("range")
        spans = parse_range(header, body.size) if header is not None else None
    except Exception:
        body.close()
        raise
    # Ollama's resolving GET reads only the head, for its Location: it gets it at once, cold or not.
    resolving = spans is None and request.headers.get("user-agent", "").startswith("ollama/")
    return BlobResponse(body, spans, _location(request), hold_head=not resolving)


async def _cdn_blob(request: Request, registry: Registry, digest: Digest) -> Response | BlobResponse:
    """A CDN URL a registry handed out, reached through the proxy: served from the cache,
    so not even a client holding such a URL bypasses it."""
    body = await registry.blobs.open_local(digest)
    if request.method == "HEAD":
        body.close()
        return HeadResponse(blob_headers(str(digest), body.size))
    return _blob_response(request, body)


async def push(request: Request) -> Response:
    raise Unsupported("pushing is not supported: this is a read-only mirror")


async def unknown(request: Request) -> Response | BlobResponse:
    registry = request.app.state.mirror.cdn_registry(request.headers.get("host", ""))
    match = _CDN_BLOB.search(request.url.path) if registry is not None else None
    if match is not None and request.method in ("GET", "HEAD"):
        return await _cdn_blob(request, registry, Digest(match[1]))
    raise RouteUnknown(f"no such endpoint: {request.method} {request.url.path}")


# The registry's routes, matched first: they carry nearly every request, and Starlette tries
# routes in order. ``fallback`` goes last, after every other route of the app.
routes = [
    Route("/v2/{name:path}/manifests/{reference:path}", manifest, methods=ALL_METHODS),
    Route("/v2/{name:path}/blobs/uploads/{rest:path}", push, methods=ALL_METHODS),
    Route("/v2/{name:path}/blobs/{digest:path}", blob, methods=ALL_METHODS),
    Route("/v2/", v2_root, methods=ALL_METHODS),
]
fallback = Route("/{path:path}", unknown, methods=ALL_METHODS)
