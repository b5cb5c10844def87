"""Seeding and air-gap: import from Ollama models directories and bundles, export, verify.

Every blob written is hashed on the way and reaches its final name only by an
atomic rename after its sha256 matched, here as in the fill engine; every file
goes through the store's ``copy_verified`` or ``write_atomic``. A manifest is
written only once every blob it names is present, so a store never holds a model
it cannot serve. Runs that are interrupted start again where they stopped:
what is complete and verified under its final name is skipped.

Blocking code: the CLI calls it directly.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from .errors import DigestInvalid, NameInvalid
from .layout import Layout
from .manifest import Manifest, ManifestInvalid
from .models import CachedModel, list_models
from .names import Digest, Name, parse_tag
from .store import BlobStore, OnBytes, copy_verified, hash_file, write_atomic

log = logging.getLogger(__name__)

INDEX_NAME = "ollama-mirror-index.json"


@dataclass
class Report:
    models: list[str] = field(default_factory=list)  # written (imported or exported)
    blobs_copied: int = 0
    blobs_skipped: int = 0  # already complete and verified
    bytes_copied: int = 0
    refused: dict[str, str] = field(default_factory=dict)  # blob or model -> why

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


# -- import -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Found:
    """A manifest found in a models directory or a bundle, with the tag its path names."""

    host: str
    name: Name
    tag: str
    manifest: Manifest

    def __str__(self) -> str:
        return f"{self.host}/{self.name}:{self.tag}"


def _manifest_at(relative: Path, data: bytes) -> _Found:
    """A manifest found at ``manifests/<host>/<ns>/<model>/<tag>``; ValueError if it is not one."""
    parts = relative.parts
    if len(parts) != 4 or any(p in ("", ".", "..") for p in parts) or "/" in parts[0] or "\\" in parts[0]:
        raise ValueError(f"unexpected manifest path {relative}")
    try:
        return _Found(parts[0], Name.parse(f"{parts[1]}/{parts[2]}"), parse_tag(parts[3]), Manifest.parse(data))
    except (NameInvalid, ManifestInvalid) as exc:
        raise ValueError(str(exc)) from None


def import_path(store: BlobStore, source: Path, on_bytes: OnBytes) -> Report:
    """Import every model of an Ollama models directory or an export bundle (a tar file or pipe)."""
    if source.is_dir():
        return import_dir(store, source, on_bytes)
    with open(source, "rb") as f:
        return import_tar(store, f, on_bytes)


def import_dir(store: BlobStore, source: Path, on_bytes: OnBytes) -> Report:
    report = Report()
    root = source / "manifests"
    for path in sorted(p for p in root.glob("*/*/*/*") if p.is_file()):
        try:
            found = _manifest_at(path.relative_to(root), path.read_bytes())
        except ValueError as exc:
            report.refused[str(path.relative_to(source))] = str(exc)
            continue
        complete = True
        for layer in found.manifest.blobs:
            if store.blob_size(layer.digest) is not None:
                report.blobs_skipped += 1
                continue
            try:
                with open(source / "blobs" / f"sha256-{layer.digest.hex}", "rb") as f:
                    report.bytes_copied += store.ingest(f, layer.digest, on_bytes)
                report.blobs_copied += 1
            except (OSError, ValueError) as exc:
                report.refused[str(layer.digest)] = f"{exc}"
                log.warning("import refused blob=%s model=%s reason=%s", layer.digest.short, found, exc)
                complete = False
        _finish_manifest(store, found, complete, report)
    return report


def import_tar(store: BlobStore, stream: BinaryIO, on_bytes: OnBytes) -> Report:
    """Import a bundle read as a stream: blobs as they come, manifests once their blobs are in."""
    report = Report()
    manifests: list[_Found] = []
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or not parts:
                continue
            if parts[0] == "blobs" and len(parts) == 2:
                _import_tar_blob(store, tar, member, report, on_bytes)
            elif parts[0] == "manifests":
                extracted = tar.extractfile(member)
                try:
                    manifests.append(_manifest_at(Path(*parts[1:]), extracted.read(4 << 20) if extracted else b""))
                except ValueError as exc:
                    report.refused[member.name] = str(exc)
    for found in manifests:
        complete = all(store.blob_size(layer.digest) is not None for layer in found.manifest.blobs)
        _finish_manifest(store, found, complete, report)
    return report


def _import_tar_blob(store: BlobStore, tar: tarfile.TarFile, member: tarfile.TarInfo, report: Report,
                     on_bytes: OnBytes) -> None:
    try:
        digest = Digest.parse(Path(member.name).name)
    except DigestInvalid:
        report.refused[member.name] = "not a blob name"
        return
    if store.blob_size(digest) is not None:
        report.blobs_skipped += 1
        return
    extracted = tar.extractfile(member)
    assert extracted is not None
    try:
        report.bytes_copied += store.ingest(extracted, digest, on_bytes)
        report.blobs_copied += 1
    except ValueError as exc:
        report.refused[str(digest)] = str(exc)
        log.warning("import refused blob=%s reason=%s", digest.short, exc)


def _finish_manifest(store: BlobStore, found: _Found, complete: bool, report: Report) -> None:
    """Write the tag once every blob it names is in the store (the store tells running servers)."""
    if not complete:
        report.refused[str(found)] = "some of its blobs are missing or failed verification"
        return
    store.write_manifest(found.name, found.tag, found.manifest.data, found.manifest.digest, found.host)
    report.models.append(str(found))


# -- export -------------------------------------------------------------------------------


def _manifest_relative(model: CachedModel) -> str:
    return f"manifests/{model.host}/{model.name.namespace.lower()}/{model.name.model.lower()}/{model.tag.lower()}"


def export_dir(layout: Layout, chosen: Iterable[CachedModel], dest: Path, on_bytes: OnBytes) -> Report:
    """Write the models as an Ollama models directory, plus an index of every file's sha256 and size."""
    report = Report()
    index: dict[str, dict[str, object]] = {}
    staging = dest / ".ollama-mirror-partial"
    for model in chosen:
        for layer in model.blobs:
            target = dest / "blobs" / f"sha256-{layer.digest.hex}"
            if target.exists() and target.stat().st_size == layer.size:
                report.blobs_skipped += 1  # only verified copies ever get this name
            else:
                with open(layout.blob(layer.digest), "rb") as f:
                    report.bytes_copied += copy_verified(f, layer.digest, target, staging, on_bytes)
                report.blobs_copied += 1
            index[f"blobs/sha256-{layer.digest.hex}"] = {"sha256": layer.digest.hex, "size": layer.size}
        relative = _manifest_relative(model)
        write_atomic(dest / relative, model.manifest.data, staging)
        index[relative] = {"sha256": model.digest.hex, "size": len(model.manifest.data)}
        report.models.append(str(model))
    write_atomic(dest / INDEX_NAME, json.dumps({"files": index}, indent=1).encode(), staging)
    shutil.rmtree(staging, ignore_errors=True)
    return report


