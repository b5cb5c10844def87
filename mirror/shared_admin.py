"""The admin commands on the bucket replicas share (``--store``): what ``ls``, ``rm``, ``gc``,
``verify``, ``pin``, ``import`` and ``export`` do there.

Each replica keeps its own cache directory as a working copy; the bucket is the shared truth, laid
out as bucket.py draws it. The rules kept here are those of the local store:
- tags go before blobs, so a kill in the middle leaves at worst unreferenced blobs (the next ``gc``
  removes them), never a tag whose blobs were removed by our hand;
- a blob a live fill lease names is never removed: a replica is filling it, for a tag it serves;
- an unreferenced blob or unfinished upload younger than ``grace`` stays: a replica or an import
  uploads a tag's blobs before its manifest;
- nothing reaches a local blob's final name unverified (``BlobStore.ingest``), and nothing is
  uploaded that was not verified on the way into the local cache;
- one ``gc`` at a time, under the lock object ``leases/gc``.

Blocking code, which never prints: it returns what it did, and the CLI says it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

from .bucket import Bucket, StoredObject, Upload
from .errors import StoreBusy
from .leases import Lease, Leases
from .manifest import Layer, Manifest, ManifestInvalid
from .models import CachedModel
from .names import Digest, ModelRef, Name, tag_key
from .store import BlobStore, OnBytes, hash_stream

log = logging.getLogger("mirror.shared")

@dataclass(frozen=True)
class SharedModel(CachedModel):
    """A tag in the bucket; ``modified`` is when a replica or admin last wrote its manifest."""

    pinned: bool = False
    missing: tuple[Layer, ...] = ()  # its blobs the bucket does not hold (or holds at another size)

    @property
    def complete(self) -> bool:
        return not self.missing


@dataclass
class Inventory:
    """What the bucket holds, as of one listing."""

    models: list[SharedModel]
    blobs: dict[Digest, StoredObject]

    @property
    def usage(self) -> int:
        return sum(entry.size for entry in self.blobs.values())

    @property
    def hosts(self) -> list[str]:
        return sorted({model.host for model in self.models})

    def get(self, host: str, ref: ModelRef) -> SharedModel | None:
        key = tag_key(host, ref.name, ref.tag)
        return next((m for m in self.models if tag_key(m.host, m.name, m.tag) == key), None)

    def users(self) -> dict[Digest, list[SharedModel]]:
        found: dict[Digest, list[SharedModel]] = {}
        for model in self.models:
            for digest in {layer.digest for layer in model.blobs}:
                found.setdefault(digest, []).append(model)
        return found


@dataclass
class Removed:
    """What ``rm`` took from the bucket, and the blobs it kept because a replica is filling them."""

    models: list[SharedModel] = field(default_factory=list)
    blobs: dict[Digest, int] = field(default_factory=dict)  # digest -> bytes freed
    leased: dict[Digest, Lease] = field(default_factory=dict)

    @property
    def freed(self) -> int:
        return sum(self.blobs.values())


@dataclass
class GcPlan:
    """What ``gc`` removes from the bucket (planned, or done), and what it keeps and why."""

    usage: int  # bytes of blobs and unfinished uploads in the bucket
    high: int | None  # --max-size, or None: only what nothing uses
    low: int  # evict down to this
    started: float = field(default_factory=time.time)
    models: list[SharedModel] = field(default_factory=list)  # evicted, least recently written first
    blobs: dict[Digest, int] = field(default_factory=dict)  # digest -> size
    uploads: list[tuple[Upload, int]] = field(default_factory=list)  # aborted, with the bytes of their parts
    leases: list[Lease] = field(default_factory=list)  # expired: their replica died or stopped mid-fill
    markers: list[Digest] = field(default_factory=list)  # take-over markers of a replica that died taking over
    leased: dict[Digest, Lease] = field(default_factory=dict)  # kept: a replica is filling them
    young: dict[Digest, int] = field(default_factory=dict)  # kept: unreferenced, but uploaded within ``grace``

    @property
    def freed(self) -> int:
        return sum(self.blobs.values()) + sum(size for _, size in self.uploads)

    def done(self) -> GcPlan:
        """An empty plan of the same figures, to record what was done."""
        return GcPlan(self.usage, self.high, self.low, self.started)


@dataclass
class Uploaded:
    models: list[CachedModel] = field(default_factory=list)
    blobs: int = 0
    bytes: int = 0
    skipped: int = 0  # already in the bucket


class SharedAdmin:
    """The admin side of one bucket. ``owner`` names this command in the locks and pins it writes."""

    grace = 3600.0  # seconds an unreferenced blob or an unfinished upload is left alone
    lock_stale = 300.0  # a gc lock not renewed for this long was left by a gc that died
    read_workers = 8  # manifests read at once

    def __init__(self, bucket: Bucket, owner: str) -> None:
        self.bucket = bucket
        self.owner = owner
        self.leases = Leases(bucket)

    @property
    def where(self) -> str:
        return str(self.bucket.location)

    # -- what is there ----------------------------------------------------------------------------

    def inventory(self) -> Inventory:
        """Every tag in the bucket (with its pin, and the blobs it lacks) and every blob."""
        blobs = self.bucket.blob_objects()
        pins = {tag_key(*tag) for tag in self.bucket.list_pins()}
        tags = self.bucket.manifest_objects()
        found = []
        for (host, name, tag), entry, data in self._read_all(tags):
            manifest = _parse(data, entry.key)
            if manifest is None:
                continue
            missing = tuple(layer for layer in manifest.blobs
                            if layer.digest not in blobs or blobs[layer.digest].size != layer.size)
            found.append(SharedModel(host, name, tag, manifest, entry.modified,
                                     pinned=tag_key(host, name, tag) in pins, missing=missing))
        return Inventory(sorted(found, key=lambda m: (m.host, str(m.name), m.tag)), blobs)

    def _read_all(self, tags: dict[tuple[str, Name, str], StoredObject]
                  ) -> Iterator[tuple[tuple[str, Name, str], StoredObject, bytes]]:
        """The manifests' bytes, read ``read_workers`` at a time; one removed meanwhile is left out."""
        with ThreadPoolExecutor(self.read_workers, thread_name_prefix="manifests") as pool:
            read = pool.map(lambda item: self.bucket.read_object(item[1].key), tags.items())
            for (tag, entry), data in zip(tags.items(), read, strict=True):
                if data is not None:
                    yield tag, entry, data

    def live_leases(self) -> dict[Digest, Lease]:
        """The blobs replicas are filling now, by the leases they hold."""
        return {lease.digest: lease for lease in self.leases.all()[0] if not lease.expired}

    # -- rm ---------------------------------------------------------------------------------------

    def remove(self, model: SharedModel, inventory: Inventory) -> Removed:
        """Remove the tag, then its blobs no other tag in the bucket names and no replica is filling.
        ``inventory`` is updated to match."""
        removed = Removed()
        self._drop_tag(model, "rm")
        removed.models.append(model)
        inventory.models.remove(model)
        named = {digest for other in inventory.models for digest in other.manifest.sizes}
        candidates = {layer.digest: inventory.blobs[layer.digest].size for layer in model.blobs
                      if layer.digest in inventory.blobs and layer.digest not in named}
        deletable, removed.leased = self._still_unused(candidates, since=time.time())
        for digest in deletable:
            self._delete_blob(digest, candidates[digest], "rm")
            removed.blobs[digest] = candidates[digest]
            inventory.blobs.pop(digest, None)
        return removed

    def _drop_tag(self, model: SharedModel, by: str) -> None:
        """Remove the tag from the bucket, saying so first, so that every replica drops its own copy
        (and none uploads it again from its cache)."""
        self.bucket.mark_removed(model.host, model.name, model.tag, model.digest)
        self.bucket.delete_manifest(model.host, model.name, model.tag)
        log.info("removed model=%s size=%d by=%s store=%s", model, model.size, by, self.where)

    def _still_unused(self, candidates: dict[Digest, int], since: float) -> tuple[list[Digest], dict[Digest, Lease]]:
        """Those of ``candidates`` that are still unused now: neither named by a live lease nor by a
        tag written since ``since`` (a minute's margin for clocks and LastModified's whole seconds);
        and those kept for a lease."""
        leased = {d: lease for d, lease in self.live_leases().items() if d in candidates}
        recent = {tag: entry for tag, entry in self.bucket.manifest_objects().items() if entry.modified >= since - 60}
        named = {digest for _, entry, data in self._read_all(recent)
                 if (manifest := _parse(data, entry.key)) is not None for digest in manifest.sizes}
        return [d for d in candidates if d not in leased and d not in named], leased

    def _delete_blob(self, digest: Digest, size: int, by: str) -> None:
        self.bucket.delete_blob(digest)
        log.info("removed blob digest=%s bytes=%d by=%s store=%s", digest.short, size, by, self.where)

    # -- gc ---------------------------------------------------------------------------------------

    def plan_gc(self, high: int | None, low: int | None, now: float | None = None) -> GcPlan:
        """What ``gc`` would remove: unreferenced blobs, unfinished uploads older than ``grace``,
        expired leases and stale take-over markers; with ``high``, least recently written tags (never
        a pinned one, nor one a replica is filling) until the bucket is down to ``low``."""
        now = time.time() if now is None else now
        inventory = self.inventory()
        all_leases, markers = self.leases.all()
        live = {lease.digest: lease for lease in all_leases if lease.expires > now}
        uploads = [(upload, self.bucket.upload_size(upload)) for upload in self.bucket.list_uploads()]
        usage = inventory.usage + sum(size for _, size in uploads)
        plan = GcPlan(usage, high, 0 if low is None else low, started=now, markers=markers,
                      leases=[lease for lease in all_leases if lease.expires <= now],
                      uploads=[(upload, size) for upload, size in uploads if now - upload.started >= self.grace])
        uses = Counter(digest for model in inventory.models for digest in model.manifest.sizes)
        for digest, entry in inventory.blobs.items():
            if uses[digest]:
                continue
            if digest in live:
                plan.leased[digest] = live[digest]
            elif now - entry.modified < self.grace:
                plan.young[digest] = entry.size
            else:
                plan.blobs[digest] = entry.size
        if high is None:
            return plan
        for model in sorted((m for m in inventory.models if not m.pinned), key=lambda m: m.modified):
            if usage - plan.freed <= plan.low:
                break
            digests = set(model.manifest.sizes)
            if digests & live.keys():
                continue
            plan.models.append(model)
            for digest in digests:
                uses[digest] -= 1
                if uses[digest] == 0 and digest in inventory.blobs:
                    plan.blobs[digest] = inventory.blobs[digest].size
        return plan

    def collect(self, plan: GcPlan) -> GcPlan:
        """Carry out the plan: tags first, then blobs still unused, uploads, markers, leases."""
        done = plan.done()
        for model in plan.models:
            self._drop_tag(model, "gc")
            done.models.append(model)
        deletable, done.leased = self._still_unused(plan.blobs, since=plan.started)
        done.leased.update(plan.leased)
        for digest in deletable:
            self._delete_blob(digest, plan.blobs[digest], "gc")
            done.blobs[digest] = plan.blobs[digest]
        for upload, size in plan.uploads:
            self.bucket.abort_upload(upload)
            log.info("aborted upload key=%s bytes=%d started=%.0f by=gc", upload.key, size, upload.started)
            done.uploads.append((upload, size))
        for digest in plan.markers:  # first: a stale marker keeps its lease from being cleared
            self.leases.remove_marker(digest)
            done.markers.append(digest)
        for lease in plan.leases:
            if self.leases.clear(lease, self.owner):
                log.info("removed expired lease digest=%s owner=%s by=gc", lease.digest.short, lease.owner)
                done.leases.append(lease)
        done.young = plan.young
        return done

    @contextmanager
    def gc_lock(self) -> Iterator[None]:
        """Hold ``leases/gc`` while the block runs, renewed every ``lock_stale / 5`` seconds; one
        left by a gc that died (not renewed for ``lock_stale``) is taken over. ``StoreBusy`` when
        another gc holds it. Two admins taking over one stale lock in the same moment may both run:
        the removals they share are idempotent."""
        key, token, started = self.bucket.keys.gc_lock, secrets.token_hex(16), time.time()

        def body() -> bytes:
            return json.dumps({"owner": self.owner, "token": token, "started": started,
                               "expires": time.time() + self.lock_stale}).encode()

        if not self.bucket.write_object(key, body(), if_absent=True):
            held = _GcLock.read(self.bucket.read_object(key))
            if held is not None and time.time() < held.expires:
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held.started))
                raise StoreBusy(f"another gc is running on {self.where} ({held.owner}, since {since}): wait for "
                                f"it to end (a gc that died leaves its lock, taken over after "
                                f"{self.lock_stale / 60:.0f} minutes)")
            log.warning("gc lock taken over store=%s from=%s reason=not renewed (that gc died?)", self.where,
                        held.owner if held else "unreadable")
            self.bucket.delete_object(key)
            if not self.bucket.write_object(key, body(), if_absent=True):
                raise StoreBusy(f"another gc is running on {self.where}: it took over the stale lock first")
        stop = threading.Event()
        renewer = threading.Thread(target=self._renew_lock, args=(key, token, body, stop), name="gc lock", daemon=True)
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join()
            held = _GcLock.read(self.bucket.read_object(key))
            if held is not None and held.token == token:
                self.bucket.delete_object(key)

    def _renew_lock(self, key: str, token: str, body: Callable[[], bytes], stop: threading.Event) -> None:
        while not stop.wait(self.lock_stale / 5):
            try:
                self.bucket.write_object(key, body())
            except Exception as exc:  # noqa: BLE001 - the gc goes on; the next renewal may pass
                log.warning("gc lock renew failed store=%s reason=%s", self.where, exc)

    # -- verify -----------------------------------------------------------------------------------

    def verify(self, inventory: Inventory, on_bytes: OnBytes) -> dict[Digest, tuple[str, list[CachedModel]]]:
        """Re-hash every blob of ``inventory``, streamed; one whose sha256 is not its name is moved
        to ``bad/``. Returns {bad digest: (where it went, the tags it breaks)}."""
        users = inventory.users()
        bad: dict[Digest, tuple[str, list[CachedModel]]] = {}
        for digest in sorted(inventory.blobs, key=lambda d: d.hex):
            with self.bucket.read_blob(digest) as body:
                if body is None:
                    continue  # removed since the listing (rm, gc)
                actual, _ = hash_stream(body, on_bytes)
            if actual == digest.hex:
                continue
            moved = f"s3://{self.bucket.location.bucket}/{self.bucket.quarantine_blob(digest)}"
            breaks: list[CachedModel] = list(users.get(digest, []))
            bad[digest] = (moved, breaks)
            log.warning("verify bad blob=%s actual=sha256:%s moved=%s breaks=%s store=%s", digest.short, actual[:12],
                        moved, ",".join(map(str, breaks)) or "no model", self.where)
        return bad

    # -- pins -------------------------------------------------------------------------------------

    def set_pinned(self, model: SharedModel, pinned: bool) -> None:
        note = json.dumps({"by": self.owner, "at": time.time()}).encode()
        self.bucket.set_pinned(model.host, model.name, model.tag, pinned, note)

    # -- between the bucket and a local cache --------------------------------------------------------

    def absent(self, chosen: Iterable[CachedModel]) -> dict[Digest, int]:
        """The blobs of ``chosen`` that the bucket does not hold whole: what ``upload`` sends."""
        present = self.bucket.list_blobs()
        return {layer.digest: layer.size for model in chosen for layer in model.blobs
                if present.get(layer.digest) != layer.size}

    def upload(self, store: BlobStore, chosen: Iterable[CachedModel], absent: dict[Digest, int],
               on_bytes: OnBytes) -> Uploaded:
        """Put local models into the bucket: each blob in ``absent`` (verified on its way into the
        local cache), then the model's manifest, so no replica meets a tag whose blobs are not there."""
        done = Uploaded()
        seen: set[Digest] = set()
        for model in chosen:
            for digest in dict.fromkeys(layer.digest for layer in model.blobs):
                if digest in seen:
                    continue
                seen.add(digest)
                if digest not in absent:
                    done.skipped += 1
                    continue
                fd = store.open_blob(digest)
                if fd is None:
                    raise ValueError(f"blob {digest} of {model} left the cache at {store.layout.root} before it "
                                     f"was uploaded: import it again")
                try:
                    self.bucket.put_blob(digest, fd, absent[digest], on_bytes)
                finally:
                    os.close(fd)
                done.blobs += 1
                done.bytes += absent[digest]
            self.bucket.put_manifest(model.host, model.name, model.tag, model.manifest.data)
            done.models.append(model)
        return done

    @staticmethod
    def lacking(store: BlobStore, chosen: Iterable[CachedModel]) -> dict[Digest, int]:
        """The blobs of ``chosen`` the local cache does not hold: what ``fetch`` copies."""
        return {layer.digest: layer.size for model in chosen for layer in model.blobs
                if store.blob_size(layer.digest) != layer.size}

    def fetch(self, store: BlobStore, model: SharedModel, on_bytes: OnBytes) -> int:
        """Copy a bucket model into the local cache: each blob it lacks, verified before it takes its
        final name, then the manifest. Returns the bytes copied."""
        if model.missing:
            raise ValueError(f"{model} is not whole in {self.where}: {len(model.missing)} of its blobs are missing there "
                             f"or of another size ({model.missing[0].digest.short}; a replica may still be filling it): "
                             f"pull it through a replica, or export it from a replica's cache")
        copied = 0
        for layer in {layer.digest: layer for layer in model.blobs}.values():
            if store.blob_size(layer.digest) == layer.size:
                continue
            with self.bucket.read_blob(layer.digest) as body:
                if body is None:
                    raise ValueError(f"blob {layer.digest} of {model} left {self.where} while it was being fetched "
                                     f"(rm or gc): `ollama-mirror ls --store {self.where}` says what is there now")
                try:
                    copied += store.ingest(body, layer.digest, on_bytes)
                except ValueError as exc:  # copy_verified: the bytes are not what the name says
                    raise ValueError(f"blob {layer.digest} in {self.where} is damaged ({exc}): "
                                     f"`ollama-mirror verify --store {self.where}` moves it aside") from None
        store.write_manifest(model.name, model.tag, model.manifest.data, model.digest, model.host)
        return copied


def _parse(data: bytes, key: str) -> Manifest | None:
    try:
        return Manifest.parse(data)
    except ManifestInvalid as exc:
        log.warning("manifest unreadable key=%s reason=%s", key, exc)
        return None


@dataclass(frozen=True)
class _GcLock:
    owner: str
    token: str
    started: float
    expires: float

    @classmethod
    def read(cls, data: bytes | None) -> _GcLock | None:
        """None when there is no lock, or it cannot be read (then it is taken for a stale one)."""
        if data is None:
            return None
        try:
            fields = json.loads(data)
            return cls(str(fields["owner"]), str(fields["token"]), float(fields["started"]), float(fields["expires"]))
        except (ValueError, TypeError, KeyError):
            return None
