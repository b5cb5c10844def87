"""Ollama v0.32.15's default pull path (server/images.go PullModel, server/download.go), for tests.

Per blob, one blob at a time, the layers then the config: a HEAD for the size,
a resolving GET (not read) whose Location is the direct URL, then the blob cut
in parts fetched as Range GETs to that URL, 16 at once, with Go's default
User-Agent and no credentials. Like the real client it checks neither status
nor Content-Range of a part: it reads the part's length, whatever comes. After
every blob is in, each is hashed; a mismatch deletes it and fails the pull.

Resume state (the ``-partial-N`` JSON files of the real client) lives on the
``GgufClient`` instance: a second ``pull`` after a failed one resumes the parts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import random
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin

import httpx

from .registry import (
    OLLAMA_USER_AGENT,
    RegistryOptions,
    make_request_with_retry,
    manifest_blobs,
    pull_model_manifest,
)
from .wire import (
    GO_USER_AGENT,
    BlobRecord,
    GoHttp,
    PullResult,
    RedirectStop,
    body_chunks,
    describe,
    go_default_redirects,
    hostname,
)


@dataclass(frozen=True, kw_only=True)
class GgufOptions:
    """The Go constants, as parameters so that tests can shrink them."""

    min_part: int = 100_000_000  # minDownloadPartSize = 100 * format.MegaByte
    max_part: int = 1_000_000_000  # maxDownloadPartSize = 1000 * format.MegaByte
    num_parts: int = 16  # numDownloadParts: the divisor and the number of parts at once
    stall_timeout: float = 30.0  # downloadStallTimeout, counted from each attempt's start (v0.32.2+)
    resolve_deadline: float = 30.0  # run: context.WithTimeout(ctx, 30*time.Second), retries included
    resolve_backoff_step: float = 0.010  # newBackoff: n*n*10ms ...
    resolve_backoff_max: float = 10.0  # ... capped at 10 s, then times 0.5..1.5
    retry_sleep: float = 1.0  # run: a failed part sleeps 2^try seconds
    max_retries: int = 6  # maxRetries
    connect_timeout: float = 30.0  # http.DefaultTransport's dialer
    hosts: dict[str, str] | None = None  # the machine's /etc/hosts (or a LAN DNS override): name -> address
    ssl_context: ssl.SSLContext | None = None  # the machine's trusted CAs (None: certifi's)
    user_agent: str = OLLAMA_USER_AGENT


class DownloadError(Exception):
    pass


class PartStalled(Exception):
    pass


class UnexpectedEOF(Exception):
    """io.ErrUnexpectedEOF: the body ended before its Content-Length; the bytes read are kept."""


@dataclass
class Part:
    """server/download.go: blobDownloadPart."""

    n: int
    offset: int
    size: int
    completed: int = 0
    last_updated: float = 0.0  # time.monotonic() of the last byte; 0: none since the last stall

    @property
    def starts_at(self) -> int:
        return self.offset + self.completed

    @property
    def stops_at(self) -> int:
        return self.offset + self.size


@dataclass
class Partial:
    """server/download.go: blobDownload's size and parts, which outlive a failed pull."""

    total: int
    parts: list[Part] = field(default_factory=list)