def export_tar(layout: Layout, chosen: Iterable[CachedModel], out: BinaryIO, on_bytes: OnBytes) -> Report:
    """The same as a tar stream (blobs first, then manifests, then the index): to a disk or a pipe."""
    report = Report()
    index: dict[str, dict[str, object]] = {}
    models = list(chosen)
    with tarfile.open(fileobj=out, mode="w|") as tar:
        seen: set[Digest] = set()
        for model in models:
            for layer in model.blobs:
                if layer.digest in seen:
                    continue
                seen.add(layer.digest)
                name = f"blobs/sha256-{layer.digest.hex}"
                with open(layout.blob(layer.digest), "rb") as f:
                    reader = _HashingReader(f, on_bytes)
                    info = tarfile.TarInfo(name)
                    info.size = layer.size
                    tar.addfile(info, reader)
                    if reader.hexdigest() != layer.digest.hex:
                        raise ValueError(f"blob {layer.digest} in the store is corrupt; run ollama-mirror verify")
                report.blobs_copied += 1
                report.bytes_copied += layer.size
                index[name] = {"sha256": layer.digest.hex, "size": layer.size}
        for model in models:
            relative = _manifest_relative(model)
            _add_bytes(tar, relative, model.manifest.data)
            index[relative] = {"sha256": model.digest.hex, "size": len(model.manifest.data)}
            report.models.append(str(model))
        _add_bytes(tar, INDEX_NAME, json.dumps({"files": index}, indent=1).encode())
    return report


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


class _HashingReader:
    """A file wrapper that hashes what tarfile reads through it."""

    def __init__(self, f: BinaryIO, on_bytes: OnBytes) -> None:
        self._f, self._on_bytes, self._h = f, on_bytes, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._h.update(data)
        self._on_bytes(len(data))
        return data

    def hexdigest(self) -> str:
        return self._h.hexdigest()


# -- verify -------------------------------------------------------------------------------


def verify_store(layout: Layout, on_bytes: OnBytes) -> dict[str, list[str]]:
    """Re-hash every blob; move bad ones aside. Returns {bad digest: models it breaks}."""
    quarantine = layout.state / "quarantine"
    users: dict[Digest, list[str]] = {}
    for model in list_models(layout):
        for layer in model.blobs:
            users.setdefault(layer.digest, []).append(str(model))
    bad: dict[str, list[str]] = {}
    for path in sorted(layout.blobs.glob("sha256-*")):
        try:
            digest = Digest.parse(path.name)
        except DigestInvalid:
            continue
        if hash_file(path, on_bytes) != digest.hex:
            quarantine.mkdir(parents=True, exist_ok=True)
            os.replace(path, quarantine / path.name)
            bad[str(digest)] = users.get(digest, [])
            log.warning("verify bad blob=%s moved=%s breaks=%s", digest.short, quarantine / path.name,
                        ",".join(users.get(digest, [])) or "no model")
    return bad
