"""Fetching one fill's missing bytes: parallel Range requests into its staging file, and the hash.

``connections`` workers share the fill's ``ChunkMap``: each claims a chunk (demand first, see
``chunks.py``), streams it in one request from its edge to its end, and writes what arrives with
positional writes. A hasher follows the contiguous prefix as it grows, so the sha256 is almost
done when the last byte lands. Failures are retried from the byte each connection reached; an
expired CDN URL is resolved again, once for all connections.

An upstream that ignores ``Range`` (a 200 with the whole body) would send the whole blob again for
every chunk: the first such answer switches the fill to one stream that reads the body in order.

Every disk call runs in a worker thread holding the staging file's descriptor (``fds``): a
cancelled fill never lets a thread write into a number the next ``open`` or ``accept`` took.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from .chunks import Chunk
from .concurrency import WINDOW, Adaptive, ConnectionBudget
from .config import Settings
from .errors import FillFailed, RangeIgnored, UpstreamError, UpstreamUnavailable, UpstreamUrlExpired
from .fds import in_thread
from .fill import WAKE_TIMEOUT, Fill, wait_event
from .store import hash_at, write_at
from .upstream import BlobLocation, Upstream

log = logging.getLogger("mirror.fill")

WRITE_SIZE = 1 << 20  # bytes gathered from upstream before one pwrite
WRITE_AFTER = 0.2  # ... or seconds, on a slow stream: readers see bytes soon after they came
HASH_SIZE = 8 << 20  # bytes hashed per thread hop
SAVE_INTERVAL = 1.0  # seconds between saves of the chunk map (only when it changed)
SAVE_BYTES = 8 << 20  # ... or as soon as this much landed, at most four saves a second
DEMAND_PATIENCE = 2.0  # a reader blocked this long may cut another stream short (Ollama gives up at 30 s)
MAX_BACKOFF = 30.0
WHOLE = "whole"  # the owner of chunks written by the one-stream fallback

T = TypeVar("T")


class Download:
    def __init__(self, fill: Fill, upstream: Upstream, settings: Settings, budget: ConnectionBudget) -> None:
        assert fill.map is not None and fill.staging is not None
        self.fill, self.map, self.staging = fill, fill.map, fill.staging
        self._upstream, self._settings, self._budget = upstream, settings, budget
        self.adaptive = Adaptive(pinned=settings.connections or None)
        fill.connections = self.connection_count()
        self._workers: set[int] = set()  # ids of the running workers; each holds one of the budget's connections
        self._warm: set[int] = set()  # workers whose streams have delivered bytes (past slow start)
        self._group: asyncio.TaskGroup | None = None
        self._location: BlobLocation | None = None
        self._resolving = asyncio.Lock()
        self._work = asyncio.Event()
        self._idle_workers = 0
        self._dirty = False
        self._landed_event = asyncio.Event()  # the hasher's wake-up (readers have their own, on their loop)
        self._one_stream = False  # upstream ignores Range: one worker reads the body in order
        # The first request goes alone: if upstream ignores Range, each of the others would get a
        # whole body too. It is set once an answer says whether ranges work.
        self._probed = asyncio.Event()
        here = asyncio.get_running_loop()
        fill.on_reader_blocked = lambda: here.call_soon_threadsafe(self._wake_workers)

    def connection_count(self) -> int:
        """The connections this fill runs at its target: fewer for a blob of fewer chunks, or
        when its share of ``--upstream-connections`` is smaller."""
        return min(self.adaptive.target, len(self.map.chunks), self._budget.share())

    def workers_wanted(self) -> int:
        return max(min(self.adaptive.target, sum(not c.done for c in self.map.chunks)), 0)

    async def run(self) -> str:
        """Resolve the CDN URL, run the workers, the hasher, the pacer and the saver; the sha256
        hex of the bytes."""
        self._location = await self._with_retries(self._resolve)
        self._budget.join(self.fill)
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                saver = group.create_task(self._save_loop())
                pacer = group.create_task(self._pace())
                hasher = group.create_task(self._hash())
                self._spawn_workers()
                actual = await hasher
                saver.cancel()
                pacer.cancel()
        finally:
            self._group = None
            self._budget.leave(self.fill)
        return actual

    # -- how many connections ------------------------------------------------------------------

    def _spawn_workers(self) -> None:
        """Start workers up to the target, as far as the shared budget allows."""
        if self._group is None or self._one_stream:
            return
        wanted = min(self.workers_wanted(), self._allowed())
        for wid in range(wanted):
            if wid not in self._workers and self._budget.take(self.fill):
                self._workers.add(wid)
                self._group.create_task(self._worker(wid))

    async def _pace(self) -> None:
        """Measure the aggregate rate of each connection count over a window in which all of its
        workers had work, and step the count (``concurrency.Adaptive``); keep the workers at the
        count as the shared budget allows, for the whole fill."""
        since, landed, count = time.monotonic(), self.fill.fetched, len(self._workers)
        while True:
            await asyncio.sleep(0.25)
            self._spawn_workers()  # the budget may have room again, or the target grew
            now = time.monotonic()
            if (self.adaptive.settled or len(self._workers) != count or self._idle_workers
                    or not self._warm >= self._workers):
                since, landed, count = now, self.fill.fetched, len(self._workers)  # a new window
                continue
            if now - since < WINDOW:
                continue
            rate = (self.fill.fetched - landed) / (now - since)
            if self.adaptive.measured(count, rate):
                self.fill.connections = self.connection_count()
                self._spawn_workers()
            if self.adaptive.settled:
                log.info("fill settled digest=%s connections=%d mb_s=%.1f", self.fill.digest.short,
                         self.adaptive.target, max(self.adaptive.rates.values(), default=rate) / 1e6)
            since, landed, count = now, self.fill.fetched, len(self._workers)

    def _wake_workers(self) -> None:
        """Idle workers look for work again. A new event each time: one left set would have
        them spin on the event loop, starving the streams still running (the tail of every
        fill came in at half speed)."""
        self._work.set()
        self._work = asyncio.Event()

    def _allowed(self) -> int:
        """Workers this fill may run now: its target, within its share of the budget."""
        return min(self.adaptive.target, self._budget.share())

    # -- the CDN URL, retries ----------------------------------------------------------------

    async def _resolve(self) -> BlobLocation:
        version = self._location.version if self._location else 0
        return await self._upstream.resolve_blob(self.fill.name, self.fill.digest, version)

    async def _resolve_again(self, seen: BlobLocation | None) -> None:
        """Resolve the CDN URL anew, once for all workers that saw it expire."""
        async with self._resolving:
            if self._location is seen:
                log.info("fill resolve digest=%s reason=CDN URL refused or expired", self.fill.digest.short)
                self._location = await self._resolve()

    async def _with_retries(self, action: Callable[[], Awaitable[T]]) -> T:
        failures = 0
        while True:
            try:
                return await action()
            except UpstreamError as exc:
                failures += 1
                if not exc.retryable or failures > self._settings.max_retries:
                    raise
                await self._backoff(failures, exc)

    async def _backoff(self, failures: int, exc: UpstreamError) -> None:
        self.fill.retries += 1
        delay = min(0.5 * 2 ** (failures - 1), MAX_BACKOFF) * random.uniform(0.8, 1.2)
        if isinstance(exc, UpstreamUnavailable) and exc.retry_after is not None:
            delay = min(max(delay, exc.retry_after), 2 * MAX_BACKOFF)
        log.warning("fill retry digest=%s try=%d wait_s=%.1f reason=%s", self.fill.digest.short, failures, delay, exc)
        await asyncio.sleep(delay)

    async def _after_error(self, error: UpstreamError, failures: int, location: BlobLocation | None) -> None:
        """Retry what may pass, from where it stopped; give up after ``max_retries`` without progress."""
        if not error.retryable:
            raise error
        if error.detail.get("status") in (429, 503) and self.adaptive.throttled(time.monotonic()):
            self.fill.connections = self.connection_count()
            log.warning("fill backoff digest=%s connections=%d reason=%s", self.fill.digest.short,
                        self.adaptive.target, error)
        if failures > self._settings.max_retries:
            raise FillFailed(f"gave up after {failures} tries without progress: {error}") from error
        if isinstance(error, UpstreamUrlExpired):
            await self._resolve_again(location)
        await self._backoff(max(failures, 1), error)

    # -- workers ------------------------------------------------------------------------------

    async def _worker(self, wid: int) -> None:
        try:
            await self._work_on(wid)
        finally:
            self._workers.discard(wid)
            self._warm.discard(wid)
            self._budget.give_back(self.fill)

    async def _work_on(self, wid: int) -> None:
        if wid:
            await self._probed.wait()
        failures = 0
        while not self.map.complete and not self._one_stream and wid < self._allowed():
            chunk = self.map.claim(wid, *self._demand_positions())
            if chunk is None:
                self._idle_workers += 1
                try:
                    await wait_event(self._work, WAKE_TIMEOUT)
                finally:
                    self._idle_workers -= 1
                continue
            # Let the other workers claim before this one sizes its request, so that the
            # requests of a fresh fill tile the blob instead of overlapping.
            await asyncio.sleep(0)
            location = self._location
            written, error = await self._stream(wid, chunk)
            if isinstance(error, RangeIgnored):
                if not self._one_stream:
                    await self._read_in_one_stream()
                return
            if error is None:
                failures = 0
                continue
            failures = 0 if written else failures + 1
            await self._after_error(error, failures, location)

    async def _stream(self, wid: int, chunk: Chunk) -> tuple[int, UpstreamError | None]:
        """Fetch ``chunk`` from its edge to its end, in one request.

        Returns the bytes written and the upstream error that ended it, if any. Bytes
        that arrived before a fault are written too: a retry resumes after them.
        """
        assert self._location is not None
        stream = _Stream(self, chunk, wid)
        try:
            async with self._upstream.open_range(self._location, stream.position, chunk.stop, self.fill.size) as body:
                self._probed.set()  # a 206: ranges work, every connection may start
                async for piece in body:
                    stream.add(piece)
                    if stream.full and not await stream.flush():
                        return stream.written, None
            await stream.flush()
            return stream.written, None
        except UpstreamError as exc:
            await stream.flush()
            if not isinstance(exc, RangeIgnored):
                self._probed.set()  # no answer about ranges: the others try too
            return stream.written, exc
        finally:
            self.map.release(wid)
            self._wake_workers()

    def _landed(self, chunk: Chunk, n: int) -> None:
        chunk.advance(n)
        self._dirty = True
        self._landed_event.set()
        self._landed_event = asyncio.Event()
        self.fill.landed(n)

    def _should_yield(self) -> bool:
        """A reader has waited too long for bytes a freed connection would fetch, and no worker is free."""
        if self._idle_workers or self._one_stream:
            return False
        now = time.monotonic()
        for demand in list(self.fill.demands):
            if demand.waiting_since is None or now - demand.waiting_since < DEMAND_PATIENCE:
                continue
            if self.map.can_cut_in(demand.position):
                return True
        return False

    def _demand_positions(self) -> tuple[list[int], list[int], list[int]]:
        """Reader positions for ``ChunkMap.claim``: urgent and waiting (oldest first), and all."""
        now = time.monotonic()
        demands = list(self.fill.demands)  # readers change the list from their own thread
        waiting = sorted((d for d in demands if d.waiting_since is not None), key=lambda d: d.waiting_since or 0.0)
        urgent = [d.position for d in waiting if now - (d.waiting_since or now) >= DEMAND_PATIENCE]
        return urgent, [d.position for d in waiting], [d.position for d in demands]

    # -- an upstream that ignores Range ---------------------------------------------------------

    async def _read_in_one_stream(self) -> None:
        """Read the blob in order in one request per try, writing only bytes not yet on disk.

        The first ``RangeIgnored`` lands here; the other workers stop at their next claim. A retry
        asks from the first missing byte, in case the upstream honours Range after all."""
        self._one_stream = True
        self._probed.set()  # the waiting workers see the switch and stop
        log.warning("fill one-stream digest=%s reason=upstream answers Range requests with the whole blob; "
                    "reading it in one stream", self.fill.digest.short)
        self._wake_workers()
        while any(c.owner is not None for c in self.map.chunks):  # streams still running stop at their next write
            await wait_event(self._work, WAKE_TIMEOUT)
        failures = 0
        while not self.map.complete:
            start = next(c.edge for c in self.map.chunks if not c.done)
            location, before = self._location, self.map.done_bytes
            assert location is not None
            try:
                async with self._upstream.open_range(location, start, self.fill.size, self.fill.size,
                                                     accept_whole=True) as body:
                    await self._write_in_order(start, body)
                failures = 0
            except UpstreamError as exc:
                failures = 0 if self.map.done_bytes > before else failures + 1
                await self._after_error(exc, failures, location)

    async def _write_in_order(self, position: int, body: Any) -> None:
        """Write the body's bytes from ``position`` on into the chunks whose edge they reach."""
        chunk: Chunk | None = None
        stream: _Stream | None = None
        try:
            async for piece in body:
                view = memoryview(piece)
                while view:
                    if chunk is None or position >= chunk.stop:
                        if stream is not None:
                            await stream.flush()
                            self.map.release(WHOLE)
                        chunk = self.map.chunk_at(position)
                        chunk.owner = WHOLE
                        stream = _Stream(self, chunk)
                    skip = min(max(chunk.edge - position, 0), len(view))  # already on disk: never rewritten
                    take = min(len(view) - skip, chunk.stop - position - skip)
                    if take and stream is not None:
                        stream.add(bytes(view[skip:skip + take]))
                        if stream.full:
                            await stream.flush()
                    position += skip + take
                    view = view[skip + take:]
        finally:
            if stream is not None:
                await stream.flush()
            self.map.release(WHOLE)

    # -- hashing, saving ------------------------------------------------------------------------

    async def _hash(self) -> str:
        """sha256 of the contiguous prefix as it grows; done when the last byte is on disk."""
        h = hashlib.sha256()
        buffer = bytearray(min(HASH_SIZE, self.fill.size))  # reused: a fresh 8 MiB per read is page faults
        position = 0
        while position < self.fill.size:
            n = self.map.available(position, len(buffer))
            if n == 0:
                await wait_event(self._landed_event, WAKE_TIMEOUT)
                continue
            at, view = position, memoryview(buffer)[:n]
            await in_thread(lambda fd: hash_at(h, fd, at, view), self.staging)
            position += n
        self._wake_workers()  # idle workers notice the map is complete
        return h.hexdigest()

    async def _save_loop(self) -> None:
        """Save the chunk map once a second, or sooner when many bytes landed since the last save:
        what a kill costs is what landed after it."""
        saved_at, saved_bytes = time.monotonic(), self.fill.fetched
        while True:
            await asyncio.sleep(SAVE_INTERVAL / 4)
            now, landed = time.monotonic(), self.fill.fetched - saved_bytes
            if self._dirty and (now - saved_at >= SAVE_INTERVAL or landed >= SAVE_BYTES):
                self._dirty = False
                saved_at, saved_bytes = now, self.fill.fetched
                await asyncio.to_thread(self.fill.save_progress)


