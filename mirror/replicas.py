"""Replicas sharing one bucket: where a fill gets its bytes, the lease that makes one replica
fetch each blob from upstream, and the upload of what it verified.

Each replica keeps its own cache directory as the working copy (clients are served from local
disk by sendfile, and a fill writes there first); the bucket is what replicas share. For a blob
this replica does not hold, a fill asks, in order:

1. the bucket has it: fill from the bucket (presigned range GETs, hashed like any other source);
2. no live lease names another replica: take the lease, fill from upstream, upload the verified
   blob to the bucket, then let the lease go;
3. another replica holds a live lease: fill from that replica, whose advertised URL streams the
   blob as it lands there, so upstream sends each blob once however many replicas ask. If that
   replica dies, its lease runs out within ``LEASE_TTL`` and this one takes over, resuming from
   the bytes it already has.

No source is trusted: bytes from the bucket or a peer are hashed before publish, as upstream's
are, and only a blob this replica verified is ever uploaded under a final key.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from cachetools import TTLCache

from . import __version__
from .config import Settings
from .errors import StoreUnavailable
from .health import Health
from .names import Digest, Name, tag_key
from .upstream import BlobLocation, Upstream

if TYPE_CHECKING:
    from .bucket import Bucket
    from .fill import Fill
    from .leases import Lease
    from .models import CachedModel
    from .roster import Replica
    from .store import BlobStore

log = logging.getLogger("mirror.replicas")

LEASE_TTL = 10.0  # seconds a lease lives unless renewed: how soon a dead replica's fill is taken over
RENEW_EVERY = 3.0
PRESIGN_SECONDS = 900  # a presigned URL outlives any part of a pull; a new one is made per request
HEARTBEAT_EVERY = 5.0
PEER_HEADER = "Ollama-Mirror-Replica"  # on requests from one replica to another: never sent on to a peer
PEER_RETRIES = 2  # a peer that fails this often is asked no more until its lease is checked again
PEER_STALL = 5.0  # seconds without a byte from a peer before its range is retried (a hung replica)
DISTRUST_SECONDS = 600.0  # a peer that sent wrong bytes is not asked again for this long
ADOPT_EVERY = 5.0  # seconds between looks at whether a blob a peer filled reached the bucket
ADOPT_FOR = 3600.0  # ... for at most this long
IN_BUCKET_SECONDS = 60.0  # how long "the bucket has this blob" is believed (rm and gc remove blobs)


@dataclass(frozen=True)
class Source:
    """Where one fill reads: ``kind`` is "bucket", "peer" or "upstream"; ``lease`` is held while
    this replica fills from upstream."""

    kind: str
    upstream: Upstream
    lease: Lease | None = None
    peer: str = ""

    def describe(self) -> str:
        return f"peer {self.peer}" if self.kind == "peer" else self.kind


class BucketSource(Upstream):
    """The bucket as a blob source: range GETs on a presigned URL, presigned anew when one expires.
    No credentials travel with the GETs: the signature is in the URL."""

    def __init__(self, bucket: Bucket, settings: Settings) -> None:
        super().__init__(bucket.endpoint_url, connect_timeout=settings.connect_timeout,
                         stall_timeout=settings.stall_timeout, max_connections=settings.upstream_connections)
        self._bucket = bucket

    async def resolve_blob(self, name: Name, digest: Digest, version: int = 0) -> BlobLocation:
        url = await asyncio.to_thread(self._bucket.presign_blob, digest, PRESIGN_SECONDS)
        return BlobLocation(url, version=version + 1)


class Replicas:
    """This replica's view of the shared bucket."""

    def __init__(self, settings: Settings, bucket: Bucket | None = None) -> None:
        from .bucket import (  # boto3 is loaded only by mirrors that share a bucket
            Bucket,
            BucketLocation,
        )
        from .leases import Leases
        from .roster import Roster

        self.settings = settings
        self.bucket = bucket or Bucket.connect(BucketLocation.parse(settings.store), path_style=settings.s3_path_style)
        self.leases = Leases(self.bucket)
        self.roster = Roster(self.bucket)
        self.id = settings.replica_id or default_replica_id(settings.listen)
        self.url = (settings.advertise_url or default_advertise_url(settings.listen)).rstrip("/")
        self._bucket_source = BucketSource(self.bucket, settings)
        self._peers: dict[str, Upstream] = {}
        self._in_bucket: TTLCache[Digest, int] = TTLCache(maxsize=65536, ttl=IN_BUCKET_SECONDS)
        self._bad_peers: TTLCache[str, bool] = TTLCache(maxsize=256, ttl=DISTRUST_SECONDS)
        self._background: set[asyncio.Task[None]] = set()  # uploads of blobs a dead peer never uploaded
        self.filling: dict[Digest, str] = {}  # blobs this replica fills, and from where (for the heartbeat)
        self.seen: list[Replica] = []  # every replica's last heartbeat, as of this one's last
        self.peer_token = ""  # set by ``start``: lets one replica through another's access control
        self.stopping = threading.Event()  # the mirror is shutting down: background uploads stop

    def start(self) -> None:
        """Blocking, once: check the bucket, and read (or make) the token replicas show each other.
        It is in the bucket because whoever may read the bucket may read every model anyway."""
        self.bucket.check()
        self.leases.check()
        twin = next((r for r in self.roster.all() if r.id == self.id and not r.gone and r.url != self.url), None)
        if twin is not None:
            raise StoreUnavailable(
                f"replica id {self.id!r} is in use by a running replica at {twin.url} (its heartbeat is "
                f"{time.time() - twin.last_seen:.0f} s old): give each replica its own --replica-id")
        key = self.bucket.keys.peer_token
        token = self.bucket.read_object(key)
        if token is None:
            self.bucket.write_object(key, secrets.token_urlsafe(32).encode(), if_absent=True)
            token = self.bucket.read_object(key) or b""
        self.peer_token = token.decode().strip()

    def is_peer(self, credentials: str) -> bool:
        return bool(self.peer_token) and hmac.compare_digest(credentials, self.peer_token)

    # -- where a fill reads --------------------------------------------------------------------

    async def choose(self, fill: Fill, upstream: Upstream, from_peer: bool) -> Source:
        """The source for ``fill`` now (see the module's docstring). ``from_peer``: the fill was
        started by another replica's request, which must not be sent back to a peer."""
        try:
            return await self._choose(fill, upstream, from_peer)
        except StoreUnavailable as exc:  # the bucket is down: fill as a lone mirror would, and say so
            log.warning("fill without the bucket digest=%s reason=%s; filling from upstream with no lease",
                        fill.digest.short, exc)
            return Source("upstream", upstream)

    async def _choose(self, fill: Fill, upstream: Upstream, from_peer: bool) -> Source:
        digest = fill.digest
        while True:
            size = await self.blob_in_bucket(digest, fresh=True)
            if size == fill.size:
                return Source("bucket", self._bucket_source)
            held = await asyncio.to_thread(self.leases.read, digest)
            if held is None:
                lease = await asyncio.to_thread(self.leases.acquire, digest, self.id, self.url, LEASE_TTL)
            elif held.expired:
                lease = await asyncio.to_thread(self.leases.take_over, held, self.id, self.url, LEASE_TTL)
                if lease is not None:
                    log.warning("fill take-over digest=%s from=%s reason=its lease expired (replica gone?)",
                                digest.short, held.owner)
            elif held.owner == self.id:  # this replica's lease from before a restart: wait for it to run out
                await asyncio.sleep(min(max(held.expires - time.time(), 0.1), 1.0))
                continue
            elif from_peer or held.url.rstrip("/") in self._bad_peers:
                log.info("fill from upstream digest=%s reason=%s holds the lease, and %s", digest.short, held.owner,
                         "its bytes were wrong lately" if not from_peer else "a peer asked (never back to one)")
                return Source("upstream", upstream)
            else:
                return Source("peer", self._peer(held.url), peer=held.owner)
            if lease is not None:
                return Source("upstream", upstream, lease)
            await asyncio.sleep(0.2)  # another replica took it between our look and our try: look again

    def peer_settings(self, source: Source, settings: Settings) -> Settings:
        """A peer that fails or hangs is given up on quickly: its lease decides what happens next."""
        if source.kind == "upstream":
            return settings
        return replace(settings, max_retries=PEER_RETRIES, stall_timeout=min(settings.stall_timeout, PEER_STALL))

    def distrust(self, source: Source, error: Exception) -> None:
        """A peer whose bytes were wrong: fills go upstream rather than to it, for a while."""
        if source.kind == "peer":
            self._bad_peers[source.upstream.base_url] = True
            log.warning("peer distrusted peer=%s url=%s reason=%s; fills go upstream instead for %.0f s",
                        source.peer, source.upstream.base_url, error, DISTRUST_SECONDS)

    def _peer(self, url: str) -> Upstream:
        peer = self._peers.get(url)
        if peer is None:
            peer = self._peers[url] = Upstream(
                url, connect_timeout=min(self.settings.connect_timeout, 3.0), stall_timeout=PEER_STALL,
                max_connections=self.settings.upstream_connections, headers={PEER_HEADER: self.id},
                token=self.peer_token, health=Health(url, url, kind="replica"))
        return peer

    def sources(self) -> list[Upstream]:
        """Every upstream object this made, for closing on each loop that used them."""
        return [self._bucket_source, *self._peers.values()]

    # -- the lease, while filling from upstream -------------------------------------------------

    @contextlib.asynccontextmanager
    async def holding(self, lease: Lease | None) -> AsyncIterator[asyncio.Event]:
        """Renew ``lease`` until the block ends, then let it go (another replica may fill at once).
        The event is set if the lease is lost meanwhile (this replica hung, or the store did, past its
        expiry, and another replica took it over): then stop fetching from upstream."""
        lost = asyncio.Event()
        if lease is None:
            yield lost
            return
        renewer = asyncio.get_running_loop().create_task(self._renew(lease, lost))
        try:
            yield lost
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            await asyncio.shield(asyncio.to_thread(self._release, lease))

    async def _renew(self, lease: Lease, lost: asyncio.Event) -> None:
        while True:
            await asyncio.sleep(RENEW_EVERY)
            try:
                renewed = await asyncio.to_thread(self.leases.renew, lease, LEASE_TTL)
            except Exception as exc:  # noqa: BLE001 - the bucket is unreachable: keep filling, try again
                log.warning("lease renew failed digest=%s reason=%s", lease.digest, exc)
                continue
            if renewed is None:
                log.warning("lease lost digest=%s reason=it ran out before this replica could renew it (a "
                            "pause of this process or of the store); fetching no more from upstream, choosing "
                            "again", lease.digest.short)
                lost.set()
                return
            lease = renewed

    def _release(self, lease: Lease) -> None:
        try:
            self.leases.release(lease)
        except Exception as exc:  # noqa: BLE001 - it expires by itself
            log.warning("lease release failed digest=%s reason=%s; it expires in %.0f s", lease.digest, exc, LEASE_TTL)

    # -- the bucket's blobs ---------------------------------------------------------------------

    async def blob_in_bucket(self, digest: Digest, fresh: bool = False) -> int | None:
        """The blob's size in the bucket, or None; a found blob is believed for a minute. ``fresh``
        asks the bucket, and raises ``StoreUnavailable`` when it cannot; otherwise an unreachable
        bucket counts as not having the blob (served from here or upstream instead)."""
        size = None if fresh else self._in_bucket.get(digest)
        if size is None:
            try:
                size = await asyncio.to_thread(self.bucket.blob_size, digest)
            except StoreUnavailable as exc:
                if fresh:
                    raise
                log.warning("bucket unreachable digest=%s reason=%s; answering without it", digest.short, exc)
                return None
            if size is not None:
                self._in_bucket[digest] = size
        return size

    def adopt(self, digest: Digest, size: int, store: BlobStore) -> None:
        """After a fill from a peer: should that peer die before its upload, upload this replica's
        verified copy instead (under a lease of its own), so nobody fetches it from upstream again."""
        task = asyncio.get_running_loop().create_task(self._adopt(digest, size, store))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _adopt(self, digest: Digest, size: int, store: BlobStore) -> None:
        deadline = time.monotonic() + ADOPT_FOR
        while time.monotonic() < deadline and not self.stopping.is_set():
            await asyncio.sleep(ADOPT_EVERY)
            try:
                if await self.blob_in_bucket(digest, fresh=True) == size:
                    return
                held = await asyncio.to_thread(self.leases.read, digest)
                if held is not None and not held.expired:
                    continue  # its filler lives (and uploads), or someone adopts it already
                if held is None:
                    lease = await asyncio.to_thread(self.leases.acquire, digest, self.id, self.url, LEASE_TTL)
                else:
                    lease = await asyncio.to_thread(self.leases.take_over, held, self.id, self.url, LEASE_TTL)
            except StoreUnavailable:
                continue
            if lease is None:
                continue
            log.info("bucket adopt digest=%s reason=its filler %s did not upload it; uploading this replica's copy",
                     digest.short, held.owner if held else "-")
            async with self.holding(lease):
                fd = await asyncio.to_thread(store.open_blob, digest)
                if fd is not None:
                    try:
                        await asyncio.to_thread(self.upload, digest, fd, size)
                    finally:
                        os.close(fd)
            return

    async def cancel_background(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    def upload(self, digest: Digest, fd: int, size: int) -> None:
        """Put a blob this replica verified into the bucket (blocking). A failure is logged, not
        raised: the blob is served from local disk, and the next replica to miss it fills it."""
        try:
            self.bucket.put_blob(digest, fd, size)  # logged there
        except Exception as exc:  # noqa: BLE001
            log.warning("bucket upload failed digest=%s size=%d reason=%s; other replicas fill it themselves",
                        digest.short, size, exc)
            return
        self._in_bucket[digest] = size

    async def presigned(self, digest: Digest) -> str | None:
        """A presigned GET URL for a blob the bucket holds, else None."""
        if await self.blob_in_bucket(digest) is None:
            return None
        return await asyncio.to_thread(self.bucket.presign_blob, digest, PRESIGN_SECONDS)


    # -- what this replica has that the bucket lacks ------------------------------------------

    def sync_up(self, store: BlobStore) -> None:
        """Blocking, in the background at start: upload the verified blobs and the tags of this
        replica's cache that the bucket lacks (an upload cut short by a kill or an outage, a cache
        from before the bucket, an import), so no other replica fetches them from upstream again."""
        from .eviction import stored_blobs
        from .models import list_models

        try:
            in_bucket = self.bucket.list_blobs()
            tags = self.bucket.list_manifests()
            removed = self.bucket.removed_tags()
        except Exception as exc:  # noqa: BLE001
            log.warning("bucket sync skipped reason=%s", exc)
            return
        gone = {tag_key(*t) for t in removed}
        kept = [m for m in list_models(store.layout) if tag_key(m.host, m.name, m.tag) not in gone]
        local = stored_blobs(store.layout)
        wanted = {layer.digest for m in kept for layer in m.manifest.blobs}  # not an orphan, nor a removed tag's
        missing = {d: s.st_size for d, s in local.items() if d in wanted and in_bucket.get(d) != s.st_size}
        shared = {tag_key(*t) for t in tags}
        models = [m for m in kept if tag_key(m.host, m.name, m.tag) not in shared]
        if not missing and not models:
            return
        log.info("bucket sync blobs=%d bytes=%d tags=%d reason=in this replica's cache, not in the bucket",
                 len(missing), sum(missing.values()), len(models))
        for digest in missing:
            if self.stopping.is_set():
                return
            fd = store.open_blob(digest)
            if fd is not None:  # evicted meanwhile: nothing to share
                try:
                    self.upload(digest, fd, os.fstat(fd).st_size)
                finally:
                    os.close(fd)
        for model in models:
            self.save_manifest(model.host, model.name, model.tag, model.manifest.data)

    # -- tags, and who is here -------------------------------------------------------------------

    def save_manifest(self, host: str, name: Name, tag: str, data: bytes) -> None:
        """Blocking: the tag for the other replicas (a failure only costs them an upstream request),
        and the manifest by its digest, which clients behind a load balancer ask any replica for."""
        try:
            self.bucket.write_object(self.bucket.keys.manifest_by_digest(Digest.of(data)), data)
            self.bucket.put_manifest(host, name, tag, data)
        except Exception as exc:  # noqa: BLE001
            log.warning("bucket manifest not saved name=%s tag=%s reason=%s", name, tag, exc)

    def load_manifest_by_digest(self, digest: Digest) -> bytes | None:
        """Blocking: a manifest another replica saved, if its bytes are what ``digest`` names."""
        try:
            data = self.bucket.read_object(self.bucket.keys.manifest_by_digest(digest))
        except Exception as exc:  # noqa: BLE001
            log.warning("bucket manifest not read digest=%s reason=%s", digest.short, exc)
            return None
        return data if data is not None and Digest.of(data) == digest else None

    def load_manifest(self, host: str, name: Name, tag: str) -> bytes | None:
        """Blocking: the tag as another replica saved it, or None (also when the bucket is unreachable)."""
        try:
            return self.bucket.get_manifest(host, name, tag)
        except Exception as exc:  # noqa: BLE001
            log.warning("bucket manifest not read name=%s tag=%s reason=%s", name, tag, exc)
            return None

    async def heartbeat(self, store: BlobStore, drop: Callable[[list[CachedModel]], Awaitable[object]]) -> None:
        """Say in the bucket who this replica is and what it fills, and read what the others said, so
        the status page of any replica shows them all; ``drop`` the local copies of tags removed from
        the bucket (``ollama-mirror rm`` or gc on the bucket). Retired on the way out."""
        from .roster import Replica

        me = Replica(self.id, self.url, __version__, time.time())
        try:
            while True:
                me = replace(me, fills=tuple(d for d, source in self.filling.items() if source == "upstream"))
                try:
                    self.seen = await asyncio.to_thread(self._beat, me)
                    removed = await asyncio.to_thread(self.removed_here, store)
                except Exception as exc:  # noqa: BLE001
                    log.warning("bucket heartbeat failed replica=%s reason=%s", self.id, exc)
                    removed = []
                if removed:
                    log.info("bucket removed tags=%s: dropping this replica's copies",
                             ",".join(str(m) for m in removed))
                    await drop(removed)
                await asyncio.sleep(HEARTBEAT_EVERY)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(asyncio.to_thread(self.roster.retire, self.id))

    def removed_here(self, store: BlobStore) -> list[CachedModel]:
        """Blocking: the tags of this replica's cache that were removed from the bucket as they are here."""
        from .models import list_models

        gone = {tag_key(*t) for t in self.bucket.removed_tags()}
        if not gone:
            return []
        return [m for m in list_models(store.layout) if tag_key(m.host, m.name, m.tag) in gone
                and self.bucket.removed_digest(m.host, m.name, m.tag) == m.digest]

    def _beat(self, me: Replica) -> list[Replica]:
        self.roster.announce(me)
        return self.roster.all()

    def snapshot(self) -> dict[str, Any]:
        """For the status page: this replica, the bucket and every replica seen there."""
        return {"id": self.id, "url": self.url, "store": self.settings.store, "endpoint": self.bucket.endpoint_url,
                "blob_redirect": self.settings.blob_redirect,
                "replicas": [{"id": r.id, "url": r.url, "version": r.version, "started": r.started,
                              "last_seen": r.last_seen, "gone": r.gone, "fills": [str(d) for d in r.fills]}
                             for r in self.seen]}


def default_replica_id(listen: str) -> str:
    return f"{socket.gethostname().split('.')[0]}-{listen.rpartition(':')[2]}"


def default_advertise_url(listen: str) -> str:
    host, _, port = listen.rpartition(":")
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = socket.getfqdn()
    return f"http://{host}:{port}"
