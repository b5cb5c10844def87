"""Persistent metadata in diskcache: manifest fetch times, what upstream answered which clients,
blob sizes and access, fill progress.

diskcache is SQLite underneath: safe across processes, and blocking, so async
callers go through ``asyncio.to_thread``. Keys are namespaced strings.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import diskcache
from cachetools import LRUCache

from .names import Digest, Name

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ManifestRecord:
    fetched_at: float  # when upstream last confirmed this tag (unix time)
    source: str  # the upstream URL it came from
    digest: str


def _best_effort(write: Callable[..., None]) -> Callable[..., None]:
    """A hint that could not be written (disk full, database locked too long) is logged and
    skipped: losing a hint costs a later upstream request, never a failed client request."""

    @functools.wraps(write)
    def guarded(self: Metadata, *args: Any) -> None:
        try:
            write(self, *args)
        except (sqlite3.OperationalError, OSError) as exc:
            log.warning("metadata not written what=%s reason=%s", write.__name__, exc)

    return guarded


class Metadata:
    def __init__(self, directory: Path) -> None:
        self._cache = diskcache.Cache(str(directory), eviction_policy="none", size_limit=2**40)
        self._sizes: LRUCache[Digest, int] = LRUCache(maxsize=65536)  # sizes learned here, before they reach disk

    def close(self) -> None:
        self._cache.close()

    # -- manifests --------------------------------------------------------------

    @classmethod
    def _manifest_key(cls, host: str, name: Name, tag: str) -> str:
        return f"manifest:{cls._model_key(host, name, tag)}"

    def manifest(self, host: str, name: Name, tag: str) -> ManifestRecord | None:
        value = self._cache.get(self._manifest_key(host, name, tag))
        return ManifestRecord(**value) if isinstance(value, dict) else None

    @_best_effort
    def set_manifest(self, host: str, name: Name, tag: str, record: ManifestRecord) -> None:
        self._cache.set(self._manifest_key(host, name, tag), asdict(record))

    def client_answers(self, host: str, name: Name, tag: str) -> object:
        """What upstream answered which client versions for a tag, as ``TagAnswers.to_dict`` wrote it."""
        return self._cache.get(f"clients:{self._model_key(host, name, tag)}")

    @_best_effort
    def set_client_answers(self, host: str, name: Name, tag: str, answers: dict[str, Any]) -> None:
        self._cache.set(f"clients:{self._model_key(host, name, tag)}", answers)

    # -- blobs ------------------------------------------------------------------

    def blob_size(self, digest: Digest) -> int | None:
        """The size a manifest or upstream gave for this blob: lets HEAD answer without upstream."""
        known = self._sizes.get(digest)
        if known is not None:
            return known
        value = self._cache.get(f"size:{digest.hex}")
        return value if isinstance(value, int) else None

    def remember_blob_sizes(self, sizes: dict[Digest, int]) -> None:
        """Known at once, in this process, before ``set_blob_sizes`` has them on disk."""
        self._sizes.update(sizes)

    @_best_effort
    def set_blob_sizes(self, sizes: dict[Digest, int]) -> None:
        self.remember_blob_sizes(sizes)
        with self._cache.transact():
            for digest, size in sizes.items():
                self._cache.set(f"size:{digest.hex}", size)

    def forget_blob_size(self, digest: Digest) -> None:
        self._sizes.pop(digest, None)
        self._cache.delete(f"size:{digest.hex}")

    @_best_effort
    def touch_blob(self, digest: Digest, when: float | None = None) -> None:
        self._cache.set(f"access:{digest.hex}", when if when is not None else time.time())

    def forget_access(self, digest: Digest) -> None:
        self._cache.delete(f"access:{digest.hex}")

    def blob_access(self, digest: Digest) -> float | None:
        value = self._cache.get(f"access:{digest.hex}")
        return value if isinstance(value, float) else None

    # -- pins: models that survive any cleanup ------------------------------------------------

    @staticmethod
    def _model_key(host: str, name: Name, tag: str) -> str:
        return f"{host}/{name.namespace.lower()}/{name.model.lower()}:{tag.lower()}"

    def set_pinned(self, host: str, name: Name, tag: str, pinned: bool) -> None:
        key = f"pin:{self._model_key(host, name, tag)}"
        if pinned:
            self._cache.set(key, True)
        else:
            self._cache.delete(key)

    def is_pinned(self, host: str, name: Name, tag: str) -> bool:
        return bool(self._cache.get(f"pin:{self._model_key(host, name, tag)}"))

    # -- fill progress ----------------------------------------------------------

    def fill_progress(self, digest: Digest) -> dict[str, Any] | None:
        value = self._cache.get(f"fill:{digest.hex}")
        return value if isinstance(value, dict) else None

    @_best_effort
    def set_fill_progress(self, digest: Digest, progress: dict[str, Any]) -> None:
        self._cache.set(f"fill:{digest.hex}", progress)

    def forget_fill(self, digest: Digest) -> None:
        self._cache.delete(f"fill:{digest.hex}")

    def fills_in_progress(self) -> set[str]:
        return {key[5:] for key in self._cache.iterkeys() if isinstance(key, str) and key.startswith("fill:")}
