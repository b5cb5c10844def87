"""create_app(): the composition root. Builds the parts, wires them, owns their lifetimes."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from . import ollama_api, status
from .access import AccessControl, ManagePolicy, load_keys
from .blobs import BlobService
from .config import DEFAULT_UPSTREAM, Settings
from .errors import MirrorError, NameInvalid
from .eviction import Evictor
from .fill import FillEngine
from .health import Health, upstream_cause
from .layout import Layout, cache_problem, registry_host
from .logs import AccessLog
from .manifests import ManifestService
from .metadata import Metadata
from .metrics import Metrics
from .models import DEFAULT_REGISTRY, CachedModel
from .names import Digest, is_registry_host
from .pulls import PullService
from .replicas import Replicas
from .responses import error_response, is_ollama, registry_error
from .routes import REGISTRY_HEADER, fallback
from .routes import routes as registry_routes
from .store import BlobStore, Removed
from .upstream import Throttle, Upstream

log = logging.getLogger("mirror")


async def _mirror_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, MirrorError)
    mirror = getattr(request.app.state, "mirror", None)
    failure = upstream_cause(exc)
    if failure is not None and mirror is not None:
        mirror.registry_for_request(request.headers.get("host", "")).upstream.health.met(failure)
    return registry_error(exc, ollama=is_ollama(request.headers), named=_named_mode(mirror, request))


def _named_mode(mirror: Mirror | None, request: Request) -> bool:
    """Whether the client named the mirror itself (``mirror.lan/library/x``), not a mirrored
    registry (the proxy and DNS modes, where the client believes it talks to that registry)."""
    if mirror is None:
        return True
    host = request.headers.get("host", "").lower()
    return host not in mirror.registries and re.sub(r":\d+$", "", host) not in mirror.registries


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, "UNSUPPORTED" if exc.status_code == 405 else "NOT_FOUND", exc.detail)


async def _bug(request: Request, exc: Exception) -> Response:
    log.error("bug while serving %s %s: %r", request.method, request.url.path, exc, exc_info=exc)
    return error_response(500, "UNKNOWN", "internal error in the mirror; see its log")


@dataclass
class Registry:
    """One mirrored registry host: where it is filled from, and its services. The store is shared
    (blobs are content-addressed); its tags live under ``manifests/<host>/``."""

    host: str
    upstream: Upstream
    manifests: ManifestService
    blobs: BlobService
    pulls: PullService


@dataclass
class Mirror:
    """The mirror's parts, wired: what the server and the CLI commands share."""

    settings: Settings
    layout: Layout
    store: BlobStore
    meta: Metadata
    engine: FillEngine
    registries: dict[str, Registry]
    evictor: Evictor | None = None

    def forget(self, model: CachedModel) -> None:
        """A tag removed from disk is dropped from memory too, so it is not served from there."""
        for registry in self.registries.values():
            registry.manifests.forget(model.name, model.tag)

    def busy(self) -> set[Digest]:
        """The blobs this process is serving: what it tells the store's deletion path, which
        learns of fills (this process's and others') from their staging locks."""
        return {digest for registry in self.registries.values() for digest in registry.blobs.serving}

    async def remove(self, tags: list[CachedModel], by: str) -> Removed:
        """Remove tags and the blobs no longer in use, then drop the tags from memory at once
        (other processes on the cache notice the store's generation within a second)."""
        removed = await asyncio.to_thread(self.store.remove, tags, (), self.busy(), self.meta, by)
        for model in tags:
            self.forget(model)
        return removed

    @functools.cached_property
    def default(self) -> Registry:
        """The registry named-mode requests and host-less model names mean (asked per request)."""
        return self.registries[self.settings.default_host]

    def registry(self, host: str | None) -> Registry:
        """The registry for a model name's host (``None``: the default); another host is refused."""
        if host is None or (host == DEFAULT_REGISTRY and host not in self.registries):
            return self.default
        found = self.registries.get(host.lower())
        if found is None:
            raise NameInvalid(f"this mirror does not mirror {host}; it mirrors {', '.join(sorted(self.registries))}")
        return found

    def answers_for(self, host: str) -> bool:
        """Whether TLS for ``host`` is ours to terminate: a mirrored registry, or a CDN one redirected to."""
        return host in self.registries or self.cdn_registry(host) is not None

    def cdn_registry(self, host: str) -> Registry | None:
        """The registry that redirected blob GETs to this CDN host, if any did."""
        host = re.sub(r":443$", "", host.lower())
        return next((r for r in self.registries.values() if host in r.upstream.cdn_hosts), None)

    def registry_for_request(self, host_header: str) -> Registry:
        """A request for a mirrored host (through the proxy or a DNS override) goes to that registry;
        any other Host (the mirror's own name) means the default."""
        host = host_header.lower()  # any case: a tensor client is sent to the same host respelled
        return self.registries.get(host) or self.registries.get(re.sub(r":\d+$", "", host)) or self.default


