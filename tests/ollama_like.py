"""A client that pulls the way Ollama 0.9.3 does (server/download.go), for load and fault tests.

Manifest GET; per blob a HEAD for the size, a GET without Range read only for
its Location header, then parts fetched concurrently as Range requests to that
URL; finally the sha256 of the whole file. Unlike Ollama it checks each part's
status and length, so a test sees exactly what went wrong.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import httpx

UA = "ollama/0.9.3 (amd64 linux) Go/go1.24.0"
MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"


class PullError(Exception):
    pass


@dataclass
class Pulled:
    manifest: bytes
    blobs: dict[str, Path]


def part_ranges(size: int, parts: int = 16, min_part: int = 100_000_000, max_part: int = 1_000_000_000) -> list[
        tuple[int, int]]:
    """Ollama's split: size/16 clamped to [100 MB, 1 GB] (tests shrink ``min_part``)."""
    part = min(max(size // parts, min_part), max_part) or 1
    return [(start, min(start + part, size)) for start in range(0, size, part)]


async def pull(base: str, name: str, tag: str, dest: Path, *, min_part: int = 100_000_000,
               timeout: float = 60.0) -> Pulled:
    dest.mkdir(parents=True, exist_ok=True)
    async with httpx.AsyncClient(timeout=timeout, headers={"User-Agent": UA}) as client:
        r = await client.get(f"{base}/v2/{name}/manifests/{tag}", headers={"Accept": MANIFEST_V2})
        if r.status_code != 200:
            raise PullError(f"manifest: {r.status_code} {r.text}")
        manifest = r.content
        doc = json.loads(manifest)
        blobs = {}
        for layer in [doc["config"], *doc["layers"]]:
            blobs[layer["digest"]] = await pull_blob(client, base, name, layer["digest"], dest, min_part)
        return Pulled(manifest, blobs)


async def pull_blob(client: httpx.AsyncClient, base: str, name: str, digest: str, dest: Path,
                    min_part: int = 100_000_000) -> Path:
    url = f"{base}/v2/{name}/blobs/{digest}"
    head = await client.head(url)
    if head.status_code != 200:
        raise PullError(f"HEAD {digest}: {head.status_code}")
    size = int(head.headers["content-length"])
    async with client.stream("GET", url) as probe:  # read only the headers, then hang up
        if probe.status_code not in (200, 307):
            raise PullError(f"GET {digest}: {probe.status_code}")
        direct = probe.headers.get("location")
    if not direct:
        raise PullError("no Location header in response")
    path = dest / digest.replace(":", "-")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        await asyncio.gather(*(_part(client, direct, fd, a, b) for a, b in part_ranges(size, min_part=min_part)))
    finally:
        os.close(fd)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(8 << 20):
            h.update(data)
    if f"sha256:{h.hexdigest()}" != digest:
        path.unlink()
        raise PullError(f"digest mismatch, file must be downloaded again: {digest}")
    return path


async def _part(client: httpx.AsyncClient, url: str, fd: int, start: int, stop: int) -> None:
    async with client.stream("GET", url, headers={"Range": f"bytes={start}-{stop - 1}"}) as r:
        if r.status_code != 206:
            raise PullError(f"part {start}: status {r.status_code}")
        position = start
        async for data in r.aiter_raw():
            os.pwrite(fd, data, position)
            position += len(data)
    if position != stop:
        raise PullError(f"part {start}: got {position - start} of {stop - start} bytes")
