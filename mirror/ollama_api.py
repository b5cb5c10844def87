"""Ollama's own management API, acting on the mirror's cache, so that
``OLLAMA_HOST=mirror ollama pull|list|rm|show`` manage the mirror.

Errors here are Ollama's ``{"error": "..."}``, not the registry's format. Endpoints
for inference (generate, chat, embeddings) and for writing models answer 501. Pull and
delete change the cache: on the main listener they follow ``access.ManagePolicy``.

Names take Ollama v0.32's ``:local`` and ``:cloud`` suffixes (``names.SourcedName``): pull
and rm act on the registry's tag for a cloud model (``x:cloud``, ``x:8b-cloud``), show
answers a ``:cloud`` name from that tag when the mirror holds it and otherwise as ollama.com
answers a cloud model it does not have (404, the name as typed), which is what the CLI's
``:cloud`` probe after a "not found" pull asks.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import models
from .access import ManagePolicy
from .clients import ClientAgent
from .errors import ManifestUnknown, MirrorError, NameInvalid, UpstreamRefused
from .models import CachedModel
from .names import ModelRef, Source, SourcedName
from .responses import status_for

# The client version this API was checked against: /api/version's answer to clients that are not Ollama.
OLLAMA_VERSION = "0.9.3"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _request_model(request: Request) -> tuple[dict[str, Any], SourcedName]:
    """The request's body, and the model it names, as typed and taken apart."""
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        raise NameInvalid("request body is not JSON") from None
    if not isinstance(body, dict):
        raise NameInvalid("request body is not a JSON object")
    text = body.get("model") or body.get("name")
    if not isinstance(text, str) or not text.strip():
        raise NameInvalid("model is required")
    return body, SourcedName.parse(text)


def _api_errors(handler: Any) -> Any:
    """Our errors, in Ollama's shape: the CLI prints ``error`` as it is."""

    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except ManifestUnknown as exc:  # pull: Ollama's words for a registry 404 (its CLI looks for them)
            return _error(500, _pull_message(exc)) if request.url.path == "/api/pull" else _error(404, str(exc))
        except NameInvalid as exc:
            return _error(400, str(exc))
        except MirrorError as exc:
            return _error(status_for(exc), str(exc))

    return wrapped


def _pull_message(exc: MirrorError) -> str:
    """Ollama's words for a failed manifest, which its CLI looks for ("file does not exist") or
    prints (a 412's body: "requires a newer version of Ollama")."""
    if isinstance(exc, ManifestUnknown):
        return f"pull model manifest: file does not exist ({exc})"
    if isinstance(exc, UpstreamRefused) and 400 <= exc.status < 500:
        return f"pull model manifest: {exc.status}: {exc.body.decode('utf-8', 'replace')}"
    return str(exc)


@_api_errors
async def pull(request: Request) -> Response:
    body, sourced = await _request_model(request)
    ref = sourced.pull_ref()
    events = request.app.state.mirror.registry(ref.host).pulls.pull(ref, request.headers)
    if body.get("stream", True) is False:
        last: dict[str, object] = {}
        async for event in events:
            last = event
        return JSONResponse(last)
    return StreamingResponse(_ndjson(events), media_type="application/x-ndjson")


async def _ndjson(events: AsyncIterator[dict[str, object]]) -> AsyncIterator[str]:
    """Progress lines; a failure after the first line is sent as a last ``{"error"}`` line."""
    try:
        async for event in events:
            yield json.dumps(event) + "\n"
    except MirrorError as exc:
        yield json.dumps({"error": _pull_message(exc)}) + "\n"


@_api_errors
async def tags(request: Request) -> Response:
    layout = request.app.state.layout
    found = await asyncio.to_thread(models.list_models, layout)
    entries = await asyncio.to_thread(lambda: [_tag_entry(layout, m) for m in found])
    return JSONResponse({"models": entries})


def _tag_entry(layout: Any, model: CachedModel) -> dict[str, object]:
    config = _config(layout, model)
    return {
        "name": model.display_name,
        "model": model.display_name,
        **_remote(config),
        "modified_at": _time(model.modified),
        "size": model.size,
        "digest": model.digest.hex,
        "details": _details(config),
    }


def _config(layout: Any, model: CachedModel) -> dict[str, Any]:
    """The model's config blob; empty where it says nothing or is not cached."""
    text = models.read_blob_text(layout, model.config)
    try:
        config = json.loads(text) if text else {}
    except ValueError:
        config = {}
    return config if isinstance(config, dict) else {}


def _details(config: dict[str, Any]) -> dict[str, object]:
    return {
        "parent_model": "",
        "format": config.get("model_format", ""),
        "family": config.get("model_family", ""),
        "families": config.get("model_families"),
        "parameter_size": config.get("model_type", ""),
        "quantization_level": config.get("file_type", ""),
    }


def _remote(config: dict[str, Any]) -> dict[str, str]:
    """A cloud model's stub says where it runs; Ollama lists and shows that (``ollama list``
    prints ``-`` for its size), and leaves the fields out for other models."""
    return {key: config[key] for key in ("remote_model", "remote_host") if isinstance(config.get(key), str)
            and config[key]}


def _time(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=UTC).isoformat()


async def _find(request: Request, typed: str, ref: ModelRef) -> CachedModel:
    """The cached model a request names; Ollama's own words when there is none, with the name as typed."""
    layout = request.app.state.layout
    found = await asyncio.to_thread(models.load, layout, _host(request, ref), ref.name, ref.tag)
    if found is None:
        raise ManifestUnknown(f"model '{typed}' not found")
    return found