def split_parts(total: int, options: GgufOptions) -> list[Part]:
    """server/download.go: blobDownload.Prepare: size/16 clamped to [min_part, max_part]."""
    size = min(max(total // options.num_parts, options.min_part), options.max_part)
    parts: list[Part] = []
    offset = 0
    while offset < total:
        length = min(size, total - offset)
        parts.append(Part(len(parts), offset, length))
        offset += length
    return parts


def _jittered(seconds: float) -> float:
    return seconds * (random.random() + 0.5)


class GgufClient:
    def __init__(self, base: str, dest: Path, options: GgufOptions | None = None) -> None:
        self.base = base.rstrip("/")
        self.dest = dest
        self.options = options or GgufOptions()
        self.partials: dict[str, Partial] = {}

    def blob_path(self, digest: str) -> Path:
        return self.dest / digest.replace(":", "-")

    async def pull(self, name: str, tag: str) -> PullResult:
        """server/images.go: PullModel (GGUF branch). Never raises: failures land in ``result.error``."""
        self.dest.mkdir(parents=True, exist_ok=True)
        result = PullResult()
        http = GoHttp(result, connect_timeout=self.options.connect_timeout, hosts=self.options.hosts,
                      ssl_context=self.options.ssl_context)
        registry = RegistryOptions(user_agent=self.options.user_agent)
        try:
            try:
                result.manifest = await pull_model_manifest(http, self.base, name, tag, registry)
            except Exception as exc:
                raise DownloadError(f"pull model manifest: {describe(exc)}") from exc
            layers = manifest_blobs(result.manifest)
            skip_verify: dict[str, bool] = {}
            for digest, size, _ in layers:
                hit = await self._download_blob(http, registry, name, digest, size)
                skip_verify[digest] = skip_verify.get(digest, True) and hit
            for digest, _, _ in layers:
                if not skip_verify[digest]:
                    await self._verify(digest)
        except Exception as exc:  # noqa: BLE001 - every error is the pull's error
            result.error = describe(exc)
            http.event("error", None, result.error)
        finally:
            result.elapsed = http.now()
            await http.aclose()
        return result

    async def _download_blob(self, http: GoHttp, registry: RegistryOptions, name: str, digest: str,
                             size: int) -> bool:
        """server/download.go: downloadBlob, Prepare, then run. True: a cache hit."""
        record = http.result.blobs.setdefault(digest, BlobRecord(digest, size))
        if self.blob_path(digest).exists():
            record.cache_hit = True
            return True
        record.started = http.now()
        url = f"{self.base}/v2/{name}/blobs/{digest}"
        partial = self.partials.get(digest)
        if partial is None:
            response = await make_request_with_retry(http, "HEAD", url, None, registry, digest=digest)
            await response.aclose()
            try:
                total = int(response.headers.get("content-length", ""))
            except ValueError:
                total = 0  # strconv.ParseInt's error is ignored: no parts, and the digest fails
            partial = self.partials[digest] = Partial(total, split_parts(total, self.options))
        await self._run(http, registry, url, digest, partial, record)
        record.finished = http.now()
        return False

    async def _run(self, http: GoHttp, registry: RegistryOptions, url: str, digest: str, partial: Partial,
                   record: BlobRecord) -> None:
        """server/download.go: blobDownload.run."""
        staging = Path(f"{self.blob_path(digest)}-partial")
        fd = os.open(staging, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            os.ftruncate(fd, partial.total)
            direct = await self._direct_url(http, registry, url, digest)
            record.direct_url, record.resolved = direct, http.now()
            slots = asyncio.Semaphore(self.options.num_parts)  # errgroup SetLimit(numDownloadParts)
            try:
                async with asyncio.TaskGroup() as group:
                    for part in partial.parts:
                        if part.completed < part.size:
                            group.create_task(self._part(http, slots, direct, fd, digest, part, record))
            except ExceptionGroup as failed:
                raise failed.exceptions[0] from None  # errgroup: the first error, the others cancelled
        finally:
            os.close(fd)
        staging.replace(self.blob_path(digest))
        del self.partials[digest]

    async def _direct_url(self, http: GoHttp, registry: RegistryOptions, url: str, digest: str) -> str:
        """server/download.go: blobDownload.run's directURL closure: a GET without Range, not read."""
        origin = hostname(url)

        def same_host(target: str, via: int) -> bool:
            if via > 10:
                raise RedirectStop("maximum redirects exceeded (10) for directURL")
            return hostname(target) == origin  # the port is ignored

        tries = 0
        try:
            async with asyncio.timeout(self.options.resolve_deadline):
                while True:
                    options = dataclasses.replace(registry)  # a shallow copy: a token learnt here stays here
                    try:
                        response = await make_request_with_retry(http, "GET", url, None, options,
                                                                 check_redirect=same_host, digest=digest)
                        break
                    except Exception as exc:  # noqa: BLE001 - Go retries on any error until the deadline
                        http.event("resolve retry", digest, describe(exc))
                        tries += 1
                        step = min(tries * tries * self.options.resolve_backoff_step, self.options.resolve_backoff_max)
                        await asyncio.sleep(_jittered(step))
        except TimeoutError:
            raise DownloadError("context deadline exceeded") from None
        await response.aclose()  # the body is never read
        if response.status_code not in (307, 200):
            raise DownloadError(f"unexpected status code {response.status_code}")
        location = response.headers.get("location")
        if not location:
            raise DownloadError("http: no Location header in response")
        return urljoin(str(response.url), location)

    async def _part(self, http: GoHttp, slots: asyncio.Semaphore, direct: str, fd: int, digest: str, part: Part,
                    record: BlobRecord) -> None:
        """server/download.go: run's per-part retry loop (stalls retry for ever, other errors 6 times)."""
        async with slots:
            error: Exception | None = None
            tries = 0
            while tries < self.options.max_retries:
                try:
                    await self._download_chunk(http, direct, fd, digest, part, record)
                    return
                except PartStalled:
                    http.event("stalled", digest, f"part {part.n}")
                except Exception as exc:  # noqa: BLE001 - Go retries on any error
                    error = exc
                    sleep = self.options.retry_sleep * 2**tries
                    http.event("retry", digest, f"part {part.n} attempt {tries} failed: {describe(exc)}")
                    await asyncio.sleep(sleep)
                    tries += 1
            raise DownloadError(f"max retries exceeded: {describe(error)}")

    async def _download_chunk(self, http: GoHttp, direct: str, fd: int, digest: str, part: Part,
                              record: BlobRecord) -> None:
        """server/download.go: blobDownload.downloadChunk: the transfer, and its stall watch.

        The clock starts when the attempt starts, so connecting and waiting for headers count.
        """
        started = time.monotonic()
        transfer = asyncio.create_task(self._transfer(http, direct, fd, digest, part, record))
        tick = min(1.0, self.options.stall_timeout / 2)
        try:
            while True:
                done, _ = await asyncio.wait({transfer}, timeout=tick)
                if done:
                    return transfer.result()
                if time.monotonic() - max(part.last_updated, started) > self.options.stall_timeout:
                    part.last_updated = 0.0
                    raise PartStalled()
        finally:
            if not transfer.done():
                transfer.cancel()  # errgroup cancels the request with errPartStalled: its bytes roll back
            await asyncio.gather(transfer, return_exceptions=True)

    async def _transfer(self, http: GoHttp, direct: str, fd: int, digest: str, part: Part,
                        record: BlobRecord) -> None:
        """downloadChunk's first goroutine: io.CopyN of the part's remaining length, status unchecked."""
        headers = {"Range": f"bytes={part.starts_at}-{part.stops_at - 1}", "User-Agent": GO_USER_AGENT}
        position, want, n = part.starts_at, part.size - part.completed, 0
        response = await http.open("GET", direct, headers, check_redirect=go_default_redirects, digest=digest)
        try:
            async for chunk in body_chunks(response):
                data = chunk[: want - n]
                os.pwrite(fd, data, position + n)
                n += len(data)
                record.received += len(data)
                part.last_updated = time.monotonic()
                if n == want:
                    break
        except httpx.RemoteProtocolError as exc:  # cut short of its Content-Length: ErrUnexpectedEOF
            part.completed += n
            raise UnexpectedEOF(f"unexpected EOF ({exc})") from exc
        finally:
            await response.aclose()
        if n < want:
            raise DownloadError("EOF")  # a clean end too early: io.CopyN's io.EOF, progress rolled back
        part.completed += n

    async def _verify(self, digest: str) -> None:
        """server/images.go: verifyBlob; PullModel deletes a blob whose digest does not match."""
        path = self.blob_path(digest)
        got = "sha256:" + await asyncio.to_thread(_sha256_file, path)
        if got != digest:
            path.unlink(missing_ok=True)
            raise DownloadError(f"digest mismatch, file must be downloaded again: want {digest}, got {got}")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(8 << 20):
            h.update(data)
    return h.hexdigest()
