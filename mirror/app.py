"""create_app(): the composition root. Builds the parts, wires them, owns their lifetimes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response

from .blobs import BlobService
from .config import Settings
from .errors import MirrorError
from .fill import FillEngine
from .layout import Layout, registry_host
from .logs import AccessLog
from .manifests import ManifestService
from .metadata import Metadata
from .pulls import PullService
from .responses import error_response, registry_error
from .routes import routes
from .store import BlobStore
from .upstream import Upstream

log = logging.getLogger("mirror")


async def _mirror_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, MirrorError)
    return registry_error(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, "UNSUPPORTED" if exc.status_code == 405 else "NOT_FOUND", exc.detail)


async def _bug(request: Request, exc: Exception) -> Response:
    log.error("bug while serving %s %s: %r", request.method, request.url.path, exc, exc_info=exc)
    return error_response(500, "UNKNOWN", "internal error in the mirror; see its log")


@dataclass
class Mirror:
    """The mirror's parts, wired: what the server and the CLI commands share."""

    settings: Settings
    layout: Layout
    store: BlobStore
    meta: Metadata
    upstream: Upstream
    engine: FillEngine
    manifests: ManifestService
    blobs: BlobService
    pulls: PullService


@contextlib.asynccontextmanager
async def open_mirror(settings: Settings) -> AsyncIterator[Mirror]:
    """Build the parts; on exit, fills save their progress and everything is closed."""
    layout = Layout(settings.cache_dir, registry_host(settings.upstream))
    store = BlobStore(layout)
    meta = Metadata(layout.meta)
    upstream = Upstream(settings.upstream, connect_timeout=settings.connect_timeout,
                        stall_timeout=settings.stall_timeout, allow_networks=settings.allowed_networks)
    removed = await asyncio.to_thread(store.sweep, meta.fills_in_progress())
    if removed:
        log.info("staging swept files=%d reason=no saved progress", len(removed))
    engine = FillEngine(store, meta, upstream, settings)
    manifests = ManifestService(store, meta, upstream, settings)
    blobs = BlobService(store, meta, upstream, engine, settings)
    pulls = PullService(manifests, blobs, layout.host)
    try:
        yield Mirror(settings, layout, store, meta, upstream, engine, manifests, blobs, pulls)
    finally:
        await engine.close()
        await upstream.aclose()
        meta.close()


def create_app(settings: Settings) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with open_mirror(settings) as mirror:
            state = app.state
            state.layout, state.engine, state.manifests = mirror.layout, mirror.engine, mirror.manifests
            state.blobs, state.pulls = mirror.blobs, mirror.pulls
            log.info("mirror ready cache=%s upstream=%s%s", settings.cache_dir, settings.upstream,
                     " offline" if settings.offline else "")
            yield

    return Starlette(
        routes=routes,
        middleware=[Middleware(AccessLog)],
        exception_handlers={MirrorError: _mirror_error, HTTPException: _http_error, Exception: _bug},
        lifespan=lifespan,
    )
