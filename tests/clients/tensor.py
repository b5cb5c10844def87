"""Ollama v0.32.15's pull path for tensor models (x/transfer, via server/images.go pullWithTransfer).

The manifest comes as on the GGUF path (server/images.go). Then every blob, the
layers then the config, is its own task (64 at most), and each attempt holds one
of ``OLLAMA_MAX_TRANSFER_STREAMS`` body slots (default 4) while it:

- resolves: GETs the blob URL without Range and reads the body to the end;
  200 means "fetch this URL"; 301/302/307 to another host:port is the answer,
  to the same host:port is followed; anything else fails the attempt;
- fetches: GETs the resolved URL for the whole blob (``Range: bytes=N-`` only to
  resume a blob of 64 MiB or more from its ``.tmp`` file), 200 or 206 accepted,
  with the Bearer token only if that URL is on the registry's host:port;
- copies the body with a stall timer (10 s without a byte) and a speed check
  (after 5 s, below 10% of the median speed of the blobs already done is "too
  slow"). Either one only takes effect when the next read returns, and the rest
  of the body is then read and thrown away before the retry: the connection is
  never cut short.

Sizes and digests are checked at the end; nothing is hashed again afterwards.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urljoin

import httpx

from .registry import (
    OLLAMA_USER_AGENT,
    RegistryOptions,
    get_authorization_token,
    manifest_blobs,
    pull_model_manifest,
)
from .wire import BlobRecord, GoHttp, PullResult, body_chunks, describe, host_port, never_follow

TRANSFER_USER_AGENT = "ollama-transfer/1.0"  # x/transfer/transfer.go: defaultUserAgent


@dataclass(frozen=True, kw_only=True)
class TensorOptions:
    """The Go constants, as parameters so that tests can shrink them."""

    streams: int = 4  # OLLAMA_MAX_TRANSFER_STREAMS (envconfig.MaxTransferStreams): body slots
    concurrency: int = 64  # DefaultDownloadConcurrency: blobs in flight
    max_retries: int = 6  # maxRetries
    stall_timeout: float = 10.0  # defaultStallTimeout: no byte for this long, once the headers are in
    tick: float = 1.0  # copy: the watcher's ticker
    slow_after: float = 5.0  # copy: the speed check starts after 5 s of body
    slow_fraction: float = 0.1  # copy: below 10% of the median is too slow
    min_samples: int = 5  # speedTracker.median: fewer samples, no speed check
    max_samples: int = 30  # speedTracker.record: the last 30 kept
    small_blob: int = 100 << 10  # smallBlobSpeedThreshold: smaller blobs give no speed sample
    resume_threshold: int = 64 << 20  # resumeThreshold: smaller blobs restart from scratch
    backoff_step: float = 0.010  # backoff: attempt^2 * 10ms, capped at 2^(attempt-1) s, times 0.5..1.5
    user_agent: str = TRANSFER_USER_AGENT
    registry_user_agent: str = OLLAMA_USER_AGENT  # the manifest and token requests (server/images.go)
    connect_timeout: float | None = None  # its http.Transport sets no dial timeout
    hosts: dict[str, str] | None = None  # the machine's /etc/hosts (or a LAN DNS override): name -> address
    ssl_context: ssl.SSLContext | None = None  # the machine's trusted CAs (None: certifi's)


class TransferError(Exception):
    pass


class Stalled(TransferError):
    def __init__(self) -> None:
        super().__init__("download stalled")  # errStalled


class TooSlow(TransferError):
    def __init__(self) -> None:
        super().__init__("download too slow")  # errSlow


class Interrupted(TransferError):
    """The test's interruption hook dropped the connection: an ordinary failed attempt."""


# (digest, bytes of the blob in its .tmp file so far) -> True drops the connection now.
InterruptHook = Callable[[str, int], bool]


@dataclass
class Blob:
    digest: str
    size: int


