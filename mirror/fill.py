"""The fill engine: one upstream fill per blob, however many clients ask.

A ``Fill`` is one blob on its way into the store. Its readers follow it by position: they ask how
many bytes from their offset are on disk, and when none are they register demand there, which
steers the next free connection to them (``download.py`` fetches; this module owns the lifecycle
and what readers see).

The lifecycle: own the fill across processes (an flock on the digest's lock file; while another
process holds it, readers follow the chunk map that process saves and the staging file it writes),
open the preallocated staging file, download, compare the sha256, publish under the final name.
No client request owns a fill: the ``FillEngine`` does, so a client hanging up never cancels it.
Progress is saved to metadata every second, so a fill killed mid-way resumes from the bytes it had.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Coroutine
from enum import Enum, auto
from typing import TYPE_CHECKING, Any

from .chunks import SPLIT_MIN, ChunkMap
from .concurrency import START, ConnectionBudget
from .config import Settings
from .errors import (
    BlobUnknown,
    DigestMismatch,
    FillFailed,
    MirrorError,
    UpstreamError,
    UpstreamInvalid,
    UpstreamRefused,
    UpstreamUrlExpired,
)
from .fds import SharedFd, in_thread
from .fill_loop import FillLoop
from .metadata import Metadata
from .names import Digest, Name
from .store import BlobStore
from .upstream import Upstream

if TYPE_CHECKING:
    from .replicas import Replicas

log = logging.getLogger("mirror.fill")

WAKE_TIMEOUT = 1.0  # upper bound on any wait, so a lost wake-up never hangs anything
FOLLOW_INTERVAL = 0.5  # seconds between looks at another process's progress


class FillState(Enum):
    STARTING = auto()  # waiting for the lock, opening staging
    RUNNING = auto()  # downloading: connections fetching chunks, the hasher following the prefix
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
    per_connection = -(-size // (settings.connections or 2 * START))
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
        budget: ConnectionBudget | None = None,
        replicas: Replicas | None = None,
        from_peer: bool = False,
    ) -> None:
        self.name = name
        self.digest = digest
        self.size = size
        self.state = FillState.STARTING
        self.error: MirrorError | None = None
        self.map: ChunkMap | None = None
        self.staging: SharedFd | None = None  # the staging file (read-only while following another process)
        self.demands: list[Demand] = []
        self.fetched = 0  # bytes received by this run, from whatever source
        self.from_upstream = 0  # ... of which from upstream (not the shared bucket or another replica)
        self.resumed = 0  # bytes already on disk when this run started
        self.retries = 0
        self.connections = 0  # upstream connections the download runs now
        self.started = time.monotonic()
        self.on_reader_blocked: Callable[[], None] = lambda: None  # the download's wake-up for idle connections
        self._readers = asyncio.get_running_loop()  # the serving loop; the fill itself runs on the fill loop
        self._told = False  # a wake-up for the readers is on its way
        self._store, self._meta, self._upstream, self._settings = store, meta, upstream, settings
        self._budget = budget or ConnectionBudget(settings.upstream_connections)
        self._replicas, self._from_peer = replicas, from_peer
        self.source = "upstream"  # where the bytes come from: "upstream", "bucket" or "peer <id>"
        self._lock_fd: int | None = None
        self._progress = asyncio.Event()
        self._finished = asyncio.Event()

    def __repr__(self) -> str:
        return f"Fill({self.digest.short}, {self.state.name}, {self.done_bytes}/{self.size})"

    # -- what readers see ---------------------------------------------------------------

    @property
    def done_bytes(self) -> int:
        if self.state is FillState.DONE:
            return self.size
        return self.map.done_bytes if self.map is not None else 0

    @property
    def waiting_clients(self) -> int:
        return len(self.demands)

    def available(self, position: int, limit: int) -> int:
        """Bytes from ``position`` a reader may read now (at most ``limit``)."""
        if self.state is FillState.DONE:
            return max(min(self.size - position, limit), 0)
        if self.map is None or self.state is FillState.FAILED:
            return 0
        return self.map.available(position, limit)

    def reader_fd(self) -> SharedFd:
        """A descriptor of the reader's own: it stays valid after publish renames the file."""
        staging = self.staging
        if staging is not None:
            try:
                return staging.duplicate()
            except ValueError:
                pass  # closed meanwhile: published, or failed
        fd = self._store.open_blob(self.digest)
        if fd is None:
            raise FillFailed(f"blob {self.digest.short} is neither filling nor stored")
        return SharedFd(fd)

    def raise_if_failed(self) -> None:
        if self.state is not FillState.FAILED:
            return
        if isinstance(self.error, UpstreamRefused) and self.error.status == 404:
            raise BlobUnknown(f"blob {self.digest} is unknown to upstream") from self.error
        raise FillFailed(f"fill of {self.digest.short} failed: {self.error}") from self.error

    async def verified(self) -> None:
        """Return once the blob is published; raise if the fill failed."""
        await self._finished.wait()
        self.raise_if_failed()

    def add_demand(self, position: int) -> Demand:
        demand = Demand(position)
        self.demands.append(demand)
        return demand

    def remove_demand(self, demand: Demand) -> None:
        self.demands.remove(demand)

    async def wait_progress(self, demand: Demand) -> None:
        """Block a reader until more bytes land (or a second passes)."""
        if demand.waiting_since is None:
            demand.waiting_since = time.monotonic()
            self.on_reader_blocked()  # an idle connection may now serve this position
        await wait_event(self._progress, WAKE_TIMEOUT)

    async def first_bytes(self, position: int, timeout: float) -> None:
        """Wait until the byte at ``position`` is on disk, for at most ``timeout`` seconds;
        raise at once if the fill fails meanwhile. A response holds its head this long, so a
        fill that fails before its first byte answers with an error status, not a cut body."""
        deadline = time.monotonic() + timeout
        demand = self.add_demand(position)
        try:
            while position < self.size and not self.available(position, 1) and time.monotonic() < deadline:
                self.raise_if_failed()
                await self.wait_progress(demand)
            self.raise_if_failed()
        finally:
            self.remove_demand(demand)

    def notify(self) -> None:
        """Bytes landed or the state changed: wake every reader (a new event each time). On the
        serving loop; the fill's own loop calls ``tell_readers``."""
        self._told = False
        self._progress.set()
        self._progress = asyncio.Event()

    def tell_readers(self) -> None:
        """``notify`` from any thread; one wake-up on its way at a time."""
        if not self._told:
            self._told = True
            self._readers.call_soon_threadsafe(self.notify)

    def landed(self, n: int) -> None:
        self.fetched += n
        if self.source == "upstream":
            self.from_upstream += n
        self.tell_readers()

    # -- the lifecycle -------------------------------------------------------------------

    async def run(self) -> None:
        """Fill, verify and publish; never raises except on cancellation."""
        try:
            if not await self._acquire():
                self.state = FillState.DONE  # another process published it meanwhile
                return
            await asyncio.to_thread(self._open_staging)
            self.state = FillState.RUNNING
            self.tell_readers()
            if self._replicas is None:
                await self._download(self._upstream, self._settings)
            else:
                await self._download_shared(self._replicas)
        except asyncio.CancelledError:
            self._fail(FillFailed("the mirror is shutting down"))
            await asyncio.shield(asyncio.to_thread(self.save_progress))
            log.info("fill paused digest=%s done=%d/%d reason=shutdown; it resumes on the next request",
                     self.digest.short, self.done_bytes, self.size)
            raise
        except Exception as exc:
            self._fail(_first_error(exc))
            await asyncio.to_thread(self._after_failure)
        finally:
            self._close()

    async def _download(self, source: Upstream, settings: Settings) -> None:
        """Fetch every missing byte from ``source``, check the digest, publish."""
        from .download import Download  # the download needs the Fill type; the fill only runs one

        download = Download(self, source, settings, self._budget)
        log.info("fill start digest=%s size=%d connections=%d resumed=%d source=%s",
                 self.digest.short, self.size, download.workers_wanted(), self.map.done_bytes if self.map else 0,
                 self.source)
        actual = await download.run()
        self.state = FillState.VERIFYING
        if actual != self.digest.hex:
            raise DigestMismatch(str(self.digest), f"sha256:{actual}")
        await in_thread(self._publish, self._staging())
        self.state = FillState.DONE
        self._log_done()

    async def _download_shared(self, replicas: Replicas) -> None:
        """As ``_download``, from the source the bucket's state names (``replicas.py``): the bucket, the
        replica filling it, or upstream under this replica's lease, then uploaded for the others.
        A bucket or peer that fails mid-way is left for the next choice, which keeps every byte
        already on disk: a dead peer's lease runs out and this replica takes over from there."""
        while True:
            source = await replicas.choose(self, self._upstream, self._from_peer)
            self.source = source.describe()
            replicas.filling[self.digest] = self.source
            try:
                async with replicas.holding(source.lease) as lost:
                    settings = replicas.peer_settings(source, self._settings)
                    if not await _unless(self._download(source.upstream, settings), lost):
                        continue  # another replica holds the lease now: follow it, keeping every byte here
                    if source.kind == "upstream" and await replicas.blob_in_bucket(self.digest) != self.size:
                        await in_thread(lambda fd: replicas.upload(self.digest, fd, self.size), self._staging())
                if source.kind == "peer":
                    replicas.adopt(self.digest, self.size, self._store)  # should the peer die before its upload
                return
            except Exception as exc:  # noqa: BLE001 - sorted below: only a lost bucket or peer is retried here
                error = _unwrapped(exc)
                if isinstance(error, DigestMismatch | UpstreamInvalid):
                    replicas.distrust(source, error)
                if source.kind == "peer" and isinstance(error, UpstreamRefused) and error.status in (401, 403):
                    log.warning("fill peer refused digest=%s peer=%s reason=%s; filling from upstream instead (do "
                                "the replicas share one bucket, and is each in the others' --allow-clients?)",
                                self.digest.short, source.peer, error)
                    self._from_peer = True  # never a peer again for this fill
                    continue
                if source.kind == "upstream" or not _source_lost(error):
                    raise
                log.warning("fill source lost digest=%s source=%s done=%d/%d reason=%s; choosing again",
                            self.digest.short, self.source, self.done_bytes, self.size, error)
                self.state = FillState.RUNNING
                await asyncio.sleep(1.0)
            finally:
                replicas.filling.pop(self.digest, None)

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
            self.tell_readers()
            await asyncio.sleep(FOLLOW_INTERVAL)

    def _follow(self) -> None:
        """Take the other process's saved chunk map, and a read-only view of its staging file."""
        if self.staging is None:
            try:
                self.staging = SharedFd(os.open(self._store.layout.staging_data(self.digest), os.O_RDONLY))
            except FileNotFoundError:
                return
        saved = self._meta.fill_progress(self.digest)
        if saved and saved.get("size") == self.size:
            self.map = ChunkMap.from_state(self.size, saved.get("chunks", [])) or self.map

    def _open_staging(self) -> None:
        if self.staging is not None:  # the read-only view used while following another process
            self.staging.close()
            self.staging = None
        fd, existed = self._store.open_staging(self.digest, self.size, self._settings.min_free_bytes)
        self.staging = SharedFd(fd)
        saved = self._meta.fill_progress(self.digest) if existed else None
        if not existed:
            self._meta.forget_fill(self.digest)
        if saved and saved.get("size") == self.size:
            self.map = ChunkMap.from_state(self.size, saved.get("chunks", []))
        if self.map is None:
            self.map = ChunkMap.empty(self.size, chunk_size_for(self.size, self._settings))
        self.resumed = self.map.done_bytes

    def _staging(self) -> SharedFd:
        assert self.staging is not None
        return self.staging

    def save_progress(self) -> None:
        if self.map is not None and self.staging is not None and self.state is not FillState.DONE:
            self._meta.set_fill_progress(self.digest, {"size": self.size, "chunks": self.map.to_state()})

    def _publish(self, fd: int) -> None:
        self._store.publish(self.digest, fd)
        self._meta.forget_fill(self.digest)
        self._meta.set_blob_sizes({self.digest: self.size})
        self._meta.touch_blob(self.digest)

    def _fail(self, error: MirrorError) -> None:
        self.error = error
        self.state = FillState.FAILED
        self.tell_readers()

    def _after_failure(self) -> None:
        """Keep resumable progress; throw away bytes that were wrong."""
        error = self.error
        if isinstance(error, DigestMismatch | UpstreamInvalid):
            self._store.discard_staging(self.digest)
            self._meta.forget_fill(self.digest)
            self._meta.forget_blob_size(self.digest)
            log.warning("fill discard digest=%s size=%d source=%s reason=%s", self.digest.short, self.size,
                        self.source, error)
        else:
            self.save_progress()
            log.warning(
                "fill failed digest=%s done=%d/%d seconds=%.1f reason=%s",
                self.digest.short, self.done_bytes, self.size, time.monotonic() - self.started, error,
            )

    def _close(self) -> None:
        """Let go of the staging file (closed once no thread still writes or reads it) and the lock."""
        if self.staging is not None:
            self.staging.close()
            self.staging = None
        if self._lock_fd is not None:
            self._store.unlock(self._lock_fd)
            self._lock_fd = None
        self._readers.call_soon_threadsafe(self._finish)

    def _finish(self) -> None:
        self._finished.set()
        self.notify()

    def _log_done(self) -> None:
        seconds = max(time.monotonic() - self.started, 1e-6)
        log.info(
            "fill done digest=%s bytes=%d fetched=%d seconds=%.2f mb_s=%.1f retries=%d connections=%d",
            self.digest.short, self.size, self.fetched, seconds, self.fetched / seconds / 1e6, self.retries,
            self.connections,
        )


