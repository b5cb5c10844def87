"""Pull-through blobs: the size for HEAD, and a ``BlobBody`` that reads any span.

A body reads a verified blob from disk, or follows a running fill by position.
Either way the HTTP layer sees the same thing: an async iterator of bytes for
``[start, stop)``. It never learns a path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import Counter
from collections.abc import AsyncIterator, Callable

from cachetools import TTLCache

from .config import Settings
from .errors import BlobUnknown, FillFailed, StoreFull, UpstreamRefused
from .fds import SharedFd, in_thread
from .fill import Fill, FillEngine
from .manifest import Manifest
from .metadata import Metadata
from .names import Digest, Name
from .store import BlobStore, read_at
from .upstream import Upstream

log = logging.getLogger("mirror.fill")
ReadSize = Callable[[], int]  # asked before every read: the size may change while a body streams
TOUCH_EVERY = 60.0  # seconds between access-time writes for one blob


class BlobBody:
    """The bytes of one blob, from the store or from its fill. ``source`` is "hit" or "fill"."""

    def __init__(self, digest: Digest, size: int, fd: int | None, fill: Fill | None,
                 serving: Counter[Digest] | None = None) -> None:
        self.digest = digest
        self.size = size
        self.source = "hit" if fill is None else "fill"
        self._fd = SharedFd(fd) if fd is not None else None
        self._fill = fill
        self._serving = serving  # blobs being served are never evicted
        if serving is not None:
            serving[digest] += 1

    def close(self) -> None:
        if self._fd is not None:
            self._fd.close()
            self._fd = None
        if self._serving is not None:
            self._serving[self.digest] -= 1
            if self._serving[self.digest] <= 0:
                del self._serving[self.digest]
            self._serving = None

    async def ready(self, position: int, timeout: float) -> None:
        """Return once the byte at ``position`` can be read, or ``timeout`` passed; raise if the
        fill behind this body failed first."""
        if self._fill is not None:
            await self._fill.first_bytes(position, timeout)

    async def iter_span(self, start: int, stop: int, read_size: ReadSize) -> AsyncIterator[bytes]:
        """The bytes of ``[start, stop)``, read into memory (for TLS connections)."""
        async with contextlib.aclosing(self.extents(start, stop, read_size)) as extents:
            async for shared, position, length in extents:
                data = await in_thread(lambda fd: read_at(fd, position, length), shared)
                if len(data) < length:
                    raise FillFailed(f"blob {self.digest.short} is shorter than {self.size} bytes on disk")
                yield data

    async def extents(self, start: int, stop: int, limit: ReadSize) -> AsyncIterator[tuple[SharedFd, int, int]]:
        """``(file, position, length)`` runs covering ``[start, stop)`` in order, each on disk when
        yielded and at most ``limit()`` long: what sendfile or a read can take. ``file`` is this
        body's descriptor, open until ``close``."""
        if self._fill is None:
            assert self._fd is not None
            position = start
            while position < stop:
                n = min(limit(), stop - position)
                yield self._fd, position, n
                position += n
        else:
            async for extent in self._follow(self._fill, start, stop, limit):
                yield extent

    async def _follow(self, fill: Fill, start: int, stop: int, limit: ReadSize) -> AsyncIterator[tuple[SharedFd, int, int]]:
        """Follow the fill. A whole-blob response keeps its last bytes until the digest is
        verified, so a client that does not hash (curl) never gets wrong bytes with a clean end."""
        whole = start == 0 and stop == self.size
        demand = fill.add_demand(start)
        try:
            position = start
            while position < stop:
                n = fill.available(position, min(limit(), stop - position))
                if n == 0:
                    fill.raise_if_failed()
                    await fill.wait_progress(demand)
                    continue
                if self._fd is None:
                    self._fd = fill.reader_fd()
                extent = (self._fd, position, n)
                position += n
                demand.position, demand.waiting_since = position, None
                if whole and position == stop:
                    await fill.verified()
                yield extent
        finally:
            fill.remove_demand(demand)


