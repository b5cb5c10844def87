"""Seeding and air-gap: import from Ollama models directories and bundles, export, verify.

Every blob written is hashed on the way and reaches its final name only by an
atomic rename after its sha256 matched, here as in the fill engine. A manifest is
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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from .errors import DigestInvalid, NameInvalid
from .layout import Layout
from .models import CachedModel, list_models, parse_layers
from .names import Digest, Name, parse_tag

log = logging.getLogger(__name__)

COPY_SIZE = 4 << 20
INDEX_NAME = "ollama-mirror-index.json"

OnBytes = Callable[[int], None]


@dataclass
class Report:
    models: list[str] = field(default_factory=list)  # written (imported or exported)
    blobs_copied: int = 0
    blobs_skipped: int = 0  # already complete and verified
    bytes_copied: int = 0
    refused: dict[str, str] = field(default_factory=dict)  # blob or model -> why

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def copy_verified(source: BinaryIO, digest: Digest, dest: Path, staging: Path, on_bytes: OnBytes) -> int:
    """Copy a blob to ``dest`` through a staging file, hashing it; publish only if it matches.

    Raises ValueError when the bytes do not hash to ``digest``.
    """
    staging.mkdir(parents=True, exist_ok=True)
    tmp = staging / f"tmp-copy-{digest.hex}-{os.getpid()}"
    h = hashlib.sha256()
    size = 0
    try:
        with open(tmp, "wb") as out:
            while data := source.read(COPY_SIZE):
                h.update(data)
                out.write(data)
                size += len(data)
                on_bytes(len(data))
            out.flush()
            os.fsync(out.fileno())
        if h.hexdigest() != digest.hex:
            raise ValueError(f"content hashes to sha256:{h.hexdigest()}, not {digest}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return size


def write_atomic(path: Path, data: bytes, staging: Path) -> None:
    staging.mkdir(parents=True, exist_ok=True)
    tmp = staging / f"tmp-{path.name}-{os.getpid()}"
    tmp.write_bytes(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, path)


# -- import -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Manifest:
    host: str
    name: Name
    tag: str
    data: bytes
    blobs: tuple[tuple[Digest, int], ...]

    def __str__(self) -> str:
        return f"{self.host}/{self.name}:{self.tag}"


def _manifest_at(relative: Path, data: bytes) -> _Manifest:
    """A manifest found at ``manifests/<host>/<ns>/<model>/<tag>``; ValueError if it is not one."""
    parts = relative.parts
    if len(parts) != 4 or any(p in ("", ".", "..") for p in parts) or "/" in parts[0] or "\\" in parts[0]:
        raise ValueError(f"unexpected manifest path {relative}")
    try:
        name, tag = Name.parse(f"{parts[1]}/{parts[2]}"), parse_tag(parts[3])
        config, layers = parse_layers(data)
    except (NameInvalid, DigestInvalid) as exc:
        raise ValueError(str(exc)) from None
    return _Manifest(parts[0], name, tag, data, tuple((b.digest, b.size) for b in (*layers, config)))


def import_path(layout: Layout, source: Path, on_bytes: OnBytes) -> Report:
    """Import every model of an Ollama models directory or an export bundle (a tar file or pipe)."""
    if source.is_dir():
        return import_dir(layout, source, on_bytes)
    with open(source, "rb") as f:
        return import_tar(layout, f, on_bytes)


def import_dir(layout: Layout, source: Path, on_bytes: OnBytes) -> Report:
    report = Report()
    root = source / "manifests"
    for path in sorted(p for p in root.glob("*/*/*/*") if p.is_file()):
        try:
            manifest = _manifest_at(path.relative_to(root), path.read_bytes())
        except ValueError as exc:
            report.refused[str(path.relative_to(source))] = str(exc)
            continue
        complete = True
        for digest, _size in manifest.blobs:
            if layout.blob(digest).exists():
                report.blobs_skipped += 1
                continue
            blob = source / "blobs" / f"sha256-{digest.hex}"
            try:
                with open(blob, "rb") as f:
                    report.bytes_copied += copy_verified(f, digest, layout.blob(digest), layout.staging, on_bytes)
                report.blobs_copied += 1
            except (OSError, ValueError) as exc:
                report.refused[str(digest)] = f"{exc}"
                log.warning("import refused blob=%s model=%s reason=%s", digest.short, manifest, exc)
                complete = False
        _finish_manifest(layout, manifest, complete, report)
    return report


def import_tar(layout: Layout, stream: BinaryIO, on_bytes: OnBytes) -> Report:
    """Import a bundle read as a stream: blobs as they come, manifests once their blobs are in."""
    report = Report()
    manifests: list[_Manifest] = []
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or not parts:
                continue
            if parts[0] == "blobs" and len(parts) == 2:
                _import_tar_blob(layout, tar, member, report, on_bytes)
            elif parts[0] == "manifests":
                extracted = tar.extractfile(member)
                try:
                    manifests.append(_manifest_at(Path(*parts[1:]), extracted.read(4 << 20) if extracted else b""))
                except ValueError as exc:
                    report.refused[member.name] = str(exc)
    for manifest in manifests:
        _finish_manifest(layout, manifest, all(layout.blob(d).exists() for d, _ in manifest.blobs), report)
    return report


def _import_tar_blob(layout: Layout, tar: tarfile.TarFile, member: tarfile.TarInfo, report: Report,
                     on_bytes: OnBytes) -> None:
    try:
        digest = Digest.parse(Path(member.name).name)
    except DigestInvalid:
        report.refused[member.name] = "not a blob name"
        return
    if layout.blob(digest).exists():
        report.blobs_skipped += 1
        return
    extracted = tar.extractfile(member)
    assert extracted is not None
    try:
        report.bytes_copied += copy_verified(extracted, digest, layout.blob(digest), layout.staging, on_bytes)
        report.blobs_copied += 1
    except ValueError as exc:
        report.refused[str(digest)] = str(exc)
        log.warning("import refused blob=%s reason=%s", digest.short, exc)


def _finish_manifest(layout: Layout, manifest: _Manifest, complete: bool, report: Report) -> None:
    if not complete:
        report.refused[str(manifest)] = "some of its blobs are missing or failed verification"
        return
    digest = Digest(hashlib.sha256(manifest.data).hexdigest())
    write_atomic(layout.manifest_by_digest(digest), manifest.data, layout.staging)
    write_atomic(layout.manifest(manifest.name, manifest.tag, manifest.host), manifest.data, layout.staging)
    report.models.append(str(manifest))


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
        write_atomic(dest / relative, model.manifest, staging)
        index[relative] = {"sha256": model.digest.hex, "size": len(model.manifest)}
        report.models.append(f"{model.host}/{model.name}:{model.tag}")
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
            _add_bytes(tar, relative, model.manifest)
            index[relative] = {"sha256": model.digest.hex, "size": len(model.manifest)}
            report.models.append(f"{model.host}/{model.name}:{model.tag}")
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
            users.setdefault(layer.digest, []).append(f"{model.host}/{model.name}:{model.tag}")
    bad: dict[str, list[str]] = {}
    for path in sorted(layout.blobs.glob("sha256-*")):
        try:
            digest = Digest.parse(path.name)
        except DigestInvalid:
            continue
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while data := f.read(COPY_SIZE):
                h.update(data)
                on_bytes(len(data))
        if h.hexdigest() != digest.hex:
            quarantine.mkdir(parents=True, exist_ok=True)
            os.replace(path, quarantine / path.name)
            bad[str(digest)] = users.get(digest, [])
            log.warning("verify bad blob=%s moved=%s breaks=%s", digest.short, quarantine / path.name,
                        ",".join(users.get(digest, [])) or "no model")
    return bad
