"""Ollama's own management API, acting on the mirror's cache, so that
``OLLAMA_HOST=mirror ollama pull|list|rm|show`` manage the mirror.

Errors here are Ollama's ``{"error": "..."}``, not the registry's format. Endpoints
for inference (generate, chat, embeddings) and for writing models answer 501. Pull and
delete change the cache: on the main listener they follow ``access.ManagePolicy``.
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
from .errors import ManifestUnknown, MirrorError, NameInvalid
from .models import CachedModel
from .names import ModelRef
from .responses import status_for

# The client version this API was checked against; the CLI only compares it for a warning.
OLLAMA_VERSION = "0.9.3"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _request_model(request: Request) -> tuple[dict[str, Any], str, ModelRef]:
    """The request's body, the model as the user typed it, and as parsed."""
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        raise NameInvalid("request body is not JSON") from None
    if not isinstance(body, dict):
        raise NameInvalid("request body is not a JSON object")
    text = body.get("model") or body.get("name")
    if not isinstance(text, str) or not text:
        raise NameInvalid("model is required")
    return body, text, ModelRef.parse(text)


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
    if isinstance(exc, ManifestUnknown):
        return f"pull model manifest: file does not exist ({exc})"
    return str(exc)


@_api_errors
async def pull(request: Request) -> Response:
    body, _, ref = await _request_model(request)
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
    return {
        "name": model.display_name,
        "model": model.display_name,
        "modified_at": _time(model.modified),
        "size": model.size,
        "digest": model.digest.hex,
        "details": _details(layout, model),
    }


def _details(layout: Any, model: CachedModel) -> dict[str, object]:
    """What the config blob says about the model; empty where it says nothing."""
    text = models.read_blob_text(layout, model.config)
    try:
        config = json.loads(text) if text else {}
    except ValueError:
        config = {}
    if not isinstance(config, dict):
        config = {}
    return {
        "parent_model": "",
        "format": config.get("model_format", ""),
        "family": config.get("model_family", ""),
        "families": config.get("model_families"),
        "parameter_size": config.get("model_type", ""),
        "quantization_level": config.get("file_type", ""),
    }


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
    _, typed, ref = await _request_model(request)
    model = await _find(request, typed, ref)
    await request.app.state.mirror.remove([model], by="api")
    return Response(status_code=200)


@_api_errors
async def show(request: Request) -> Response:
    _, typed, ref = await _request_model(request)
    model = await _find(request, typed, ref)
    layout = request.app.state.layout
    return JSONResponse(await asyncio.to_thread(_show, layout, model, str(ref)))


def _show(layout: Any, model: CachedModel, name: str) -> dict[str, object]:
    """What the manifest's small layers say; fields the mirror cannot know are left out."""
    texts: dict[str, list[str]] = {}
    for layer in model.layers:
        if layer.kind in ("template", "system", "params", "license"):
            text = models.read_blob_text(layout, layer)
            if text is not None:
                texts.setdefault(layer.kind, []).append(text)
    result: dict[str, object] = {"details": _details(layout, model), "modified_at": _time(model.modified)}
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
    return JSONResponse({"version": OLLAMA_VERSION})


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
