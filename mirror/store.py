"""The disk: verified blobs and manifests, staging files, atomic publishing.

Every function here is blocking; async callers run them through
``asyncio.to_thread``. Nothing reaches a final name except by ``os.replace``
after its bytes were checked, so a crash at any moment leaves at most a stray
file in staging, which ``sweep`` removes.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import tempfile
import time
from pathlib import Path

from .errors import StoreFull
from .layout import Layout
from .names import Digest, Name

log = logging.getLogger(__name__)

READ_SIZE = 4 << 20


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

    def hash_file(self, path: Path) -> str:
        h = hashlib.sha256()
        with open(path, "rb", buffering=0) as f:
            while data := f.read(READ_SIZE):
                h.update(data)
        return h.hexdigest()

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
        return data if data is not None and hashlib.sha256(data).hexdigest() == digest.hex else None

    def write_manifest(self, name: Name, tag: str, data: bytes, digest: Digest, host: str | None = None) -> None:
        """Write the raw bytes under their digest and under the tag, each atomically, if not there yet."""
        for path in (self.layout.manifest_by_digest(digest), self.layout.manifest(name, tag, host)):
            if _read_or_none(path) != data:
                self._write_atomic(path, data)

    def _write_atomic(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.layout.staging, prefix="tmp-")
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
