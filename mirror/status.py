"""For people and monitoring: the status page at ``/``, its data at ``/status.json``, ``/metrics``,
the CA certificate at ``/ca.crt`` when transparent mode made one, and ``/healthz``.

With ``--admin-listen`` these routes move to that listener; the main one then answers ``/``
with a line of text only, so the LAN does not see what the mirror holds.
"""

from __future__ import annotations

import asyncio
import time
from importlib import resources
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from . import __version__, models
from .errors import RouteUnknown
from .eviction import store_usage
from .fill import Fill
from .metrics import CONTENT_TYPE

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
    host = request.headers.get("host", "mirror")
    cached = models.list_models(mirror.layout)
    evictor = mirror.evictor
    return {
        "version": __version__,
        "upstreams": mirror.settings.registry_urls,
        "offline": mirror.settings.offline,
        "setup": _setup_lines(host, mirror.settings.proxy_listen),
        "totals": {**request.app.state.metrics.totals(), "store_bytes": store_usage(mirror.layout),
                   "limit_bytes": evictor.high if evictor else None},
        "models": [_model(mirror, m) for m in cached],
        "fills": [_fill(f) for f in mirror.engine.active],
    }


def _setup_lines(host: str, proxy: str) -> list[str]:
    lines = [f"ollama pull --insecure {host}/library/qwen2.5:0.5b",
             f"ollama cp {host}/library/qwen2.5:0.5b qwen2.5:0.5b   # optional: the usual name"]
    if proxy:
        port = proxy.rpartition(":")[2]
        name = host.rpartition(":")[0] if ":" in host else host
        lines = [f"curl -o ollama-mirror-ca.crt http://{host}/ca.crt   # trust it as a system certificate",
                 f"HTTPS_PROXY=http://{name}:{port} ollama serve   # then: ollama pull qwen2.5:0.5b"] + lines
    return lines


def _model(mirror: Any, model: models.CachedModel) -> dict[str, Any]:
    record = mirror.meta.manifest(model.host, model.name, model.tag)
    return {"name": model.display_name, "host": model.host, "id": model.digest.hex[:12], "size": model.size,
            "pulled": record.fetched_at if record and record.fetched_at else model.modified,
            "pinned": mirror.meta.is_pinned(model.host, model.name, model.tag)}


def _fill(fill: Fill) -> dict[str, Any]:
    seconds = max(time.monotonic() - fill.started, 1e-3)
    return {"digest": str(fill.digest), "model": str(fill.name), "size": fill.size, "done": fill.done_bytes,
            "rate": fill.fetched / seconds, "clients": fill.waiting_clients, "state": fill.state.name.lower()}


health = Route("/healthz", healthz, methods=["GET", "HEAD"])  # on the main and the admin listener
public_root = [Route("/", running, methods=["GET", "HEAD"])]  # the main listener when --admin-listen is set
routes = [
    Route("/metrics", metrics, methods=["GET"]),
    Route("/status.json", status_json, methods=["GET"]),
    Route("/ca.crt", ca_certificate, methods=["GET"]),
    Route("/", page, methods=["GET", "HEAD"]),
]
