"""Every on-disk path of the cache, decided in one place.

The cache directory is an Ollama models directory, so it can be handed to
Ollama as ``OLLAMA_MODELS`` or copied to an offline machine as it is::

    <root>/
      blobs/sha256-<hex>                             verified blobs only
      manifests/<host>/<namespace>/<model>/<tag>     raw manifest bytes, as upstream sent them
      .mirror/                                       ours; Ollama never looks here
        manifests/sha256-<hex>                       every manifest we served, by its digest
        staging/sha256-<hex>.data                    a blob being filled (preallocated)
        staging/sha256-<hex>.lock                    flock: which process owns the fill
        staging/tmp-*                                manifests and small files being written
        meta/                                        diskcache: fetch times, access times, fill progress
        generation                                   replaced whenever a tag is written or removed

Nothing reaches ``blobs/`` or ``manifests/`` except by an atomic rename of a
file whose content was checked first.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .names import Digest, Name


@dataclass(frozen=True)
class Layout:
    root: Path
    host: str  # the upstream registry host as Ollama writes it: "registry.ollama.ai", "host:port"

    @property
    def blobs(self) -> Path:
        return self.root / "blobs"

    @property
    def manifests(self) -> Path:
        return self.root / "manifests"

    @property
    def state(self) -> Path:
        return self.root / ".mirror"

    @property
    def staging(self) -> Path:
        return self.state / "staging"

    @property
    def meta(self) -> Path:
        return self.state / "meta"

    @property
    def manifests_by_digest(self) -> Path:
        return self.state / "manifests"

    @property
    def generation(self) -> Path:
        """Replaced on every change of the tags, so servers sharing the cache notice it."""
        return self.state / "generation"

    def blob(self, digest: Digest) -> Path:
        return self.blobs / f"sha256-{digest.hex}"

    def staging_data(self, digest: Digest) -> Path:
        return self.staging / f"sha256-{digest.hex}.data"

    def staging_lock(self, digest: Digest) -> Path:
        return self.staging / f"sha256-{digest.hex}.lock"

    def manifest(self, name: Name, tag: str, host: str | None = None) -> Path:
        """The tag's manifest file, under the upstream's host unless another is named."""
        # Ollama lowercases every part of a manifest path, the host too; so do we, so lookups agree.
        host = (host or self.host).lower()
        path = self.manifests / host / name.namespace.lower() / name.model.lower() / tag.lower()
        return self._contained(path, self.manifests)

    def manifest_by_digest(self, digest: Digest) -> Path:
        return self.manifests_by_digest / f"sha256-{digest.hex}"

    def make_dirs(self) -> None:
        for path in (self.blobs, self.manifests, self.staging, self.meta, self.manifests_by_digest):
            path.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _contained(path: Path, parent: Path) -> Path:
        """Refuse any path that would leave ``parent`` (names are validated; this is the backstop)."""
        if os.path.commonpath([os.path.abspath(path), os.path.abspath(parent)]) != os.path.abspath(parent):
            raise ValueError(f"path {path} escapes {parent}")
        return path


def registry_host(upstream_url: str) -> str:
    """The host part Ollama puts in manifest paths for this upstream URL."""
    parts = urlsplit(upstream_url)
    host = parts.hostname or ""
    default_port = {"https": 443, "http": 80}.get(parts.scheme)
    if parts.port and parts.port != default_port:
        return f"{host}:{parts.port}"
    return host


def cache_problem(root: Path, exc: OSError) -> str:
    """An OSError met writing the cache, as one sentence: the cause, and what to do about it."""
    where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(root) else ""
    if exc.errno in (errno.EACCES, errno.EPERM):
        return (f"cannot write to the cache at {root}{where}: permission denied; run as the user that owns it, "
                f"or give --cache-dir a directory this user may write")
    if exc.errno == errno.EROFS:
        return (f"cannot write to the cache at {root}: it is on a read-only file system; give --cache-dir a "
                f"directory on a writable disk")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"the disk of the cache at {root} is full{where}: free space on it (`ollama-mirror gc "
                f"--max-size SIZE` evicts models), or give --cache-dir a directory on another disk")
    return f"cannot use the cache at {root}{where}: {exc.strerror or exc}"