@contextlib.asynccontextmanager
async def open_mirror(settings: Settings) -> AsyncIterator[Mirror]:
    """Build the parts; on exit, fills save their progress and everything is closed."""
    settings = await _following_a_mirror(settings)
    layout = Layout(settings.cache_dir, settings.default_host)
    store = BlobStore(layout)
    meta = Metadata(layout.meta)
    removed = await asyncio.to_thread(store.sweep, meta.fills_in_progress())
    if removed:
        log.info("staging swept files=%d reason=no saved progress", len(removed))
    replicas = await _replicas(settings)
    engine = FillEngine(store, meta, settings, replicas)
    throttle = Throttle(settings.rate_limit) if settings.rate_limit else None
    registries = {host: _registry(host, url, store, meta, engine, settings, throttle)
                  for host, url in settings.registry_urls.items()}
    mirror = Mirror(settings, layout, store, meta, engine, registries)
    eviction_task = _start_eviction(mirror)
    heartbeat = asyncio.get_running_loop().create_task(
        replicas.heartbeat(store, lambda tags: mirror.remove(tags, by="bucket")), name="heartbeat") if replicas else None
    sync = asyncio.get_running_loop().create_task(asyncio.to_thread(replicas.sync_up, store)) if replicas else None
    try:
        yield mirror
    finally:
        if replicas is not None:
            replicas.stopping.set()
        for task in (eviction_task, heartbeat, sync):
            if task is not None:
                task.cancel()
        await engine.close()
        for registry in registries.values():
            await registry.upstream.aclose()
        meta.close()


async def _replicas(settings: Settings) -> Replicas | None:
    """With --store: the shared bucket, checked once, so a wrong bucket or key stops the start with
    one line saying which."""
    if not settings.store:
        return None
    replicas = Replicas(settings)
    await asyncio.to_thread(replicas.start)
    log.info("bucket ready store=%s endpoint=%s replica=%s advertise=%s blob_redirect=%s", settings.store,
             replicas.bucket.endpoint_url, replicas.id, replicas.url, settings.blob_redirect)
    return replicas


TIER_PROBE_TIMEOUT = 5.0  # seconds the start waits to learn whether its upstream is another mirror


async def _following_a_mirror(settings: Settings) -> Settings:
    """Asks the upstream's ``/v2/`` once whether it is another ollama-mirror, and which registry it
    mirrors: then this mirror stores and names tags under that registry's host (as ``--registry
    HOST=<upstream>`` says explicitly), so a tier of mirrors keeps ``registry.ollama.ai/library/...``."""
    explicit = settings.default_host != registry_host(settings.upstream)
    if settings.offline or explicit or settings.upstream.rstrip("/") == DEFAULT_UPSTREAM:
        return settings
    upstream = _upstream(settings.upstream, settings, None)
    try:  # the upstream's own client; its health is reported by the start-up probe, not here
        response = await upstream.client.get(f"{upstream.base_url}/v2/", timeout=TIER_PROBE_TIMEOUT)
        announced = response.headers.get(REGISTRY_HEADER, "").strip().lower()
    except Exception as exc:  # noqa: BLE001 - any failure means "not known to be a mirror"
        log.warning("tier probe failed url=%s reason=%s: tags are stored under %s; if it is another "
                    "ollama-mirror, restart once it answers, or name its registry with --registry "
                    "registry.ollama.ai=%s", settings.upstream, str(exc) or type(exc).__name__, settings.default_host,
                    settings.upstream)
        return settings
    finally:
        await upstream.aclose()
    if not announced or announced == settings.default_host or not is_registry_host(announced):
        return settings
    log.info("upstream is a mirror url=%s registry=%s: tags are stored under %s", settings.upstream,
             announced, announced)
    return settings.mirroring(announced)


