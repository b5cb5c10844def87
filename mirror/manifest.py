"""An image manifest, parsed once: its raw bytes, their digest, its media type, config and layers.

Pure: the one place that decides what a manifest is, for manifests fetched from
upstream, read from the store, found in a models directory or a bundle. Callers
turn ``ManifestInvalid`` into what their edge needs (a 502, a refused import, a
tag skipped in a listing).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .errors import DigestInvalid
from .names import Digest

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
MANIFEST_TYPES = (MANIFEST_V2, "application/vnd.oci.image.manifest.v1+json")
LAYER_PREFIX = "application/vnd.ollama.image."


class ManifestInvalid(ValueError):
    """The bytes are not a schema 2 image manifest; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class Layer:
    media_type: str
    digest: Digest
    size: int

    @property
    def kind(self) -> str:
        """``model``, ``template``, ``params``, ``license``...: the media type's last part."""
        return self.media_type.removeprefix(LAYER_PREFIX)


@dataclass(frozen=True, slots=True)
class Manifest:
    data: bytes  # exactly as upstream sent them: Ollama's model ID is their sha256
    digest: Digest
    media_type: str
    config: Layer
    layers: tuple[Layer, ...]

    @classmethod
    def parse(cls, data: bytes) -> Manifest:
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, ValueError):
            raise ManifestInvalid("manifest is not JSON") from None
        if not isinstance(doc, dict) or doc.get("schemaVersion") != 2:
            raise ManifestInvalid("manifest is not a schema 2 image manifest")
        layers = doc.get("layers", [])
        if layers is None:
            layers = []  # an empty model: a config alone
        if not isinstance(layers, list):
            raise ManifestInvalid("manifest layers are not a list")
        media_type = doc.get("mediaType")
        return cls(
            data,
            Digest.of(data),
            media_type if media_type in MANIFEST_TYPES else MANIFEST_V2,
            _layer(doc.get("config"), "config"),
            tuple(_layer(item, "layer") for item in layers),
        )

    @property
    def blobs(self) -> tuple[Layer, ...]:
        """Every blob it names, layers first and the config last, as Ollama pulls them."""
        return (*self.layers, self.config)

    @property
    def sizes(self) -> dict[Digest, int]:
        return {blob.digest: blob.size for blob in self.blobs}

    @property
    def size(self) -> int:
        return sum(blob.size for blob in self.blobs)


def _layer(item: object, what: str) -> Layer:
    if not isinstance(item, dict):
        raise ManifestInvalid(f"manifest has no valid {what} descriptor")
    size = item.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ManifestInvalid(f"manifest has a {what} without a valid size")
    try:
        digest = Digest.parse(str(item.get("digest", "")))
    except DigestInvalid:
        raise ManifestInvalid(f"manifest has a {what} with an invalid digest") from None
    return Layer(str(item.get("mediaType", "")), digest, size)