class BlobService:
    def __init__(
        self, store: BlobStore, meta: Metadata, upstream: Upstream, engine: FillEngine, settings: Settings
    ) -> None:
        self._store, self._meta, self._upstream, self._engine = store, meta, upstream, engine
        self._offline = settings.offline
        self._min_free = settings.min_free_bytes
        self.serving: Counter[Digest] = Counter()  # open bodies per blob: never evicted
        self._touched: TTLCache[Digest, bool] = TTLCache(maxsize=65536, ttl=TOUCH_EVERY)

    async def size(self, name: Name, digest: Digest) -> int:
        """The blob's exact size, asking upstream only when nothing local knows it."""
        size = await asyncio.to_thread(self._store.blob_size, digest)
        if size is not None:
            return size
        fill = self._engine.get(digest)
        if fill is not None:
            return fill.size
        if self._offline:  # the shared bucket is no upstream: an offline replica fills from it
            size = await self._engine.replicas.blob_in_bucket(digest) if self._engine.replicas else None
            if size is None:
                raise BlobUnknown(f"blob {digest} is not cached and the mirror is offline")
            return size
        size = await asyncio.to_thread(self._meta.blob_size, digest)
        if size is None and self._engine.replicas is not None:
            size = await self._engine.replicas.blob_in_bucket(digest)
        if size is not None:
            return size
        try:
            size = await self._upstream.blob_size(name, digest)
        except UpstreamRefused as exc:
            if exc.status == 404:
                raise BlobUnknown(f"blob {digest} is unknown to upstream") from exc
            raise
        await asyncio.to_thread(self._meta.set_blob_sizes, {digest: size})
        return size

    async def open(self, name: Name, digest: Digest, from_peer: bool = False) -> BlobBody:
        """A body for the blob: from disk when verified, else from its (possibly new) fill.
        ``from_peer``: asked by another replica, so the fill must not turn to a peer for it."""
        fd = await asyncio.to_thread(self._store.open_blob, digest)
        if fd is not None:
            await self._touch(digest)
            return BlobBody(digest, os.fstat(fd).st_size, fd, None, self.serving)
        size = await self.size(name, digest)
        await self._check_space(digest, size)
        fill = self._engine.start(name, digest, size, self._upstream, from_peer)  # single flight: joins a running fill
        return BlobBody(digest, fill.size, None, fill)

    async def open_local(self, digest: Digest) -> BlobBody:
        """A body for a blob the mirror holds or is filling; nothing new is started (a request that
        names no model, such as one for a CDN URL, cannot say where to fill from)."""
        fd = await asyncio.to_thread(self._store.open_blob, digest)
        if fd is not None:
            await self._touch(digest)
            return BlobBody(digest, os.fstat(fd).st_size, fd, None, self.serving)
        fill = self._engine.get(digest)
        if fill is None:
            raise BlobUnknown(f"blob {digest} is not in the mirror; pull it by model name to fill it")
        return BlobBody(digest, fill.size, None, fill)

    async def ensure(self, name: Name, digest: Digest, size: int) -> Fill | None:
        """Start filling the blob unless it is stored; the size comes from its manifest."""
        if await asyncio.to_thread(self._store.blob_size, digest) is not None:
            return None
        if self._offline:
            raise BlobUnknown(f"blob {digest} is not cached and the mirror is offline")
        await self._check_space(digest, size)
        return self._engine.start(name, digest, size, self._upstream)

    async def check_room(self, manifest: Manifest) -> None:
        """Raise ``StoreFull`` now if a blob of ``manifest`` that is neither stored nor filling could
        not be filled: Ollama prints the reason of a failed manifest, but of a failed blob only
        "context deadline exceeded", 30 s later."""
        if self._offline:
            return
        unfilled = [b for b in manifest.blobs if self._engine.get(b.digest) is None]
        stored = await asyncio.to_thread(
            lambda: {b.digest for b in unfilled if self._store.blob_size(b.digest) is not None})
        for layer in sorted(unfilled, key=lambda b: -b.size):
            if layer.digest not in stored:
                await self._check_space(layer.digest, layer.size)

    async def _check_space(self, digest: Digest, size: int) -> None:
        if self._engine.get(digest) is None:  # a running fill holds its space already
            try:
                await asyncio.to_thread(self._store.check_space, digest, size, self._min_free)
            except StoreFull as exc:
                log.warning("fill refused digest=%s size=%d reason=%s", digest.short, size, exc)
                raise

    async def _touch(self, digest: Digest) -> None:
        """Record the access for eviction, at most once a minute per blob."""
        if digest not in self._touched:
            self._touched[digest] = True
            await asyncio.to_thread(self._meta.touch_blob, digest)
