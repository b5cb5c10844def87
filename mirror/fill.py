"""The fill engine: one upstream fill per blob, however many clients ask.

A ``Fill`` fetches one blob into a preallocated staging file with parallel
Range requests (``connections`` workers sharing a ``ChunkMap``), hashes the
contiguous prefix as it grows, and publishes the file under its final name only
when the sha256 matches. Readers follow it by position: they ask how many bytes
from their offset are on disk, and when none are, they register demand there,
which steers the next free connection to them.

No client request owns a fill: the ``FillEngine`` does, so a client hanging up
never cancels it. Progress is saved to metadata every second, so a fill killed
mid-way resumes from the bytes it had.

Two processes on one cache coordinate through an flock on the digest's lock
file: the one holding it fills; the other waits for the final blob or the lock.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import time
from collections.abc import Callable
from enum import Enum, auto
from typing import Any

from .chunks import SPLIT_MIN, Chunk, ChunkMap
from .config import Settings
from .errors import (
    DigestMismatch,
    FillFailed,
    MirrorError,
    UpstreamError,
    UpstreamInvalid,
    UpstreamUnavailable,
    UpstreamUrlExpired,
)
from .metadata import Metadata
from .names import Digest, Name
from .store import BlobStore, write_at
from .upstream import BlobLocation, Upstream

log = logging.getLogger("mirror.fill")

WRITE_SIZE = 1 << 20  # bytes gathered from upstream before one pwrite
HASH_SIZE = 8 << 20  # bytes hashed per thread hop
SAVE_INTERVAL = 1.0  # seconds between saves of the chunk map (only when it changed)
DEMAND_PATIENCE = 2.0  # a reader blocked this long may cut another stream short (Ollama gives up at 30 s)
WAKE_TIMEOUT = 1.0  # upper bound on any wait, so a lost wake-up never hangs anything
MAX_BACKOFF = 30.0


class FillState(Enum):
    STARTING = auto()  # waiting for the lock, opening staging, resolving the CDN URL
    RUNNING = auto()  # workers fetching chunks, hasher following the prefix
    VERIFYING = auto()  # every byte on disk, comparing the digest
    DONE = auto()  # published under its final name
    FAILED = auto()  # gave up; ``error`` says why; staging kept unless the bytes were wrong


class Demand:
    """A reader's position in the blob; ``waiting_since`` is set while it has no bytes to read."""

    __slots__ = ("position", "waiting_since")

    def __init__(self, position: int) -> None:
        self.position = position
        self.waiting_since: float | None = None