class _Stream:
    """One range response being written into the staging file."""

    def __init__(self, download: Download, chunk: Chunk, wid: int | None = None) -> None:
        self.download, self.chunk, self.wid = download, chunk, wid
        self.position = chunk.edge
        self.written = 0
        self._pending: list[bytes] = []
        self._pending_len = 0
        self._pending_since = 0.0

    def add(self, piece: bytes) -> None:
        if not self._pending:
            self._pending_since = time.monotonic()
        self._pending.append(piece)
        self._pending_len += len(piece)

    @property
    def full(self) -> bool:
        """Enough for one write, the end of the chunk, or bytes that have waited long enough."""
        return (self._pending_len >= WRITE_SIZE or self.position + self._pending_len >= self.chunk.stop
                or time.monotonic() - self._pending_since >= WRITE_AFTER)

    async def flush(self) -> bool:
        """Write what arrived; False when the stream should end here."""
        download = self.download
        if not self._pending:
            return True
        pieces, total = self._pending, self._pending_len
        self._pending, self._pending_len = [], 0
        # A steal may have shortened the chunk meanwhile: what lies past its end is another's.
        n = min(total, self.chunk.stop - self.position)
        if n > 0:
            at, kept = self.position, _first_bytes(pieces, n)
            await in_thread(lambda fd: write_at(fd, kept, at), download.staging)
            self.position += n
            self.written += n
            download._landed(self.chunk, n)
            if self.wid is not None:
                download._warm.add(self.wid)
        if download._one_stream and self.chunk.owner != WHOLE:
            return False  # the one stream takes over from here
        return not self.chunk.done and not download._should_yield()


def _first_bytes(pieces: list[bytes], n: int) -> list[bytes]:
    """The pieces holding the first ``n`` bytes, the last one cut to fit."""
    kept: list[bytes] = []
    for piece in pieces:
        if n <= 0:
            break
        kept.append(piece if len(piece) <= n else piece[:n])
        n -= len(piece)
    return kept
