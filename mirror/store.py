"""The disk: verified blobs and manifests, staging files, atomic publishing, removal.

Every function here is blocking; async callers run them through
``asyncio.to_thread``. Nothing reaches a final name except by ``os.replace``
after its bytes were checked (``publish``, ``copy_verified``, ``write_atomic``),
so a crash at any moment leaves at most a stray file in staging, which ``sweep``
removes. Tags and blobs leave the store through ``BlobStore.remove`` alone, and
every change of the tags replaces the generation file, so that other processes
serving the same cache stop answering from what they remember.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from . import models
from .errors import StoreFull
from .layout import Layout
from .metadata import Metadata
from .models import CachedModel
from .names import Digest, Name

log = logging.getLogger(__name__)

READ_SIZE = 4 << 20

OnBytes = Callable[[int], None]  # progress: called with the size of each piece read
Generation = tuple[int, int, int]  # the generation file's (inode, mtime_ns, ctime_ns): new on every change


@dataclass
class Removed:
    """What one ``BlobStore.remove`` took away."""

    models: list[CachedModel] = field(default_factory=list)
    blobs: dict[Digest, int] = field(default_factory=dict)  # digest -> bytes freed

    @property
    def freed(self) -> int:
        return sum(self.blobs.values())


class BlobStore:
    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        layout.make_dirs()

    # -- blobs ----------------------------------------------------------------

    def blob_size(self, digest: Digest) -> int | None:
        """Size of the verified blob, or None when it is not in the store."""
        try:
            return self.layout.blob(digest).stat().st_size
        except FileNotFoundError:
            return None

    def open_blob(self, digest: Digest) -> int | None:
        """A read-only descriptor on the verified blob, or None."""
        try:
            return os.open(self.layout.blob(digest), os.O_RDONLY)
        except FileNotFoundError:
            return None

    def check_space(self, digest: Digest, size: int, min_free: int) -> None:
        """Refuse a fill that would leave less than ``min_free`` bytes free: a clear 507 now
        rather than a disk filled to ENOSPC. Space a staging file already holds counts as ours."""
        try:
            held = os.stat(self.layout.staging_data(digest)).st_blocks * 512
        except FileNotFoundError:
            held = 0
        stat = os.statvfs(self.layout.staging)
        free = stat.f_bavail * stat.f_frsize
        if free + held - size < min_free:
            raise StoreFull(
                f"not enough disk space for blob {digest.short} ({size} bytes): {free} bytes free and "
                f"{min_free} must stay free (--min-free); free space, or set --max-size to evict old models")

    def open_staging(self, digest: Digest, size: int, min_free: int = 0) -> tuple[int, bool]:
        """A read-write descriptor on the staging file, created at full size; and whether it existed."""
        path = self.layout.staging_data(digest)
        existed = path.exists()
        if not existed or path.stat().st_size != size:
            self.check_space(digest, size, min_free)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size != size:
                existed = False
                os.ftruncate(fd, 0)
                self._preallocate(fd, size)
        except BaseException:
            os.close(fd)
            raise
        return fd, existed

    @staticmethod
    def _preallocate(fd: int, size: int) -> None:
        """Reserve the blob's space now, so a full disk fails the fill before any byte is fetched."""
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise StoreFull(f"not enough disk space for a blob of {size} bytes") from exc
            os.ftruncate(fd, size)  # filesystems without fallocate: a sparse file

    def publish(self, digest: Digest, fd: int) -> None:
        """Move a verified staging file to its final name, durably."""
        os.fsync(fd)
        os.replace(self.layout.staging_data(digest), self.layout.blob(digest))
        _fsync_dir(self.layout.blobs)
        # Safe while we hold the lock: whoever locks next checks for the final blob first.
        self.layout.staging_lock(digest).unlink(missing_ok=True)

    def discard_staging(self, digest: Digest) -> None:
        self.layout.staging_data(digest).unlink(missing_ok=True)

    def ingest(self, source: BinaryIO, digest: Digest, on_bytes: OnBytes | None = None) -> int:
        """Copy a blob from ``source`` into the store, verified (ValueError if it is not ``digest``)."""
        return copy_verified(source, digest, self.layout.blob(digest), self.layout.staging, on_bytes)

    # -- the lock that says which process owns a fill ----------------------------

    def try_lock(self, digest: Digest) -> int | None:
        """An exclusive flock on the digest's lock file; None when another process holds it."""
        fd = os.open(self.layout.staging_lock(digest), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def unlock(self, fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    # -- manifests --------------------------------------------------------------

    def read_manifest(self, name: Name, tag: str, host: str | None = None) -> bytes | None:
        return _read_or_none(self.layout.manifest(name, tag, host))

    def read_manifest_by_digest(self, digest: Digest) -> bytes | None:
        data = _read_or_none(self.layout.manifest_by_digest(digest))
        return data if data is not None and Digest.of(data) == digest else None

    def write_manifest(self, name: Name, tag: str, data: bytes, digest: Digest, host: str | None = None) -> None:
        """Write the raw bytes under their digest and under the tag, each atomically, if not there yet;
        a tag that changed bumps the generation."""
        by_digest = self.layout.manifest_by_digest(digest)
        if _read_or_none(by_digest) != data:
            write_atomic(by_digest, data, self.layout.staging)
        path = self.layout.manifest(name, tag, host)
        if _read_or_none(path) != data:
            write_atomic(path, data, self.layout.staging)
            self.bump_generation()

    # -- removal: the one way tags and blobs leave the store ---------------------------

    def busy(self, digests: Iterable[Digest], serving: Collection[Digest] = ()) -> set[Digest]:
        """Those of ``digests`` being filled by any process (their staging lock is held, by this
        process or another) or being served by the caller."""
        return {digest for digest in digests if digest in serving or self._filling(digest)}

    def in_use(self, digests: Iterable[Digest], serving: Collection[Digest] = ()) -> set[Digest]:
        """Those of ``digests`` that must stay: named by a manifest on disk, or busy."""
        wanted = set(digests)
        named = wanted & {layer.digest for model in models.list_models(self.layout) for layer in model.blobs}
        return named | self.busy(wanted - named, serving)

    def remove(self, tags: Iterable[CachedModel] = (), blobs: Iterable[Digest] = (),
               serving: Collection[Digest] = (), meta: Metadata | None = None, by: str = "rm") -> Removed:
        """Remove the tags; then those of their blobs, and of ``blobs``, that are not in use.

        Every removal is logged with ``by`` (who asked). Manifests go first, durably: a kill in
        between leaves unreferenced blobs (``gc`` removes them), never a tag whose blobs are gone.
        """
        tags = list(tags)
        removed = Removed()
        for model in tags:
            if self._unlink_manifest(model):
                removed.models.append(model)
                log.info("removed model=%s size=%d by=%s", model, model.size, by)
        if removed.models:
            self._forget_manifest_copies({model.digest for model in removed.models})
            self.bump_generation()
        candidates = dict.fromkeys([*(layer.digest for model in tags for layer in model.blobs), *blobs])
        keep = self.in_use(candidates, serving) if candidates else set()
        for digest in candidates:
            if digest in keep:
                continue
            size = self._unlink_blob(digest)
            if size is None:
                continue
            removed.blobs[digest] = size
            if meta is not None:
                meta.forget_access(digest)
            log.info("removed blob digest=%s bytes=%d by=%s", digest.short, size, by)
        return removed

    def _forget_manifest_copies(self, digests: set[Digest]) -> None:
        """The by-digest copies of removed manifests that no tag left on disk has: a removed model
        is not answered by its digest (nor by a lock file pinning it) once its blobs may be gone."""
        kept = {model.digest for model in models.list_models(self.layout)}
        for digest in digests - kept:
            self.layout.manifest_by_digest(digest).unlink(missing_ok=True)

    def _unlink_manifest(self, model: CachedModel) -> bool:
        """Remove a tag's manifest file, and its folders when left empty, as Ollama prunes; durably."""
        path = self.layout.manifest(model.name, model.tag, model.host)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        folder = path.parent
        for _ in range(2):  # <model>/ then <namespace>/, only when empty
            try:
                folder.rmdir()
            except OSError:
                break
            folder = folder.parent
        _fsync_dir(folder)
        return True

    def _unlink_blob(self, digest: Digest) -> int | None:
        path = self.layout.blob(digest)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return None
        return size

    def _filling(self, digest: Digest) -> bool:
        """Whether a process holds the digest's staging lock. The lock file is not created here:
        a fill's lock file exists from before it takes the lock until it publishes."""
        try:
            fd = os.open(self.layout.staging_lock(digest), os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # releases the lock if we got it
        return False

    # -- the generation: how servers learn that another process changed the tags ------------

    def bump_generation(self) -> None:
        """Replace the generation file (a new inode, so a new identity even within one clock tick).

        Not fsynced: after a crash every server starts with an empty memory anyway. A failure is
        logged, not raised: the change it announces is done already.
        """
        try:
            fd, tmp = tempfile.mkstemp(dir=self.layout.staging, prefix="tmp-")
            os.close(fd)
            os.replace(tmp, self.layout.generation)
        except OSError as exc:
            log.warning("generation not bumped reason=%s; servers on this cache may answer removed tags "
                        "from memory until they restart", exc)

    def generation(self) -> Generation:
        """The generation file's identity; servers compare it at most once a second."""
        try:
            stat = self.layout.generation.stat()
        except FileNotFoundError:
            return (0, 0, 0)
        return (stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns)

    # -- start-up ---------------------------------------------------------------

    def sweep(self, resumable: set[str], tmp_age: float = 3600.0) -> list[str]:
        """Remove staging files nothing can resume; ``resumable`` holds hex digests with saved progress."""
        removed = []
        now = time.time()
        for path in self.layout.staging.iterdir():
            if path.name.startswith("tmp-") and now - path.stat().st_mtime > tmp_age:
                path.unlink(missing_ok=True)
                removed.append(path.name)
            elif path.suffix == ".data" and path.stem.removeprefix("sha256-") not in resumable:
                digest = Digest(path.stem.removeprefix("sha256-"))
                lock = self.try_lock(digest)
                if lock is None:
                    continue  # another process is filling it right now
                try:
                    path.unlink(missing_ok=True)
                    removed.append(path.name)
                finally:
                    self.unlock(lock)
        return removed

    def staging_digests(self) -> set[str]:
        return {p.stem.removeprefix("sha256-") for p in self.layout.staging.glob("sha256-*.data")}


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, staging: Path) -> None:
    """Put ``data`` under ``path`` whole or not at all, durably: written to a temp file in
    ``staging`` (on the same filesystem), fsynced, renamed over ``path``, the folder fsynced.
    A crash never leaves an empty or torn file under the final name."""
    staging.mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=staging, prefix="tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def copy_verified(source: BinaryIO, digest: Digest, dest: Path, staging: Path,
                  on_bytes: OnBytes | None = None) -> int:
    """Copy a blob to ``dest`` through a temp file in ``staging``, hashing on the way, and publish
    it durably only if it hashes to ``digest``; else ValueError naming both. Returns its size."""
    staging.mkdir(parents=True, exist_ok=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=staging, prefix="tmp-copy-")
    try:
        with os.fdopen(fd, "wb") as out:
            actual, size = hash_stream(source, on_bytes, copy_to=out)
            out.flush()
            os.fsync(out.fileno())
        if actual != digest.hex:
            raise ValueError(f"content hashes to sha256:{actual}, not {digest}")
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)
    _fsync_dir(dest.parent)
    return size


