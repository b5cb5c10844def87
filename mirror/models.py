"""The models the cache holds: listing them and reading what their manifests say.

Blocking functions over the store's directories; async callers use ``asyncio.to_thread``.
A model is a manifest file under ``manifests/<host>/<namespace>/<model>/<tag>``; removing
one is the store's (``BlobStore.remove``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import NameInvalid
from .layout import Layout
from .manifest import Layer, Manifest, ManifestInvalid
from .names import Digest, Name, parse_tag

log = logging.getLogger(__name__)

DEFAULT_REGISTRY = "registry.ollama.ai"


@dataclass(frozen=True)
class CachedModel:
    host: str
    name: Name
    tag: str
    manifest: Manifest
    modified: float

    @property
    def digest(self) -> Digest:
        """sha256 of the manifest bytes: Ollama's model ID."""
        return self.manifest.digest

    @property
    def config(self) -> Layer:
        return self.manifest.config

    @property
    def layers(self) -> tuple[Layer, ...]:
        return self.manifest.layers

    @property
    def blobs(self) -> tuple[Layer, ...]:
        return self.manifest.blobs

    @property
    def size(self) -> int:
        return self.manifest.size

    def __str__(self) -> str:
        return f"{self.host}/{self.name}:{self.tag}"

    @property
    def display_name(self) -> str:
        """Ollama's shortest form: ``qwen2.5:7b`` for the default registry's library."""
        if self.host == DEFAULT_REGISTRY:
            if self.name.namespace == "library":
                return f"{self.name.model}:{self.tag}"
            return f"{self.name}:{self.tag}"
        return f"{self.host}/{self.name}:{self.tag}"


def load(layout: Layout, host: str, name: Name, tag: str) -> CachedModel | None:
    return _read(layout.manifest(name, tag, host), host, name, tag)


def _read(path: Path, host: str, name: Name, tag: str) -> CachedModel | None:
    try:
        data = path.read_bytes()
        modified = path.stat().st_mtime
        manifest = Manifest.parse(data)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except ManifestInvalid as exc:
        log.warning("manifest unreadable path=%s reason=%s", path, exc)
        return None
    return CachedModel(host, name, tag, manifest, modified)


def list_models(layout: Layout) -> list[CachedModel]:
    """Every model in the cache, whatever registry host it came from."""
    models = []
    for path in _manifest_files(layout.manifests):
        host, namespace, model, tag = path.relative_to(layout.manifests).parts
        try:
            name = Name.parse(f"{namespace}/{model}")
            parse_tag(tag)
        except NameInvalid:
            continue
        found = _read(path, host, name, tag)
        if found is not None:
            models.append(found)
    return sorted(models, key=lambda m: (m.host, str(m.name), m.tag))


def _manifest_files(root: Path) -> Iterator[Path]:
    if not root.is_dir():
        return
    for host in root.iterdir():
        for path in host.glob("*/*/*"):
            if path.is_file() and not path.name.startswith("."):
                yield path


def read_blob_text(layout: Layout, layer: Layer, limit: int = 1 << 20) -> str | None:
    """A small layer (template, params, license, config) as text; None if not cached or too big."""
    if layer.size > limit:
        return None
    try:
        return layout.blob(layer.digest).read_text("utf-8", errors="replace")
    except FileNotFoundError:
        return None
