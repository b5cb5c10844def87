"""The models the cache holds: listing, reading what their manifests say, removing tags.

Blocking functions over the store's directories; async callers use ``asyncio.to_thread``.
A model is a manifest file under ``manifests/<host>/<namespace>/<model>/<tag>``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import DigestInvalid, NameInvalid
from .layout import Layout
from .names import Digest, Name, parse_tag

log = logging.getLogger(__name__)

DEFAULT_REGISTRY = "registry.ollama.ai"
LAYER_PREFIX = "application/vnd.ollama.image."


@dataclass(frozen=True)
class Layer:
    media_type: str
    digest: Digest
    size: int

    @property
    def kind(self) -> str:
        """``model``, ``template``, ``params``, ``license``...: the media type's last part."""
        return self.media_type.removeprefix(LAYER_PREFIX)


@dataclass(frozen=True)
class CachedModel:
    host: str
    name: Name
    tag: str
    manifest: bytes
    digest: Digest  # sha256 of the manifest bytes: Ollama's model ID
    modified: float
    config: Layer
    layers: tuple[Layer, ...]

    @property
    def blobs(self) -> tuple[Layer, ...]:
        return (*self.layers, self.config)

    @property
    def size(self) -> int:
        return sum(layer.size for layer in self.blobs)

    @property
    def display_name(self) -> str:
        """Ollama's shortest form: ``qwen2.5:7b`` for the default registry's library."""
        if self.host == DEFAULT_REGISTRY:
            if self.name.namespace == "library":
                return f"{self.name.model}:{self.tag}"
            return f"{self.name}:{self.tag}"
        return f"{self.host}/{self.name}:{self.tag}"


def parse_layers(data: bytes) -> tuple[Layer, tuple[Layer, ...]]:
    """The config and layers of a manifest; ValueError if it is not one."""
    doc = json.loads(data)
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")

    def layer(item: object) -> Layer:
        if not isinstance(item, dict) or not isinstance(item.get("size"), int):
            raise ValueError("a layer without a size")
        return Layer(str(item.get("mediaType", "")), Digest.parse(str(item.get("digest", ""))), item["size"])

    return layer(doc.get("config")), tuple(layer(item) for item in doc.get("layers") or [])


def load(layout: Layout, host: str, name: Name, tag: str) -> CachedModel | None:
    return _read(layout.manifest(name, tag, host), host, name, tag)


def _read(path: Path, host: str, name: Name, tag: str) -> CachedModel | None:
    try:
        data = path.read_bytes()
        modified = path.stat().st_mtime
        config, layers = parse_layers(data)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (ValueError, DigestInvalid) as exc:
        log.warning("manifest unreadable path=%s reason=%s", path, exc)
        return None
    return CachedModel(host, name, tag, data, Digest(hashlib.sha256(data).hexdigest()), modified, config, layers)


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


def remove_tag(layout: Layout, model: CachedModel) -> None:
    """Remove the tag's manifest file, and its directories when they are left empty."""
    path = layout.manifest(model.name, model.tag, model.host)
    path.unlink(missing_ok=True)
    for parent in (path.parent, path.parent.parent):
        try:
            parent.rmdir()  # only when empty, as Ollama prunes
        except OSError:
            break


def remove(layout: Layout, model: CachedModel, busy: Iterable[Digest]) -> list[Digest]:
    """Remove a tag; then every blob of it that no other manifest uses and no fill holds."""
    remove_tag(layout, model)
    still_used = {layer.digest for other in list_models(layout) for layer in other.blobs} | set(busy)
    removed = []
    for layer in model.blobs:
        if layer.digest not in still_used and layout.blob(layer.digest).exists():
            os.unlink(layout.blob(layer.digest))
            removed.append(layer.digest)
    return removed
