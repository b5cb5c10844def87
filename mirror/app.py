"""create_app(): the composition root. Builds the parts, wires them, owns their lifetimes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

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


def create_app(settings: Settings) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        layout = Layout(settings.cache_dir, registry_host(settings.upstream))
        store = BlobStore(layout)
        meta = Metadata(layout.meta)
        upstream = Upstream(
            settings.upstream, connect_timeout=settings.connect_timeout, stall_timeout=settings.stall_timeout
        )
        removed = await asyncio.to_thread(store.sweep, meta.fills_in_progress())
        if removed:
            log.info("staging swept files=%d reason=no saved progress", len(removed))
        engine = FillEngine(store, meta, upstream, settings)
        app.state.layout = layout
        app.state.engine = engine
        app.state.manifests = ManifestService(store, meta, upstream, settings)
        app.state.blobs = BlobService(store, meta, upstream, engine, settings)
        app.state.pulls = PullService(app.state.manifests, app.state.blobs, layout.host)
        log.info(
            "mirror ready cache=%s upstream=%s%s", settings.cache_dir, settings.upstream,
            " offline" if settings.offline else "",
        )
        try:
            yield
        finally:
            await engine.close()
            await upstream.aclose()
            meta.close()

    return Starlette(
        routes=routes,
        middleware=[Middleware(AccessLog)],
        exception_handlers={MirrorError: _mirror_error, HTTPException: _http_error, Exception: _bug},
        lifespan=lifespan,
    )
