"""Pull-through manifests: served from the store while fresh, revalidated after a TTL,
served stale when upstream is slow or gone.

Tags move, so a cached tag is trusted for ``manifest_ttl`` seconds and then asked
about again; a client waits at most ``revalidate_timeout`` for that answer
before it gets the cached copy, marked stale. The raw bytes are kept exactly as
upstream sent them: Ollama's model ID is their sha256.

Upstream answers a tag by User-Agent (412 to an Ollama too old for the model), so what
it answered is learned per client (``clients.TagAnswers``) and trusted for the same TTL:
a client it refused gets that refusal again, exactly, even when a newer client has the
tag cached; a client the mirror knows nothing about yet is asked about upstream with its
own User-Agent. Without upstream, a learned refusal is given again, and a client nothing
was learned about gets the cached manifest.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cachetools import LRUCache, TTLCache

from .clients import Answer, ClientAgent, Refusal, TagAnswers
from .config import Settings
from .errors import ManifestUnknown, UpstreamError, UpstreamInvalid, UpstreamRefused
from .manifest import MANIFEST_V2, Manifest, ManifestInvalid
from .metadata import ManifestRecord, Metadata
from .names import Digest, Name
from .replicas import Replicas
from .store import BlobStore, Generation
from .upstream import Upstream

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CachedManifest:
    parsed: Manifest
    fetched_at: float  # unix time upstream last confirmed it; 0 when unknown

    @property
    def data(self) -> bytes:
        return self.parsed.data

    @property
    def digest(self) -> Digest:
        return self.parsed.digest

    @property
    def media_type(self) -> str:
        return self.parsed.media_type


@dataclass(frozen=True, slots=True)
class ManifestAnswer:
    manifest: CachedManifest
    cache: str  # "hit", "miss" (fetched now), "revalidated" or "stale"


class ManifestService:
    GENERATION_CHECK = 1.0  # seconds between looks at the store's generation (tests lower it)

    def __init__(self, store: BlobStore, meta: Metadata, upstream: Upstream, settings: Settings, host: str,
                 replicas: Replicas | None = None) -> None:
        self._store, self._meta, self._upstream = store, meta, upstream
        self._replicas = replicas  # with a shared bucket: tags are written there too, and read from it on a miss
        self._host = host  # the registry host its tags are stored under
        self._settings = settings
        self._memory: LRUCache[tuple[str, str, str], CachedManifest] = LRUCache(maxsize=4096)
        self._answers: LRUCache[tuple[str, str, str], TagAnswers] = LRUCache(maxsize=4096)
        self._by_digest: LRUCache[Digest, CachedManifest] = LRUCache(maxsize=4096)
        self._missing: TTLCache[tuple[str, str, str], bool] = TTLCache(maxsize=4096, ttl=settings.negative_ttl)
        self._inflight: dict[tuple[object, ...], asyncio.Task[CachedManifest]] = {}
        self._saving: set[asyncio.Task[None]] = set()  # writes to disk nobody waits for
        self._locked = load_lock(settings.lock, self._host) if settings.lock else {}
        self._generation: Generation | None = None  # the store's, when the memory was last trusted
        self._generation_checked = -float("inf")  # monotonic time of the last look

    async def by_tag(
        self, name: Name, tag: str, client_headers: Mapping[str, str], revalidate: bool = False
    ) -> ManifestAnswer:
        """The tag's manifest for this client; ``revalidate`` asks upstream even within the TTL (an
        explicit pull). A client upstream refused gets the refusal, whoever else was served."""
        key = (name.namespace.lower(), name.model.lower(), tag.lower())
        if key in self._locked:
            return await self._by_lock(key, name, tag, client_headers)
        await self._drop_memory_if_changed()
        local = self._memory.get(key) or await asyncio.to_thread(self._load, name, tag)
        client = ClientAgent.parse(client_headers.get("user-agent", ""))
        known = await self._known(key, name, tag, local, client)
        if local is None and key in self._memory:  # another request fetched it while this one looked on disk
            local = self._memory[key]
            known = await self._known(key, name, tag, local, client)
        if local is not None:
            self._remember(key, local)
        if self._settings.offline:
            if known is not None and known.refusal is not None:
                raise self._refused_again(name, tag, client, known, "this mirror is offline")
            if local is None:
                raise ManifestUnknown(f"{name}:{tag} is not cached and this mirror is offline: bring it here with "
                                      "`ollama-mirror export` on a connected mirror and `ollama-mirror import`")
            return ManifestAnswer(local, "hit")
        if known is not None and not revalidate and time.time() - known.at < self._settings.manifest_ttl:
            if known.refusal is not None:
                raise self._refused_again(name, tag, client, known, "learned within the TTL")
            if local is not None:
                return ManifestAnswer(local, "hit")
        if local is None and key in self._missing:
            raise self._unknown(name, tag)
        task = self._fetch_once(key, name, tag, client_headers)
        if local is None:
            try:
                return ManifestAnswer(await asyncio.shield(task), "miss")
            except UpstreamRefused as exc:
                if exc.status == 404:
                    self._missing[key] = True
                    raise self._unknown(name, tag) from exc
                raise
            except UpstreamError as exc:
                if known is not None and known.refusal is not None:  # upstream down: what it said before
                    raise self._refused_again(name, tag, client, known, str(exc)) from exc
                raise
        return await self._revalidated(name, tag, local, task, client, known)

    async def _known(self, key: tuple[str, str, str], name: Name, tag: str, local: CachedManifest | None,
                     client: ClientAgent) -> Answer | None:
        """What upstream last answered this client (or decided for it) about the tag, if that still
        concerns the cached manifest."""
        answers = await self._learned(key, name, tag)
        if local is not None and answers.digest not in ("", str(local.digest)):
            return None  # learned about another manifest (the cache's was replaced, by an import say)
        return answers.answer_for(client)

    async def _learned(self, key: tuple[str, str, str], name: Name, tag: str) -> TagAnswers:
        found = self._answers.get(key)
        if found is None:
            stored = await asyncio.to_thread(self._meta.client_answers, self._host, name, tag)
            found = self._answers.setdefault(key, TagAnswers.from_dict(stored))  # unless learned meanwhile
        return found

    async def _learn(self, key: tuple[str, str, str], name: Name, tag: str,
                     change: Callable[[TagAnswers], TagAnswers]) -> None:
        answers = change(await self._learned(key, name, tag))  # read and replaced with no await between
        self._answers[key] = answers
        await asyncio.to_thread(self._meta.set_client_answers, self._host, name, tag, answers.to_dict())

    def _refused_again(self, name: Name, tag: str, client: ClientAgent, known: Answer,
                       why: str) -> UpstreamRefused:
        """Upstream's refusal for this client, given again exactly as it came."""
        assert known.refusal is not None
        refusal = known.refusal
        age = time.time() - known.at
        log.info("manifest refused name=%s tag=%s client=%s status=%d source=learned age_s=%.0f reason=%s",
                 name, tag, client.key or "-", refusal.status, age, why)
        return UpstreamRefused(f"upstream refused {client.key or 'this client'} {name}:{tag} with {refusal.status} "
                               f"{age:.0f} s ago", refusal.status, refusal.body, refusal.content_type)

    def _unknown(self, name: Name, tag: str) -> ManifestUnknown:
        return ManifestUnknown(f"{name}:{tag} is not in the upstream registry {self._upstream.base_url}: check the "
                               "model's name and tag")

    async def _revalidated(
        self, name: Name, tag: str, local: CachedManifest, task: asyncio.Task[CachedManifest],
        client: ClientAgent, known: Answer | None,
    ) -> ManifestAnswer:
        """Upstream's answer if it comes in time; else what was learned: a refusal again, or the
        cached copy, marked stale."""
        try:
            fresh = await asyncio.wait_for(asyncio.shield(task), self._settings.revalidate_timeout)
            return ManifestAnswer(fresh, "revalidated")
        except TimeoutError:
            reason = f"upstream did not answer within {self._settings.revalidate_timeout:g}s"
        except UpstreamRefused as exc:
            if exc.status != 404:
                raise  # 412 and kin: the client must see them (a newer Ollama is needed)
            reason = "upstream answered 404; keeping the cached tag"
        except UpstreamError as exc:
            reason = str(exc)
        if known is not None and known.refusal is not None:
            raise self._refused_again(name, tag, client, known, reason)
        log.warning("manifest stale name=%s tag=%s digest=%s reason=%s", name, tag, local.digest.short, reason)
        return ManifestAnswer(local, "stale")

    def _fetch_once(
        self, key: tuple[str, str, str], name: Name, tag: str, client_headers: Mapping[str, str]
    ) -> asyncio.Task[CachedManifest]:
        """One upstream request per tag and client version at a time (the registry answers by it)."""
        headers = {
            "User-Agent": client_headers.get("user-agent", ""),
            "Accept": client_headers.get("accept") or MANIFEST_V2,
        }
        client = ClientAgent.parse(headers["User-Agent"])
        flight = (*key, client.key)
        task = self._inflight.get(flight)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch(key, name, tag, headers, client))
            self._inflight[flight] = task
            task.add_done_callback(lambda t: self._landed(flight, t))
        return task

    def _landed(self, flight: tuple[object, ...], task: asyncio.Task[CachedManifest]) -> None:
        self._inflight.pop(flight, None)
        if not task.cancelled():
            task.exception()  # retrieved here, so an answer nobody waited for is not reported as lost

    async def _fetch(
        self, key: tuple[str, str, str], name: Name, tag: str, headers: Mapping[str, str], client: ClientAgent
    ) -> CachedManifest:
        try:
            fetched = await self._upstream.get_manifest(name, tag, headers)
        except UpstreamRefused as exc:
            if exc.status == 412:  # "requires a newer version of Ollama": an answer for this client only
                refusal = Refusal(exc.status, exc.body, exc.content_type)
                await self._learn(key, name, tag, lambda answers: answers.refused(client, refusal, time.time()))
                log.info("manifest refused name=%s tag=%s client=%s status=%d source=upstream", name, tag,
                         client.key or "-", exc.status)
            raise
        try:
            parsed = Manifest.parse(fetched.data)
        except ManifestInvalid as exc:
            raise UpstreamInvalid(f"upstream sent an invalid manifest for {name}:{tag}: {exc}") from None
        manifest = CachedManifest(parsed, time.time())
        answers = (await self._learned(key, name, tag)).accepted(client, str(manifest.digest), manifest.fetched_at)
        # The manifest and what upstream answered become visible together, with no await between:
        # a client that saw the one without the other would ask upstream again.
        self._remember(key, manifest)
        self._answers[key] = answers
        self._missing.pop(key, None)
        self._meta.remember_blob_sizes(manifest.parsed.sizes)  # HEAD answers from them at once
        self._in_background(self._save, name, tag, manifest, answers)
        log.info("manifest fetched name=%s tag=%s digest=%s bytes=%d", name, tag, manifest.digest.short,
                 len(manifest.data))
        return manifest

    def _in_background(self, save: Callable[..., None], *args: object) -> None:
        """Write to disk without the client waiting: a manifest fsynced while fills write gigabytes
        waits for their writeback (hundreds of ms); it is served from memory meanwhile."""
        task = asyncio.get_running_loop().create_task(asyncio.to_thread(save, *args))
        self._saving.add(task)
        task.add_done_callback(self._saving.discard)

    async def written(self) -> None:
        """Wait for the manifest writes in flight: a pull that says "success" has its model on
        disk, where ``/api/tags`` and every other process look (a write waiting for the
        writeback of a busy disk took over a second)."""
        if self._saving:
            await asyncio.gather(*self._saving, return_exceptions=True)

    def _save(self, name: Name, tag: str, manifest: CachedManifest, answers: TagAnswers | None = None) -> None:
        try:
            # What was learned goes first: writing the tag moves the store's generation, and every
            # process (this one too) then reloads the tag from disk, which must find its record.
            self._meta.set_blob_sizes(manifest.parsed.sizes)
            record = ManifestRecord(manifest.fetched_at, self._upstream.base_url, str(manifest.digest))
            self._meta.set_manifest(self._host, name, tag, record)
            if answers is not None:
                self._meta.set_client_answers(self._host, name, tag, answers.to_dict())
            self._store.write_manifest(name, tag, manifest.data, manifest.digest, self._host)
        except (OSError, sqlite3.OperationalError) as exc:  # a full disk: served from memory, uncached
            log.warning("manifest not cached name=%s tag=%s reason=%s; serving it from memory", name, tag, exc)
        if self._replicas is not None:
            self._replicas.save_manifest(self._host, name, tag, manifest.data)

    def _load(self, name: Name, tag: str) -> CachedManifest | None:
        data = self._store.read_manifest(name, tag, self._host)
        if data is None and self._replicas is not None:
            return self._load_shared(name, tag)
        if data is None:
            return None
        try:
            parsed = Manifest.parse(data)
        except ManifestInvalid as exc:  # never written by us; fetched again as if absent
            log.warning("manifest unreadable name=%s tag=%s reason=%s", name, tag, exc)
            return None
        record = self._meta.manifest(self._host, name, tag)
        fetched_at = record.fetched_at if record is not None and record.digest == str(parsed.digest) else 0.0
        return CachedManifest(parsed, fetched_at)

    def _load_shared(self, name: Name, tag: str) -> CachedManifest | None:
        """Another replica's copy from the bucket, kept here too. Its age is unknown here, so it is
        revalidated as if old: served at once only when upstream cannot be asked."""
        assert self._replicas is not None
        data = self._replicas.load_manifest(self._host, name, tag)
        if data is None:
            return None
        try:
            parsed = Manifest.parse(data)
        except ManifestInvalid as exc:
            log.warning("manifest unreadable in the bucket name=%s tag=%s reason=%s", name, tag, exc)
            return None
        self._meta.set_blob_sizes(parsed.sizes)  # HEAD answers from them, upstream or not
        self._store.write_manifest(name, tag, data, parsed.digest, self._host)
        return CachedManifest(parsed, 0.0)

    def _remember(self, key: tuple[str, str, str], manifest: CachedManifest) -> None:
        self._memory[key] = manifest
        self._by_digest[manifest.digest] = manifest

    async def _by_lock(
        self, key: tuple[str, str, str], name: Name, tag: str, client_headers: Mapping[str, str]
    ) -> ManifestAnswer:
        """A locked tag: exactly the manifest the lock names, never revalidated."""
        digest = self._locked[key]
        try:
            return ManifestAnswer(await self.by_digest(digest), "locked")
        except ManifestUnknown:
            if self._settings.offline:
                raise ManifestUnknown(f"{name}:{tag} is locked to {digest}, which is not cached") from None
        fetched = await self._fetch_once(key, name, tag, client_headers)
        if fetched.digest != digest:
            raise ManifestUnknown(f"{name}:{tag} is locked to {digest}; upstream now has {fetched.digest}")
        return ManifestAnswer(fetched, "locked")

    def forget(self, name: Name, tag: str) -> None:
        """Drop a removed tag from memory, so it is not served from there."""
        self._memory.pop((name.namespace.lower(), name.model.lower(), tag.lower()), None)

    async def _drop_memory_if_changed(self) -> None:
        """Another process (``ollama-mirror rm``, ``gc``, ``import``, ``pull``) may have changed the
        tags on disk: at most once a second, compare the store's generation, and when it moved,
        forget every tag and manifest, so each is read from disk again (a removed model's manifest
        is not answered by its digest either)."""
        now = time.monotonic()
        if now - self._generation_checked < self.GENERATION_CHECK:
            return
        self._generation_checked = now  # before the await: concurrent requests do not look too
        generation = await asyncio.to_thread(self._store.generation)
        if generation != self._generation:
            if self._generation is not None and self._memory:
                log.info("manifest memory dropped tags=%d reason=the cache's tags changed on disk",
                         len(self._memory))
            self._memory.clear()
            self._by_digest.clear()
            self._answers.clear()  # another process may have learned answers too
            self._generation = generation

    async def by_digest(self, digest: Digest) -> CachedManifest:
        """A manifest by digest: only from the store, since the registry does not answer these."""
        await self._drop_memory_if_changed()
        manifest = self._by_digest.get(digest)
        if manifest is None:
            data = await asyncio.to_thread(self._store.read_manifest_by_digest, digest)
            if data is None and self._replicas is not None:  # another replica's, behind the same name
                data = await asyncio.to_thread(self._replicas.load_manifest_by_digest, digest)
            try:
                parsed = Manifest.parse(data) if data is not None else None
            except ManifestInvalid:
                parsed = None
            if parsed is None:
                raise ManifestUnknown(f"manifest {digest} is not in the mirror")
            manifest = CachedManifest(parsed, 0.0)
            self._by_digest[digest] = manifest
        return manifest


def load_lock(path: Path, host: str) -> dict[tuple[str, str, str], Digest]:
    """The tags a lock file pins for this upstream host: {(namespace, model, tag): manifest digest}."""
    doc = json.loads(path.read_text())
    locked = {}
    for model, digest in doc.get("models", {}).items():
        model_host, _, rest = model.partition("/")
        if model_host != host:
            continue
        path_part, _, tag = rest.rpartition(":")
        name = Name.parse(path_part)
        locked[(name.namespace.lower(), name.model.lower(), tag.lower())] = Digest.parse(digest)
    return locked