class FillEngine:
    """Owns every fill: one per digest, started on first demand, kept alive by itself.

    Fills run on the fill loop (``fill_loop.py``), a thread of their own; the engine's table of
    fills, and everything readers touch, stays on the serving loop."""

    def __init__(self, store: BlobStore, meta: Metadata, settings: Settings, replicas: Replicas | None = None) -> None:
        self._store, self._meta, self._settings = store, meta, settings
        self.replicas = replicas
        self._fills: dict[Digest, Fill] = {}
        self._loop = FillLoop()
        self._tasks: set[asyncio.Task[None]] = set()  # on the fill loop only
        self._upstreams: set[Upstream] = set()  # whose clients the fill loop opened
        self._budget = ConnectionBudget(settings.upstream_connections)  # shared by every fill
        self.finished: list[Callable[[Fill], None]] = []  # told of every fill that ended (metrics, eviction)
        self.closed = False

    def get(self, digest: Digest) -> Fill | None:
        return self._fills.get(digest)

    @property
    def active(self) -> list[Fill]:
        return list(self._fills.values())

    def start(self, name: Name, digest: Digest, size: int, upstream: Upstream, from_peer: bool = False) -> Fill:
        """The running fill for ``digest``, or a new one. No await: the check and the insert are atomic.

        A fill that has just failed is replaced at once: the new one waits for the old one's
        lock, then resumes from the progress it saved.
        """
        fill = self._fills.get(digest)
        if fill is not None and fill.state is not FillState.FAILED:
            return fill
        if self.closed:
            raise FillFailed("the mirror is shutting down; the fill resumes when it is back")
        fill = Fill(name, digest, size, store=self._store, meta=self._meta, upstream=upstream,
                    settings=self._settings, budget=self._budget, replicas=self.replicas, from_peer=from_peer)
        self._fills[digest] = fill
        self._upstreams.add(upstream)
        serving = asyncio.get_running_loop()
        self._loop.loop.call_soon_threadsafe(self._run, fill, lambda: serving.call_soon_threadsafe(self._forget, fill))
        return fill

    def _run(self, fill: Fill, forget: Callable[[], None]) -> None:
        """On the fill loop: the fill's task, kept until it ends."""
        task = asyncio.get_running_loop().create_task(fill.run(), name=f"fill {fill.digest.short}")
        self._tasks.add(task)
        task.add_done_callback(lambda t: (self._tasks.discard(t), forget()))

    def _forget(self, fill: Fill) -> None:
        if self._fills.get(fill.digest) is fill:
            del self._fills[fill.digest]
        for listener in self.finished:
            listener(fill)

    async def close(self) -> None:
        """Cancel every fill and start no more; each saves its progress on the way out. Then the
        fill loop's upstream connections close, and the loop stops."""
        self.closed = True
        await self._loop.run(self._cancel_all())
        await asyncio.to_thread(self._loop.stop)

    async def _cancel_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.replicas is not None:
            await self.replicas.cancel_background()
        for upstream in [*self._upstreams, *(self.replicas.sources() if self.replicas else [])]:
            await upstream.aclose()


async def wait_event(event: asyncio.Event, timeout: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        pass


async def _unless(work: Coroutine[Any, Any, None], lost: asyncio.Event) -> bool:
    """Run ``work``; True when it finished, False when ``lost`` was set first (``work`` is cancelled)."""
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(lost.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return False
    task.result()  # its error, if any
    return True


def _unwrapped(exc: BaseException) -> BaseException:
    """The first error inside task groups."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _source_lost(error: BaseException) -> bool:
    """A bucket or peer that stopped answering (or whose URL expired): choose the source again. Its
    refusals and wrong bytes are answers, and fail the fill as upstream's would."""
    if isinstance(error, FillFailed):
        return True
    return isinstance(error, UpstreamError) and (error.retryable or isinstance(error, UpstreamUrlExpired))


def _first_error(exc: BaseException) -> MirrorError:
    """The error to report: unwrap task groups; anything not ours is a bug, wrapped and logged."""
    exc = _unwrapped(exc)
    if isinstance(exc, MirrorError):
        return exc
    log.error("fill bug: %r", exc, exc_info=exc)
    wrapped = FillFailed(f"internal error: {exc!r}")
    wrapped.__cause__ = exc
    return wrapped