def _start_probes(mirror: Mirror) -> list[asyncio.Task[None]]:
    """Watch each upstream's health (``health.py``), in the background: start-up never waits for one."""
    if mirror.settings.offline:
        return []
    loop = asyncio.get_running_loop()
    return [loop.create_task(r.upstream.health.watch(r.upstream.probe), name=f"probe {host}")
            for host, r in mirror.registries.items()]


def _start_eviction(mirror: Mirror) -> asyncio.Task[None] | None:
    high = mirror.settings.max_bytes()
    if high is None:
        return None
    low = int(high * mirror.settings.low_watermark)
    mirror.evictor = Evictor(mirror.store, mirror.meta, high, low, mirror.busy, mirror.forget)
    mirror.engine.finished.append(lambda fill: mirror.evictor.poke() if mirror.evictor else None)
    log.info("eviction on max_size=%d low_watermark=%d", high, low)
    mirror.evictor.poke()  # a store already over the limit is brought under it at start
    return asyncio.get_running_loop().create_task(mirror.evictor.run_forever(), name="eviction")


def _upstream(url: str, settings: Settings, throttle: Throttle | None, health: Health | None = None) -> Upstream:
    return Upstream(url, connect_timeout=settings.connect_timeout, stall_timeout=settings.stall_timeout,
                    max_connections=settings.upstream_connections, allow_networks=settings.allowed_networks,
                    pinned=settings.pinned_addresses, throttle=throttle, health=health)


def _registry(host: str, url: str, store: BlobStore, meta: Metadata, engine: FillEngine,
              settings: Settings, throttle: Throttle | None) -> Registry:
    upstream = _upstream(url, settings, throttle, Health(host, url, offline=settings.offline))
    manifests = ManifestService(store, meta, upstream, settings, host, engine.replicas)
    blobs = BlobService(store, meta, upstream, engine, settings)
    return Registry(host, upstream, manifests, blobs, PullService(manifests, blobs))


def create_app(settings: Settings) -> Starlette:
    """The main app: the registry protocol, Ollama's API (writes only for ``ManagePolicy``), /healthz,
    and (unless --admin-listen) the status pages."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            try:
                mirror = await stack.enter_async_context(open_mirror(settings))
            except OSError as exc:  # `serve` checks the cache first: this names the cause of a race past it
                log.error("mirror failed reason=%s", cache_problem(settings.cache_dir, exc))
                raise
            state = app.state
            state.mirror, state.layout, state.engine = mirror, mirror.layout, mirror.engine
            state.metrics = Metrics(mirror)
            upstreams = " ".join(f"{host}={url}" for host, url in mirror.settings.registry_urls.items())
            log.info("mirror ready cache=%s registries=%s%s", settings.cache_dir, upstreams,
                     " offline" if settings.offline else "")
            probes = _start_probes(mirror)
            try:
                yield
            finally:
                for task in probes:
                    task.cancel()
                await asyncio.gather(*probes, return_exceptions=True)

    pages = status.public_root if settings.admin_listen else status.routes
    keys = load_keys(settings.keys_file) if settings.keys_file else {}
    guarded = settings.client_networks or settings.token_set or keys  # no layer at all when nothing is guarded
    guard = [Middleware(AccessControl, networks=settings.client_networks, tokens=settings.token_set,
                        keys=keys)] if guarded else []
    api = ollama_api.routes(ManagePolicy(settings.manage_networks))
    return _starlette([*registry_routes, *api, status.health, *pages, fallback], lifespan, guard)


def create_admin_app(main: Starlette) -> Starlette:
    """For --admin-listen: the status page, /metrics, and the management API open to whoever
    reaches this listener (bind it where only admins do). It shares the main app's state."""
    admin = _starlette([status.health, *status.routes, *ollama_api.routes(None), fallback], None)
    admin.state = main.state
    return admin


def _starlette(app_routes: list[BaseRoute], lifespan: Any, middleware: list[Middleware] | None = None) -> Starlette:
    return Starlette(
        routes=app_routes,
        middleware=[Middleware(AccessLog), *(middleware or [])],
        exception_handlers={MirrorError: _mirror_error, HTTPException: _http_error, Exception: _bug},
        lifespan=lifespan,
    )