def chunk_size_for(size: int, settings: Settings) -> int:
    """Smaller blobs get smaller chunks, so every connection has work."""
    per_connection = -(-size // settings.connections)
    return max(min(settings.chunk_size, per_connection), min(SPLIT_MIN, settings.chunk_size), 1)


class Fill:
    def __init__(
        self,
        name: Name,
        digest: Digest,
        size: int,
        *,
        store: BlobStore,
        meta: Metadata,
        upstream: Upstream,
        settings: Settings,
    ) -> None:
        self.name = name
        self.digest = digest
        self.size = size
        self.state = FillState.STARTING
        self.error: MirrorError | None = None
        self.map: ChunkMap | None = None
        self.fetched = 0  # bytes received from upstream by this run
        self.resumed = 0  # bytes already on disk when this run started
        self.retries = 0
        self.started = time.monotonic()
        self._store, self._meta, self._upstream, self._settings = store, meta, upstream, settings
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._location: BlobLocation | None = None
        self._resolving: asyncio.Lock = asyncio.Lock()
        self._demands: list[Demand] = []
        self._progress = asyncio.Event()
        self._work = asyncio.Event()
        self._idle_workers = 0
        self._dirty = False
        self._finished = asyncio.Event()

    def __repr__(self) -> str:
        return f"Fill({self.digest.short}, {self.state.name}, {self.done_bytes}/{self.size})"

    # -- the readers' side ----------------------------------------------------------

    @property
    def done_bytes(self) -> int:
        if self.state is FillState.DONE:
            return self.size
        return self.map.done_bytes if self.map is not None else 0

    @property
    def waiting_clients(self) -> int:
        return len(self._demands)

    def available(self, position: int, limit: int) -> int:
        """Bytes from ``position`` a reader may read now (at most ``limit``)."""
        if self.state is FillState.DONE:
            return max(min(self.size - position, limit), 0)
        if self.map is None or self.state is FillState.FAILED:
            return 0
        return self.map.available(position, limit)

    def reader_fd(self) -> int:
        """A descriptor of the reader's own: it stays valid after publish renames the file."""
        if self._fd is not None:
            return os.dup(self._fd)
        fd = self._store.open_blob(self.digest)
        if fd is None:
            raise FillFailed(f"blob {self.digest.short} is neither filling nor stored")
        return fd

    def raise_if_failed(self) -> None:
        if self.state is FillState.FAILED:
            raise FillFailed(f"fill of {self.digest.short} failed: {self.error}") from self.error

    async def verified(self) -> None:
        """Return once the blob is published; raise if the fill failed."""
        await self._finished.wait()
        self.raise_if_failed()

    def add_demand(self, position: int) -> Demand:
        demand = Demand(position)
        self._demands.append(demand)
        return demand

    def remove_demand(self, demand: Demand) -> None:
        self._demands.remove(demand)

    async def wait_progress(self, demand: Demand) -> None:
        """Block a reader until more bytes land (or a second passes)."""
        if demand.waiting_since is None:
            demand.waiting_since = time.monotonic()
            self._wake_workers()  # an idle connection may now serve this position
        await _wait(self._progress, WAKE_TIMEOUT)

    def _notify(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()

    def _wake_workers(self) -> None:
        """Idle workers look for work again. A new event each time: one left set would have
        them spin on the event loop, starving the streams still running (the tail of every
        fill came in at half speed)."""
        self._work.set()
        self._work = asyncio.Event()

    # -- the fill ---------------------------------------------------------------------

    async def run(self) -> None:
        """Fill, verify and publish; never raises except on cancellation."""
        try:
            if not await self._acquire():
                self.state = FillState.DONE  # another process published it meanwhile
                return
            await asyncio.to_thread(self._open_staging)
            self.state = FillState.RUNNING
            self._notify()
            log.info(
                "fill start digest=%s size=%d connections=%d resumed=%d",
                self.digest.short, self.size, self._workers_wanted(), self.resumed,
            )
            self._location = await self._with_retries(self._resolve)
            actual = await self._fetch_all()
            self.state = FillState.VERIFYING
            if actual != self.digest.hex:
                raise DigestMismatch(str(self.digest), f"sha256:{actual}")
            await asyncio.to_thread(self._publish)
            self.state = FillState.DONE
            self._log_done()
        except asyncio.CancelledError:
            self._fail(FillFailed("the mirror is shutting down"))
            await asyncio.shield(asyncio.to_thread(self._save_progress))
            log.info("fill paused digest=%s done=%d/%d reason=shutdown; it resumes on the next request",
                     self.digest.short, self.done_bytes, self.size)
            raise
        except Exception as exc:
            self._fail(_first_error(exc))
            await asyncio.to_thread(self._after_failure)
        finally:
            self._close()

    async def _acquire(self) -> bool:
        """Own the fill across processes; False when the blob got published while we waited.

        While another process fills the blob, our readers follow its progress: the chunk
        map it saves every second and the staging file it writes, so clients are served
        as the bytes land there too (Ollama gives up on a part after 30 s without bytes).
        """
        announced = False
        while True:
            self._lock_fd = await asyncio.to_thread(self._store.try_lock, self.digest)
            if self._lock_fd is not None:
                return await asyncio.to_thread(self._store.blob_size, self.digest) is None
            if await asyncio.to_thread(self._store.blob_size, self.digest) is not None:
                return False
            if not announced:
                log.info("fill wait digest=%s reason=another process is filling it; following its progress",
                         self.digest.short)
                announced = True
            await asyncio.to_thread(self._follow)
            self._notify()
            await asyncio.sleep(0.5)

    def _follow(self) -> None:
        """Take the other process's saved chunk map, and a read-only view of its staging file."""
        if self._fd is None:
            try:
                self._fd = os.open(self._store.layout.staging_data(self.digest), os.O_RDONLY)
            except FileNotFoundError:
                return
        saved = self._meta.fill_progress(self.digest)
        if saved and saved.get("size") == self.size:
            self.map = ChunkMap.from_state(self.size, saved.get("chunks", [])) or self.map

    def _open_staging(self) -> None:
        if self._fd is not None:  # the read-only view used while following another process
            os.close(self._fd)
            self._fd = None
        fd, existed = self._store.open_staging(self.digest, self.size, self._settings.min_free_bytes)
        self._fd = fd
        saved = self._meta.fill_progress(self.digest) if existed else None
        if not existed:
            self._meta.forget_fill(self.digest)
        if saved and saved.get("size") == self.size:
            self.map = ChunkMap.from_state(self.size, saved.get("chunks", []))
        if self.map is None:
            self.map = ChunkMap.empty(self.size, chunk_size_for(self.size, self._settings))
        self.resumed = self.map.done_bytes

    def _workers_wanted(self) -> int:
        assert self.map is not None
        return max(min(self._settings.connections, sum(not c.done for c in self.map.chunks)), 0)

    async def _fetch_all(self) -> str:
        """Run the workers, the hasher and the progress saver; return the sha256 hex of the bytes."""
        async with asyncio.TaskGroup() as group:
            saver = group.create_task(self._save_loop())
            hasher = group.create_task(self._hash())
            for i in range(self._workers_wanted()):
                group.create_task(self._worker(i))
            actual = await hasher
            saver.cancel()
        return actual

    async def _resolve(self) -> BlobLocation:
        version = self._location.version if self._location else 0
        return await self._upstream.resolve_blob(self.name, self.digest, version)

    async def _resolve_again(self, seen: BlobLocation | None) -> None:
        """Resolve the CDN URL anew, once for all workers that saw it expire."""
        async with self._resolving:
            if self._location is seen:
                log.info("fill resolve digest=%s reason=CDN URL refused or expired", self.digest.short)
                self._location = await self._resolve()

    async def _with_retries(self, action: Any) -> Any:
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
        self.retries += 1
        delay = min(0.5 * 2 ** (failures - 1), MAX_BACKOFF) * random.uniform(0.8, 1.2)
        if isinstance(exc, UpstreamUnavailable) and exc.retry_after is not None:
            delay = min(max(delay, exc.retry_after), 2 * MAX_BACKOFF)
        log.warning(
            "fill retry digest=%s try=%d wait_s=%.1f reason=%s", self.digest.short, failures, delay, exc
        )
        await asyncio.sleep(delay)

    # -- workers ------------------------------------------------------------------------

    async def _worker(self, wid: int) -> None:
        assert self.map is not None
        failures = 0
        while not self.map.complete:
            chunk = self.map.claim(wid, *self._demand_positions())
            if chunk is None:
                self._idle_workers += 1
                try:
                    await _wait(self._work, WAKE_TIMEOUT)
                finally:
                    self._idle_workers -= 1
                continue
            # Let the other workers claim before this one sizes its request, so that the
            # requests of a fresh fill tile the blob instead of overlapping.
            await asyncio.sleep(0)
            location = self._location
            written, error = await self._stream(wid, chunk)
            if error is None:
                failures = 0
                continue
            failures = 0 if written else failures + 1
            if not error.retryable:
                raise error
            if failures > self._settings.max_retries:
                raise FillFailed(f"gave up after {failures} tries without progress: {error}") from error
            if isinstance(error, UpstreamUrlExpired):
                await self._resolve_again(location)
            await self._backoff(max(failures, 1), error)

    async def _stream(self, wid: int, chunk: Chunk) -> tuple[int, UpstreamError | None]:
        """Fetch ``chunk`` from its edge to its end, in one request.

        Returns the bytes written and the upstream error that ended it, if any. Bytes
        that arrived before a fault are written too: a retry resumes after them.
        """
        assert self._location is not None and self.map is not None
        stream = _Stream(self, chunk)
        try:
            async with self._upstream.open_range(self._location, stream.position, chunk.stop, self.size) as body:
                async for piece in body:
                    stream.add(piece)
                    if stream.full and not await stream.flush():
                        return stream.written, None
            await stream.flush()
            return stream.written, None
        except UpstreamError as exc:
            await stream.flush()
            return stream.written, exc
        finally:
            self.map.release(wid)
            self._wake_workers()

    def _landed(self, chunk: Chunk, n: int) -> None:
        chunk.advance(n)
        self.fetched += n
        self._dirty = True
        self._notify()

    def _should_yield(self) -> bool:
        """A reader has waited too long for a chunk nobody is fetching, and no worker is free."""
        if self._idle_workers or self.map is None:
            return False
        now = time.monotonic()
        for demand in self._demands:
            if demand.waiting_since is None or now - demand.waiting_since < DEMAND_PATIENCE:
                continue
            if not 0 <= demand.position < self.size:
                continue
            c = self.map.chunk_at(demand.position)
            if c.owner is None and not c.done or demand.position - c.edge >= SPLIT_MIN:
                return True
        return False

    def _demand_positions(self) -> tuple[list[int], list[int], list[int]]:
        """Reader positions for ``ChunkMap.claim``: urgent and waiting (oldest first), and all."""
        now = time.monotonic()
        waiting = sorted((d for d in self._demands if d.waiting_since is not None),
                         key=lambda d: d.waiting_since or 0.0)
        urgent = [d.position for d in waiting if now - (d.waiting_since or now) >= DEMAND_PATIENCE]
        return urgent, [d.position for d in waiting], [d.position for d in self._demands]

    # -- hashing, saving, publishing --------------------------------------------------

    async def _hash(self) -> str:
        """sha256 of the contiguous prefix as it grows; done when the last byte is on disk."""
        assert self.map is not None and self._fd is not None
        h = hashlib.sha256()
        buffer = bytearray(min(HASH_SIZE, self.size))  # reused: a fresh 8 MiB per read is page faults
        position = 0
        while position < self.size:
            n = self.map.available(position, len(buffer))
            if n == 0:
                await _wait(self._progress, WAKE_TIMEOUT)
                continue
            await asyncio.to_thread(_hash_range, h, self._fd, position, memoryview(buffer)[:n])
            position += n
        self._wake_workers()  # idle workers notice the map is complete
        return h.hexdigest()

    async def _save_loop(self) -> None:
        while True:
            await asyncio.sleep(SAVE_INTERVAL)
            if self._dirty:
                self._dirty = False
                await asyncio.to_thread(self._save_progress)

    def _save_progress(self) -> None:
        if self.map is not None and self._fd is not None and self.state is not FillState.DONE:
            self._meta.set_fill_progress(self.digest, {"size": self.size, "chunks": self.map.to_state()})

    def _publish(self) -> None:
        assert self._fd is not None
        self._store.publish(self.digest, self._fd)
        self._meta.forget_fill(self.digest)
        self._meta.set_blob_sizes({self.digest: self.size})
        self._meta.touch_blob(self.digest)

    def _fail(self, error: MirrorError) -> None:
        self.error = error
        self.state = FillState.FAILED
        self._notify()
        self._wake_workers()

    def _after_failure(self) -> None:
        """Keep resumable progress; throw away bytes that were wrong."""
        error = self.error
        if isinstance(error, DigestMismatch | UpstreamInvalid):
            self._store.discard_staging(self.digest)
            self._meta.forget_fill(self.digest)
            self._meta.forget_blob_size(self.digest)
            log.warning(
                "fill discard digest=%s size=%d reason=%s", self.digest.short, self.size, error
            )
        else:
            self._save_progress()
            log.warning(
                "fill failed digest=%s done=%d/%d seconds=%.1f reason=%s",
                self.digest.short, self.done_bytes, self.size, time.monotonic() - self.started, error,
            )

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._lock_fd is not None:
            self._store.unlock(self._lock_fd)
            self._lock_fd = None
        self._finished.set()
        self._notify()
        self._wake_workers()

    def _log_done(self) -> None:
        seconds = max(time.monotonic() - self.started, 1e-6)
        log.info(
            "fill done digest=%s bytes=%d fetched=%d seconds=%.2f mb_s=%.1f retries=%d",
            self.digest.short, self.size, self.fetched, seconds, self.fetched / seconds / 1e6, self.retries,
        )


class _Stream:
    """One range response being written into the staging file."""

    def __init__(self, fill: Fill, chunk: Chunk) -> None:
        self.fill, self.chunk = fill, chunk
        self.position = chunk.edge
        self.written = 0
        self._pending: list[bytes] = []
        self._pending_len = 0

    def add(self, piece: bytes) -> None:
        self._pending.append(piece)
        self._pending_len += len(piece)

    @property
    def full(self) -> bool:
        """Enough for one write, or the end of the chunk."""
        return self._pending_len >= WRITE_SIZE or self.position + self._pending_len >= self.chunk.stop

    async def flush(self) -> bool:
        """Write what arrived; False when the stream should end here."""
        fill = self.fill
        assert fill._fd is not None
        if not self._pending:
            return True
        pieces, total = self._pending, self._pending_len
        self._pending, self._pending_len = [], 0
        # A steal may have shortened the chunk meanwhile: what lies past its end is another's.
        n = min(total, self.chunk.stop - self.position)
        if n > 0:
            await asyncio.to_thread(write_at, fill._fd, _first_bytes(pieces, n), self.position)
            self.position += n
            self.written += n
            fill._landed(self.chunk, n)
        return not self.chunk.done and not fill._should_yield()


class FillEngine:
    """Owns every fill: one per digest, started on first demand, kept alive by itself."""

    def __init__(self, store: BlobStore, meta: Metadata, settings: Settings) -> None:
        self._store, self._meta, self._settings = store, meta, settings
        self._fills: dict[Digest, Fill] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.finished: list[Callable[[Fill], None]] = []  # told of every fill that ended (metrics, eviction)
        self.closed = False

    def get(self, digest: Digest) -> Fill | None:
        return self._fills.get(digest)

    @property
    def active(self) -> list[Fill]:
        return list(self._fills.values())

    def start(self, name: Name, digest: Digest, size: int, upstream: Upstream) -> Fill:
        """The running fill for ``digest``, or a new one. No await: the check and the insert are atomic.

        A fill that has just failed is replaced at once: the new one waits for the old one's
        lock, then resumes from the progress it saved.
        """
        fill = self._fills.get(digest)
        if fill is not None and fill.state is not FillState.FAILED:
            return fill
        if self.closed:
            raise FillFailed("the mirror is shutting down; the fill resumes when it is back")
        fill = Fill(
            name, digest, size, store=self._store, meta=self._meta, upstream=upstream,
            settings=self._settings,
        )
        self._fills[digest] = fill
        task = asyncio.get_running_loop().create_task(fill.run(), name=f"fill {digest.short}")
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._forget(digest, fill, t))
        return fill

    def _forget(self, digest: Digest, fill: Fill, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._fills.get(digest) is fill:
            del self._fills[digest]
        for listener in self.finished:
            listener(fill)

    async def close(self) -> None:
        """Cancel every fill and start no more; each saves its progress on the way out."""
        self.closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _wait(event: asyncio.Event, timeout: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        pass


def _first_bytes(pieces: list[bytes], n: int) -> list[bytes]:
    """The pieces holding the first ``n`` bytes, the last one cut to fit."""
    kept: list[bytes] = []
    for piece in pieces:
        if n <= 0:
            break
        kept.append(piece if len(piece) <= n else piece[:n])
        n -= len(piece)
    return kept


def _hash_range(h: Any, fd: int, position: int, into: memoryview) -> None:
    """Hash the bytes at ``position``, read into ``into`` (filled whole: the bytes are on disk)."""
    done = 0
    while done < len(into):
        n = os.preadv(fd, [into[done:]], position + done)
        if n == 0:
            raise OSError(f"staging file ends at {position + done}, before the bytes the chunk map counts")
        done += n
    h.update(into)


def _first_error(exc: BaseException) -> MirrorError:
    """The error to report: unwrap task groups; anything not ours is a bug, wrapped and logged."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    if isinstance(exc, MirrorError):
        return exc
    log.error("fill bug: %r", exc, exc_info=exc)
    wrapped = FillFailed(f"internal error: {exc!r}")
    wrapped.__cause__ = exc
    return wrapped
