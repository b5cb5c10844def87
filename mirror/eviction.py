"""Keeping the store under ``--max-size``: least-recently-used models go first, whole.

When the blobs pass the high watermark (max_size), models are removed, oldest use first,
until the store is under the low watermark. A model's last use is the latest access of
any of its blobs (recorded on hits, at most once a minute per blob) or its manifest's
time. Removing a model removes its tag and the blobs no kept model shares; pinned models
and blobs in use (``BlobStore.in_use``: being filled or served) are never touched. Blobs no
manifest refers to go first.

This module only chooses; ``BlobStore.remove`` removes, as it does for ``ollama rm`` and
``ollama-mirror rm``: manifests before blobs, so a kill in the middle leaves at worst
unreferenced blobs (the next run removes them), never a tag whose blobs are gone by our hand.
Blocking functions; the server runs them in a thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from . import models
from .layout import Layout
from .metadata import Metadata
from .models import CachedModel
from .names import Digest
from .store import BlobStore, Removed

log = logging.getLogger("mirror.eviction")


@dataclass
class Plan:
    usage: int  # bytes of blobs (and staging files) in the store
    high: int
    low: int
    models: list[CachedModel] = field(default_factory=list)
    blobs: dict[Digest, int] = field(default_factory=dict)  # blob -> size, to delete

    @property
    def freed(self) -> int:
        return sum(self.blobs.values())


def stored_blobs(layout: Layout) -> dict[Digest, os.stat_result]:
    found = {}
    try:
        entries = list(os.scandir(layout.blobs))
    except FileNotFoundError:
        return {}
    for entry in entries:
        if entry.name.startswith("sha256-") and len(entry.name) == 71 and entry.is_file():
            found[Digest(entry.name[7:])] = entry.stat()
    return found


def store_usage(layout: Layout) -> int:
    """Bytes the store holds: verified blobs and the staging files of fills."""
    staged = 0
    try:
        staged = sum(e.stat().st_blocks * 512 for e in os.scandir(layout.staging) if e.name.endswith(".data"))
    except FileNotFoundError:
        pass
    return sum(s.st_size for s in stored_blobs(layout).values()) + staged


def plan(store: BlobStore, meta: Metadata, high: int | None, low: int | None,
         serving: Collection[Digest] = (), force: bool = False) -> Plan:
    """What to remove to bring the store from above ``high`` down to ``low``; ``force``
    plans even below ``high`` (``gc`` on demand). Without limits: only unreferenced blobs.
    ``serving``: the blobs the calling process is serving."""
    layout = store.layout
    blobs = stored_blobs(layout)
    usage = store_usage(layout)
    result = Plan(usage, usage if high is None else high, 0 if low is None else low)
    if high is not None and usage <= high and not force:
        return result
    everything = models.list_models(layout)
    busy = store.busy({*blobs, *(layer.digest for m in everything for layer in m.blobs)}, serving)
    kept_uses = Counter(layer.digest for m in everything for layer in set(m.blobs))

    def last_use(digest: Digest) -> float:
        stat = blobs.get(digest)
        return meta.blob_access(digest) or (stat.st_mtime if stat else 0.0)

    def take(digest: Digest) -> None:
        if digest in blobs and digest not in busy and digest not in result.blobs:
            result.blobs[digest] = blobs[digest].st_size

    excess = result.usage - result.low if high is not None else result.usage
    for digest in sorted((d for d in blobs if d not in kept_uses), key=last_use):  # orphans first
        if result.freed >= excess:
            return result
        take(digest)
    if high is None:
        return result
    unpinned = [m for m in everything if not meta.is_pinned(m.host, m.name, m.tag)]
    by_age = sorted(unpinned, key=lambda m: max([m.modified, *(last_use(layer.digest) for layer in m.blobs)]))
    for model in by_age:
        if result.freed >= excess:
            break
        if any(layer.digest in busy for layer in model.blobs):
            continue
        result.models.append(model)
        for digest in {layer.digest for layer in model.blobs}:
            kept_uses[digest] -= 1
            if kept_uses[digest] == 0:
                take(digest)
    return result


def execute(store: BlobStore, meta: Metadata, chosen: Plan, serving: Collection[Digest] = (),
            by: str = "eviction") -> Removed:
    """Remove the planned tags and blobs through the store, which keeps whatever became in use
    since the plan was made; each removal is logged there, the sum here."""
    removed = store.remove(chosen.models, chosen.blobs, serving, meta, by)
    if removed.models or removed.blobs:
        log.info("evicted models=%d blobs=%d freed=%d usage_before=%d low_watermark=%d by=%s",
                 len(removed.models), len(removed.blobs), removed.freed, chosen.usage, chosen.low, by)
    return removed


class Evictor:
    """Eviction inside the server: once a minute and soon after each fill; one run at a time."""

    INTERVAL = 60.0

    def __init__(self, store: BlobStore, meta: Metadata, high: int, low: int,
                 serving: Callable[[], set[Digest]], forget: Callable[[CachedModel], None]) -> None:
        self._store, self._meta, self.high, self.low = store, meta, high, low
        self._serving = serving  # the blobs this process is serving now
        self._forget = forget  # drops an evicted tag from the manifest services' memory
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self.evicted_models = 0
        self.evicted_bytes = 0

    async def run_once(self, force: bool = False) -> Plan:
        async with self._lock:
            chosen = await asyncio.to_thread(plan, self._store, self._meta, self.high, self.low,
                                             self._serving(), force)
            if chosen.models or chosen.blobs:
                removed = await asyncio.to_thread(execute, self._store, self._meta, chosen, self._serving())
                for model in removed.models:
                    self._forget(model)
                self.evicted_models += len(removed.models)
                self.evicted_bytes += removed.freed
            return chosen

    def poke(self) -> None:
        """A fill finished: the store grew, check soon."""
        self._wake.set()

    async def run_forever(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.INTERVAL)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.run_once()
            except OSError as exc:
                log.error("eviction failed: %s; the store may pass --max-size until it works", exc)
