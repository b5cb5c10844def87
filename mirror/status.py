"""For people and monitoring: the status page at ``/``, its data at ``/status.json``, ``/metrics``,
the CA certificate at ``/ca.crt`` when transparent mode made one, and ``/healthz``.

With ``--admin-listen`` these routes move to that listener; the main one then answers ``/``
with a line of text only, so the LAN does not see what the mirror holds.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from . import __version__, models
from .config import Settings
from .errors import RouteUnknown
from .eviction import stored_blobs
from .fill import Fill
from .metrics import CONTENT_TYPE
from .models import DEFAULT_REGISTRY, CachedModel
from .names import Digest, Name

PAGE = resources.files("mirror").joinpath("static/status.html")


async def metrics(request: Request) -> Response:
    body = await asyncio.to_thread(request.app.state.metrics.render)
    return Response(body, media_type=CONTENT_TYPE)


async def status_json(request: Request) -> Response:
    return JSONResponse(await asyncio.to_thread(_status, request))


async def page(request: Request) -> Response:
    """The page for a browser; a line of text for anything else (Ollama's CLI probes ``/``)."""
    if request.method == "GET" and "text/html" in request.headers.get("accept", ""):
        return HTMLResponse(PAGE.read_text("utf-8"), headers={"Cache-Control": "no-cache"})
    return await running(request)


async def running(request: Request) -> Response:
    return PlainTextResponse("ollama-mirror is running")


async def healthz(request: Request) -> Response:
    """Liveness for container engines and load balancers: open whatever the access settings,
    on every listener, so it says nothing but that the process answers."""
    return PlainTextResponse("ok\n")


async def ca_certificate(request: Request) -> Response:
    path = request.app.state.mirror.layout.state / "ca" / "ca.pem"
    try:
        data = await asyncio.to_thread(path.read_bytes)
    except FileNotFoundError:
        raise RouteUnknown("this mirror has no CA: transparent mode is off") from None
    return Response(data, media_type="application/x-pem-file",
                    headers={"Content-Disposition": 'attachment; filename="ollama-mirror-ca.crt"'})


def _status(request: Request) -> dict[str, Any]:
    mirror = request.app.state.mirror
    stored = {digest: stat.st_size for digest, stat in stored_blobs(mirror.layout).items()}
    fills = mirror.engine.active
    complete, incomplete = _split(models.list_models(mirror.layout), stored)
    evictor = mirror.evictor
    return {
        "version": __version__,
        "upstreams": mirror.settings.registry_urls,
        "offline": mirror.settings.offline,
        "health": [registry.upstream.health.snapshot() for registry in mirror.registries.values()],
        "setup": _setup(request, mirror.settings, _example(complete, mirror.settings.default_host)),
        "totals": {**request.app.state.metrics.totals(), "store_bytes": sum(stored.values()),
                   "filling_bytes": sum(f.done_bytes for f in fills), "filling_size": sum(f.size for f in fills),
                   "limit_bytes": evictor.high if evictor else None},
        "models": [_model(mirror, m) for m in complete],
        "incomplete": [_incomplete(mirror, m, stored) for m in incomplete],
        "fills": [_fill(f) for f in fills],
        "shared": mirror.engine.replicas.snapshot() if mirror.engine.replicas else None,
    }


def _split(cached: list[CachedModel], stored: dict[Digest, int]) -> tuple[list[CachedModel], list[CachedModel]]:
    """Complete models (every blob verified in the store) and the others: a manifest arrives
    before its blobs, so a model being filled, or whose blobs no client asked for yet, is not complete."""
    complete: list[CachedModel] = []
    incomplete: list[CachedModel] = []
    for model in cached:
        (complete if all(blob.digest in stored for blob in model.blobs) else incomplete).append(model)
    return complete, incomplete


def client_name(host: str, name: Name, tag: str, default_host: str) -> str:
    """A model as an Ollama client of this mirror names it: ``qwen2.5:7b`` for the library of the
    registry it mirrors by default, ``team/model:v1`` for another namespace there, the full name
    for other registry hosts."""
    if host in (default_host, DEFAULT_REGISTRY):
        return f"{name.model if name.namespace == 'library' else name}:{tag}"
    return f"{host}/{name}:{tag}"


def _model(mirror: Any, model: CachedModel) -> dict[str, Any]:
    record = mirror.meta.manifest(model.host, model.name, model.tag)
    return {"name": client_name(model.host, model.name, model.tag, mirror.settings.default_host),
            "stored_as": str(model), "host": model.host, "id": model.digest.hex[:12], "size": model.size,
            "pulled": record.fetched_at if record and record.fetched_at else model.modified,
            "pinned": mirror.meta.is_pinned(model.host, model.name, model.tag)}


def _incomplete(mirror: Any, model: CachedModel, stored: dict[Digest, int]) -> dict[str, Any]:
    """A model whose blobs are not all in the store: how much is, and whether a fill is running."""
    fills = [mirror.engine.get(blob.digest) for blob in model.blobs if blob.digest not in stored]
    cached = sum(blob.size for blob in model.blobs if blob.digest in stored)
    return {"name": client_name(model.host, model.name, model.tag, mirror.settings.default_host),
            "stored_as": str(model), "size": model.size, "cached": cached + sum(f.done_bytes for f in fills if f),
            "filling": any(fills)}


def _fill(fill: Fill) -> dict[str, Any]:
    seconds = max(time.monotonic() - fill.started, 1e-3)
    model = fill.name.model if fill.name.namespace == "library" else str(fill.name)  # a blob has no tag
    return {"digest": str(fill.digest), "model": model, "size": fill.size, "done": fill.done_bytes,
            "rate": fill.fetched / seconds, "clients": fill.waiting_clients, "state": fill.state.name.lower(),
            "source": fill.source, "connections": fill.connections}


@dataclass(frozen=True)
class _Example:
    """The model the set-up lines show: a complete one (the smallest) or a placeholder that says so."""

    host: str
    name: Name
    tag: str
    cached: bool


def _example(complete: list[CachedModel], default_host: str) -> _Example:
    mine = sorted((m for m in complete if m.host == default_host), key=lambda m: m.size)
    if mine:
        return _Example(mine[0].host, mine[0].name, mine[0].tag, True)
    return _Example(default_host, Name("library", "MODEL"), "TAG", False)


def _setup(request: Request, settings: Settings, example: _Example) -> list[dict[str, Any]]:
    """The commands for each way this mirror is running, with a model it holds."""
    page = request.headers.get("host") or f"{settings.listen_host}:{settings.listen_port}"
    hostname = page.rpartition(":")[0] if page.rpartition(":")[2].isdigit() else page
    # The page may be on --admin-listen: the registry is on the main listener's port.
    main = page if not settings.admin_listen else _address(hostname, settings.listen_port)
    named = f"{main}/{example.name}:{example.tag}"
    short = client_name(example.host, example.name, example.tag, settings.default_host)
    stock = client_name(example.host, example.name, example.tag, DEFAULT_REGISTRY)  # a stock client's name
    note = [] if example.cached else ["# nothing is cached yet: put a model the upstream has in place of MODEL:TAG"]
    insecure = " --insecure" if request.url.scheme == "http" else ""
    modes = [
        {"mode": "named", "title": "Named: any Ollama, the mirror in the model's name", "covers": COVERS["named"], "lines": [
            *note, f"ollama pull{insecure} {named}",
            f"ollama cp {named} {short}   # optional: the usual name (copies only the manifest)"]},
        {"mode": "ollama_host", "title": "OLLAMA_HOST: the Ollama CLI manages the mirror's cache",
         "covers": COVERS["ollama_host"], "lines": [
            *note, f"OLLAMA_HOST={page} ollama pull {short}   # fill the mirror"
            + ("" if settings.admin_listen else " (from the mirror's host or --manage-clients)"),
            f"OLLAMA_HOST={page} ollama list   # what it holds"]},
    ]
    trust = (["# clients must trust the issuer of --tls-cert"] if settings.tls_cert else
             [f"curl -o ollama-mirror-ca.crt http://{page}/ca.crt   # then trust it as a system certificate"])
    if settings.proxy_listen:
        proxy = _address(hostname, int(settings.proxy_listen.rpartition(":")[2]))
        modes.append({"mode": "proxy", "title": "Transparent: stock names through HTTPS_PROXY",
                      "covers": COVERS["proxy"], "lines": [
            *note, *trust,
            f"HTTPS_PROXY=http://{proxy} ollama serve   # or: sudo systemctl edit ollama, then restart it",
            f"ollama pull {stock}"]})
    if settings.tls_listen:
        hosts = ", ".join(sorted(h for h in settings.registry_urls if ":" not in h)) or "the mirrored hosts"
        modes.append({"mode": "dns", "title": "Transparent: stock names through a DNS override",
                      "covers": COVERS["dns"], "lines": [
            *note, f"# in the LAN's DNS, point {hosts} at {hostname}", *trust, f"ollama pull {stock}"]})
    return modes


# Which of Ollama's download paths each mode serves from the cache: the GGUF path (every model that
# is not a tensor model, every Ollama version) and the tensor path (x/transfer, safetensors models,
# Ollama 0.32 and newer), whose blob transport has no proxy.
COVERS = {
    "named": "Every model, both download paths (GGUF models, and the tensor models of Ollama 0.32+): "
             "every byte comes from the mirror.",
    "ollama_host": "Manages the mirror's own cache: a pull here fills the mirror, for the clients that follow.",
    "proxy": "GGUF models only. Ollama 0.32+ fetches a tensor model's blobs without HTTPS_PROXY, straight "
             "from the registry: only their manifest passes here (the log says so); DNS mode covers them.",
    "dns": "Every model, both download paths: every request for the registry's name reaches the mirror.",
}


def _address(hostname: str, port: int) -> str:
    return hostname if port == 80 else f"{hostname}:{port}"


health = Route("/healthz", healthz, methods=["GET", "HEAD"])  # on the main and the admin listener
public_root = [Route("/", running, methods=["GET", "HEAD"])]  # the main listener when --admin-listen is set
routes = [
    Route("/metrics", metrics, methods=["GET"]),
    Route("/status.json", status_json, methods=["GET"]),
    Route("/ca.crt", ca_certificate, methods=["GET"]),
    Route("/", page, methods=["GET", "HEAD"]),
]