class SpeedTracker:
    """x/transfer/download.go: speedTracker (bytes per second of finished blobs)."""

    def __init__(self, min_samples: int, max_samples: int) -> None:
        self.min_samples = min_samples
        self.max_samples = max_samples
        self.speeds: list[float] = []

    def record(self, speed: float) -> None:
        self.speeds = [*self.speeds, speed][-self.max_samples:]

    def median(self) -> float:
        if len(self.speeds) < self.min_samples:
            return 0.0
        ordered = sorted(self.speeds)
        return ordered[len(ordered) // 2]


def parse_auth_challenge(header: str) -> dict[str, str]:
    """x/transfer/transfer.go: parseAuthChallenge (its own parser, not server/images.go's)."""
    text = header.removeprefix("Bearer ")

    def value(key: str) -> str:
        at = text.find(key + "=")
        if at == -1:
            return ""
        start = at + len(key) + 1
        if start >= len(text):
            return ""
        if text[start] == '"':
            end = text.find('"', start + 1)
            return text[start + 1:] if end == -1 else text[start + 1:end]
        end = text.find(",", start)
        return text[start:] if end == -1 else text[start:end]

    return {"realm": value("realm"), "service": value("service"), "scope": value("scope")}


class TensorClient:
    def __init__(self, base: str, dest: Path, options: TensorOptions | None = None,
                 interrupt: InterruptHook | None = None) -> None:
        self.base = base.rstrip("/")
        self.dest = dest
        self.options = options or TensorOptions()
        self.interrupt = interrupt

    def blob_path(self, digest: str) -> Path:
        return self.dest / digest.replace(":", "-")

    def tmp_path(self, digest: str) -> Path:
        return Path(f"{self.blob_path(digest)}.tmp")

    async def pull(self, name: str, tag: str) -> PullResult:
        """server/images.go: PullModel then pullWithTransfer. Never raises: failures land in ``result.error``."""
        self.dest.mkdir(parents=True, exist_ok=True)
        result = PullResult()
        http = GoHttp(result, connect_timeout=self.options.connect_timeout, hosts=self.options.hosts,
                      ssl_context=self.options.ssl_context)
        self._registry = RegistryOptions(user_agent=self.options.registry_user_agent)
        self._token_lock = asyncio.Lock()
        self._speeds = SpeedTracker(self.options.min_samples, self.options.max_samples)
        self._bodies = asyncio.Semaphore(max(1, self.options.streams))
        try:
            try:
                result.manifest = await pull_model_manifest(http, self.base, name, tag, self._registry)
            except Exception as exc:
                raise TransferError(f"pull model manifest: {describe(exc)}") from exc
            blobs = [Blob(digest, size) for digest, size, _ in manifest_blobs(result.manifest)]
            await self._download_all(http, name, blobs)
        except Exception as exc:  # noqa: BLE001 - every error is the pull's error
            result.error = describe(exc)
            http.event("error", None, result.error)
        finally:
            result.elapsed = http.now()
            await http.aclose()
        return result

    async def _download_all(self, http: GoHttp, name: str, blobs: list[Blob]) -> None:
        """x/transfer/download.go: download: skip blobs on disk at their size, then all at once."""
        todo = []
        for blob in blobs:
            record = http.result.blobs.setdefault(blob.digest, BlobRecord(blob.digest, blob.size))
            path = self.blob_path(blob.digest)
            if path.exists() and path.stat().st_size == blob.size:
                record.cache_hit = True
            else:
                todo.append(blob)
        in_flight = asyncio.Semaphore(self.options.concurrency)

        async def one(blob: Blob) -> None:
            async with in_flight:
                await self._download(http, name, blob)

        try:
            async with asyncio.TaskGroup() as group:
                for blob in todo:
                    group.create_task(one(blob))
        except ExceptionGroup as failed:
            raise failed.exceptions[0] from None  # errgroup: the first error, the others cancelled

    async def _download(self, http: GoHttp, name: str, blob: Blob) -> None:
        """x/transfer/download.go: downloader.download: attempts, backoff, the speed sample."""
        record = http.result.blobs[blob.digest]
        record.started = http.now()
        attempt = slow_retries = 0
        last: Exception | None = None
        while attempt < self.options.max_retries:
            if attempt > 0:
                step = min(attempt * attempt * self.options.backoff_step, float(1 << (attempt - 1)))
                await asyncio.sleep(step * (random.random() + 0.5))
            started = time.monotonic()  # before waiting for a body slot and resolving
            try:
                await self._download_once(http, name, blob, record)
            except Exception as exc:  # noqa: BLE001 - Go retries on any error
                if blob.size < self.options.resume_threshold:
                    self.tmp_path(blob.digest).unlink(missing_ok=True)
                if isinstance(exc, Stalled):
                    http.event("stalled", blob.digest, "")  # not counted
                elif isinstance(exc, TooSlow):
                    http.event("too slow", blob.digest, f"slow retry {slow_retries + 1}")
                    slow_retries += 1
                    if slow_retries >= 3:  # the third slow retry and every one after it count
                        attempt += 1
                else:
                    http.event("retry", blob.digest, f"attempt {attempt}: {describe(exc)}")
                    attempt += 1
                last = exc
                continue
            if blob.size >= self.options.small_blob:
                elapsed = time.monotonic() - started
                if elapsed > 0:
                    self._speeds.record(blob.size / elapsed)
            record.finished = http.now()
            return
        raise TransferError(f"max retries exceeded: {describe(last)}")

    async def _download_once(self, http: GoHttp, name: str, blob: Blob, record: BlobRecord) -> None:
        """x/transfer/download.go: downloader.downloadOnce: one body slot for resolve and fetch."""
        async with self._bodies:
            url = await self._resolve(http, f"{self.base}/v2/{name}/blobs/{blob.digest}", blob.digest, record)
            record.direct_url = url
            record.resolved = http.now()
            existing = self._resumable_size(blob)
            headers = {"User-Agent": self.options.user_agent}
            if host_port(url) == host_port(self.base) and self._registry.token:
                headers["Authorization"] = f"Bearer {self._registry.token}"
            if existing > 0:
                headers["Range"] = f"bytes={existing}-"
            response = await http.open("GET", url, headers, check_redirect=never_follow, digest=blob.digest)
            chunks = body_chunks(response)
            broken = False
            try:
                if response.status_code == 200:
                    existing = 0
                elif response.status_code != 206:
                    raise TransferError(f"status {response.status_code}")
                await self._save(blob, chunks, existing, record)
            except (Interrupted, httpx.TransportError):
                broken = True
                raise
            finally:
                if not broken:  # the deferred io.Copy(io.Discard, resp.Body): the rest is read, not cut
                    await _drain(chunks, record)
                await response.aclose()

    def _resumable_size(self, blob: Blob) -> int:
        """downloadOnce: a .tmp shorter than the blob resumes it, only at resume_threshold and above."""
        tmp = self.tmp_path(blob.digest)
        if blob.size < self.options.resume_threshold or not tmp.exists():
            return 0
        size = tmp.stat().st_size
        if size > blob.size:
            tmp.unlink()
        return size if size < blob.size else 0

    async def _save(self, blob: Blob, chunks: AsyncIterator[bytes], existing: int, record: BlobRecord) -> None:
        """x/transfer/download.go: downloader.save: hash as it goes, check digest and size, rename."""
        tmp = self.tmp_path(blob.digest)
        h = hashlib.sha256()
        existing = _rehash(tmp, existing, h)
        with open(tmp, "r+b" if existing else "wb") as f:  # noqa: ASYNC230 - a test client's small files
            f.seek(existing)
            n = await self._copy(blob, f, chunks, h, existing, record)
        if f"sha256:{h.hexdigest()}" != blob.digest:
            tmp.unlink()
            raise TransferError("digest mismatch")
        if existing + n != blob.size:
            tmp.unlink()
            raise TransferError("size mismatch")
        tmp.replace(self.blob_path(blob.digest))

    async def _copy(self, blob: Blob, f: BinaryIO, chunks: AsyncIterator[bytes], h: Any, existing: int,
                    record: BlobRecord) -> int:
        """x/transfer/download.go: downloader.copy. The watcher's verdict is seen before the next read only."""
        options = self.options
        start = last_read = time.monotonic()
        n = 0
        verdict: TransferError | None = None

        async def watch() -> None:
            nonlocal verdict
            while True:
                await asyncio.sleep(options.tick)
                now = time.monotonic()
                if now - last_read > options.stall_timeout:
                    verdict = Stalled()
                    return
                elapsed = now - start
                if elapsed > options.slow_after:
                    median = self._speeds.median()
                    if median > 0 and n / elapsed < median * options.slow_fraction:
                        verdict = TooSlow()
                        return

        watcher = asyncio.create_task(watch())
        try:
            while True:
                if verdict is not None:
                    raise verdict
                try:
                    data = await anext(chunks)
                except StopAsyncIteration:
                    return n
                last_read = time.monotonic()
                f.write(data)
                h.update(data)
                n += len(data)
                record.received += len(data)
                if self.interrupt is not None and self.interrupt(blob.digest, existing + n):
                    f.flush()
                    raise Interrupted(f"connection dropped by the test after {existing + n} bytes")
        finally:
            watcher.cancel()

    async def _resolve(self, http: GoHttp, url: str, digest: str, record: BlobRecord) -> str:
        """x/transfer/download.go: downloader.resolve. Redirects are compared as host:port strings."""
        for _ in range(10):
            headers = {"User-Agent": self.options.user_agent}
            previous = self._registry.token
            if previous:
                headers["Authorization"] = f"Bearer {previous}"
            response = await http.open("GET", url, headers, check_redirect=never_follow, digest=digest)
            try:
                async for data in body_chunks(response):  # read to the end "to reuse the connection"
                    record.received += len(data)
                    record.resolve_bytes += len(data)
            finally:
                await response.aclose()
            status = response.status_code
            if status == 200:
                return url
            if status == 401:
                await self._refresh_token(http, response.headers.get("www-authenticate", ""), previous)
            elif status in (301, 302, 307):
                location = response.headers.get("location")
                if not location:  # resp.Location() gives a nil URL, and loc.Host panics: the server dies
                    raise TransferError(f"status {status} without Location (the real client panics)")
                target = urljoin(url, location)
                if host_port(target) != host_port(url):
                    return target
                url = target
            else:
                raise TransferError(f"status {status}")
        raise TransferError("too many redirects")

    async def _refresh_token(self, http: GoHttp, challenge: str, previous: str) -> None:
        """x/transfer/download.go: downloader.refreshToken: concurrent 401s fetch one token."""
        async with self._token_lock:
            if self._registry.token != previous:
                return
            self._registry.token = await get_authorization_token(
                http, parse_auth_challenge(challenge), host_port(self.base), self.options.registry_user_agent)


def _rehash(tmp: Path, existing: int, h: Any) -> int:
    """save: a resumed .tmp is hashed again from its start; one that cannot be read starts over."""
    if existing == 0:
        return 0
    with open(tmp, "rb") as f:
        kept = f.read(existing)
    if len(kept) != existing:
        tmp.unlink()
        return 0
    h.update(kept)
    return existing


async def _drain(chunks: AsyncIterator[bytes], record: BlobRecord) -> None:
    try:
        async for data in chunks:
            record.received += len(data)
    except httpx.HTTPError:
        pass