# -- hashing: every sha256 of blob bytes is computed by one of these two ---------------------


def hash_stream(source: BinaryIO, on_bytes: OnBytes | None = None, copy_to: BinaryIO | None = None
                ) -> tuple[str, int]:
    """sha256 (hex) and length of what ``source`` still holds, read into one reused buffer; each
    piece is also written to ``copy_to`` and reported to ``on_bytes``."""
    h = hashlib.sha256()
    buffer = memoryview(bytearray(READ_SIZE))
    size = 0
    while n := source.readinto(buffer):  # type: ignore[attr-defined]
        piece = buffer[:n]
        h.update(piece)
        if copy_to is not None:
            copy_to.write(piece)
        if on_bytes is not None:
            on_bytes(n)
        size += n
    return h.hexdigest(), size


def hash_file(path: Path, on_bytes: OnBytes | None = None) -> str:
    with open(path, "rb", buffering=0) as f:
        return hash_stream(f, on_bytes)[0]


def hash_at(h: Any, fd: int, position: int, into: memoryview) -> None:
    """Hash the bytes at ``position``, read whole into ``into`` (a buffer the caller reuses: a
    fresh one per read is page faults). The caller knows they are on disk: a short file raises."""
    done = 0
    while done < len(into):
        n = os.preadv(fd, [into[done:]], position + done)
        if n == 0:
            raise OSError(f"file ends at {position + done}, before the bytes expected there")
        done += n
    h.update(into)


IOV_MAX = 1024  # buffers one pwritev takes on Linux


def read_at(fd: int, offset: int, length: int) -> bytes:
    """One positional read; short only at end of file."""
    return os.pread(fd, length, offset)


def write_at(fd: int, pieces: list[bytes], offset: int) -> None:
    """Write ``pieces`` back to back from ``offset``, in one call where the kernel takes it all
    (no joined copy of them first); a full disk becomes ``StoreFull``."""
    views = [memoryview(p) for p in pieces if p]
    try:
        while views:
            n = os.pwritev(fd, views[:IOV_MAX], offset)
            offset += n
            while views and n >= len(views[0]):
                n -= len(views.pop(0))
            if n:
                views[0] = views[0][n:]
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise StoreFull("disk full while writing a blob") from exc
        raise