def _host(request: Request, ref: ModelRef) -> str:
    """Names without a host mean the default registry; a host we do not fill from may still be
    in the cache (imported), so it is looked up as written."""
    try:
        return str(request.app.state.mirror.registry(ref.host).host)
    except NameInvalid:
        return str(ref.host)


@_api_errors
async def delete(request: Request) -> Response:
    _, sourced = await _request_model(request)
    model = await _find(request, sourced.typed, sourced.pull_ref())
    await request.app.state.mirror.remove([model], by="api")
    return Response(status_code=200)


@_api_errors
async def show(request: Request) -> Response:
    _, sourced = await _request_model(request)
    # a cloud model: the registry's tag for it, if the mirror holds it (Ollama asks ollama.com instead)
    ref = sourced.pull_ref() if sourced.source is Source.CLOUD else sourced.ref()
    model = await _find(request, sourced.typed, ref)
    layout = request.app.state.layout
    shown = await asyncio.to_thread(_show, layout, model, str(ref))
    if sourced.source is Source.LOCAL and "remote_host" in shown:
        raise ManifestUnknown(f"model '{sourced.typed}' not found")  # ``:local`` never means a cloud model
    return JSONResponse(shown)


def _show(layout: Any, model: CachedModel, name: str) -> dict[str, object]:
    """What the manifest's small layers say; fields the mirror cannot know are left out."""
    config = _config(layout, model)
    texts: dict[str, list[str]] = {}
    for layer in model.layers:
        if layer.kind in ("template", "system", "params", "license"):
            text = models.read_blob_text(layout, layer)
            if text is not None:
                texts.setdefault(layer.kind, []).append(text)
    result: dict[str, object] = {"details": _details(config), **_remote(config),
                                 "modified_at": _time(model.modified)}
    if "template" in texts:
        result["template"] = texts["template"][0]
    if "system" in texts:
        result["system"] = texts["system"][0]
    if "license" in texts:
        result["license"] = "\n".join(texts["license"])
    if "params" in texts:
        result["parameters"] = _parameters(texts["params"][0])
    result["modelfile"] = _modelfile(name, result)
    return result


def _parameters(text: str) -> str:
    """Ollama's layout of the params layer: ``key   value`` lines, lists one line per item."""
    try:
        params = json.loads(text)
    except ValueError:
        return ""
    lines = []
    for key, value in (params.items() if isinstance(params, dict) else []):
        for item in value if isinstance(value, list) else [value]:
            lines.append(f"{key:<30} {_go_value(item)}")
    return "\n".join(lines)


def _go_value(value: object) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return json.dumps(value)


def _modelfile(name: str, shown: dict[str, object]) -> str:
    lines = ["# Modelfile generated by ollama-mirror", f"FROM {name}"]
    if "template" in shown:
        lines.append(f'TEMPLATE """{shown["template"]}"""')
    if "system" in shown:
        lines.append(f'SYSTEM """{shown["system"]}"""')
    for line in str(shown.get("parameters", "")).splitlines():
        key, _, value = line.partition(" ")
        lines.append(f"PARAMETER {key} {value.strip()}")
    if "license" in shown:
        lines.append(f'LICENSE """{shown["license"]}"""')
    return "\n".join(lines) + "\n"


async def version(request: Request) -> Response:
    """The asking Ollama's own version (from its User-Agent): `ollama -v` warns when the server's
    differs from its own, and the mirror serves every client version the registry serves it."""
    return JSONResponse({"version": ClientAgent.parse(request.headers.get("user-agent", "")).version
                         or OLLAMA_VERSION})


async def not_an_inference_server(request: Request) -> Response:
    if request.url.path in ("/api/generate", "/api/chat") and await _is_unload(request):
        # ``ollama rm`` first asks the server to unload the model; a mirror has nothing loaded.
        body = json.loads(await request.body())
        return JSONResponse({"model": body.get("model", ""), "created_at": _time(time.time()), "response": "",
                             "done": True, "done_reason": "unload"})
    endpoint = re.sub(r"[^a-z/_-]", "", request.url.path)[:40]
    return _error(501, f"ollama-mirror is a model mirror, not an inference server: {endpoint} is not "
                       "available here; point OLLAMA_HOST at an Ollama server to run models")


async def _is_unload(request: Request) -> bool:
    """A request with nothing to generate and ``keep_alive: 0``: Ollama's way to unload a model."""
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        return False
    return (isinstance(body, dict) and body.get("keep_alive") in (0, "0", "0s")
            and not body.get("prompt") and not body.get("messages"))


def _manage_only(handler: Any, policy: ManagePolicy) -> Any:
    """``handler`` for those ``policy`` lets change the cache; others get 403 with the way to be let in."""

    async def guarded(request: Request) -> Response:
        refusal = policy.refusal(request.scope)
        if refusal is not None:
            return _error(403, refusal)
        return await handler(request)  # type: ignore[no-any-return]

    return guarded


def routes(manage: ManagePolicy | None) -> list[Route]:
    """The API's routes. ``manage`` decides who may pull and delete; None lets anyone who reaches
    the listener (the --admin-listen one). Reading (tags, show, version) is open like the registry."""

    def writes(handler: Any) -> Any:
        return handler if manage is None else _manage_only(handler, manage)

    return [
        Route("/api/pull", writes(pull), methods=["POST"]),
        Route("/api/tags", tags, methods=["GET", "HEAD"]),
        Route("/api/delete", writes(delete), methods=["DELETE"]),
        Route("/api/show", show, methods=["POST"]),
        Route("/api/version", version, methods=["GET", "HEAD"]),
        Route("/api/{rest:path}", not_an_inference_server, methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]),
    ]
