"""Warming the cache with a whole model, reporting progress as Ollama's own pull does.

The manifest is fetched (revalidated), then every blob's fill is started at once
through the same engine that serves clients; the progress reported is the fills'.
The fills belong to the engine, so a caller that stops listening stops nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping

from .blobs import BlobService
from .fill import Fill
from .manifest import Layer
from .manifests import ManifestService
from .names import ModelRef

PROGRESS_INTERVAL = 0.25  # seconds between progress lines per layer


class PullService:
    def __init__(self, manifests: ManifestService, blobs: BlobService) -> None:
        self._manifests, self._blobs = manifests, blobs

    async def pull(self, ref: ModelRef, headers: Mapping[str, str]) -> AsyncIterator[dict[str, object]]:
        """Progress events, in the shapes Ollama's CLI parses (api.ProgressResponse)."""
        yield {"status": "pulling manifest"}
        answer = await self._manifests.by_tag(ref.name, ref.tag, headers, revalidate=True)
        blobs = list(answer.manifest.parsed.blobs)  # parsed once, where it was fetched or read
        fills = {layer.digest: await self._blobs.ensure(ref.name, layer.digest, layer.size) for layer in blobs}
        tensor = any(layer.kind == "tensor" for layer in blobs)  # Ollama pulls these with x/transfer
        async for event in (self._model_progress if tensor else self._progress)(blobs, fills):
            yield event
        for fill in fills.values():
            if fill is not None:
                await fill.verified()
        if not tensor:  # x/transfer hashes as it writes: no step of its own
            yield {"status": "verifying sha256 digest"}
        yield {"status": "writing manifest"}
        await self._manifests.written()
        yield {"status": "success"}

    async def _progress(self, blobs: list[Layer], fills: dict[object, Fill | None]) -> AsyncIterator[dict[str, object]]:
        """One line per layer, repeated until it is complete, as Ollama prints its bars."""
        for layer in blobs:
            fill = fills[layer.digest]
            while True:
                done = layer.size if fill is None else fill.done_bytes
                yield {"status": f"pulling {layer.digest.hex[:12]}", "digest": str(layer.digest),
                       "total": layer.size, "completed": done}
                if fill is None or done >= layer.size:
                    break
                fill.raise_if_failed()
                await asyncio.sleep(PROGRESS_INTERVAL)

    async def _model_progress(self, blobs: list[Layer],
                              fills: dict[object, Fill | None]) -> AsyncIterator[dict[str, object]]:
        """x/transfer's one bar for the whole model (server/images.go pullWithTransfer, v0.32.15):
        ``pulling model`` over every blob's bytes, under the digest ``sha256:model``; no bar at all
        when every blob is there already."""
        if all(fill is None for fill in fills.values()):
            return
        total = sum(layer.size for layer in blobs)
        while True:
            done = sum(layer.size if (fill := fills[layer.digest]) is None else fill.done_bytes for layer in blobs)
            yield {"status": "pulling model", "digest": "sha256:model", "total": total, "completed": done}
            if done >= total:
                break
            for fill in fills.values():
                if fill is not None:
                    fill.raise_if_failed()
            await asyncio.sleep(PROGRESS_INTERVAL)
