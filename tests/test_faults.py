"""Upstream faults through a fault-injecting proxy between the mirror and its fake CDN.

For each fault, three clients wait on the same fill. A transient fault: the fill completes
and every client gets the right bytes. A permanent one: every client gets an error
promptly, nothing is stored, and once the fault is gone the next request fills the blob.
Never is an unverified or wrong blob stored under its final name.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import MirrorFactory
from .faultproxy import FaultProxy, ProxyFault
from .fakes import Blob, FakeCDN, FakeRegistry, assert_store_verified, write_blob

CLIENTS = 3
FAST = {"stall_timeout": 1.5, "max_retries": 3, "connect_timeout": 2.0, "connections": 4}

TRANSIENT = {
    "reset": ProxyFault("reset", after=300_000, times=3),
    "stall": ProxyFault("stall", after=200_000, times=2),
    "trickle": ProxyFault("trickle", rate=400_000, times=2),
    "500": ProxyFault("status", status=500, times=2),
    "502": ProxyFault("status", status=502, times=2),
    "503 Retry-After": ProxyFault("status", status=503, headers={"Retry-After": "1"}, times=2),
    "429 Retry-After": ProxyFault("status", status=429, headers={"Retry-After": "1"}, times=2),
    "429": ProxyFault("status", status=429, times=2),
    "expired URL": ProxyFault("expired", times=1),
    "short body": ProxyFault("short", after=5000, times=2),
}
PERMANENT = {
    "reset": ProxyFault("reset", after=0, times=-1),  # after some bytes it would be progress: resumed, not failed
    "stall": ProxyFault("stall", after=0, times=-1),
    "500": ProxyFault("status", status=500, times=-1),
    "503 Retry-After": ProxyFault("status", status=503, headers={"Retry-After": "1"}, times=-1),
    "429": ProxyFault("status", status=429, times=-1),
    "expired URL": ProxyFault("expired", times=-1),
    "short body": ProxyFault("short", after=5000, times=-1),
    "wrong bytes": ProxyFault("corrupt", after=123_456, times=-1),
    "wrong bytes once": ProxyFault("corrupt", after=1000, times=1),  # a mismatch fails the fill all the same
}


@pytest.fixture
def proxy(cdn: FakeCDN, registry: FakeRegistry) -> Iterator[FaultProxy]:
    cdn_port = int(cdn.url.rsplit(":", 1)[1])
    proxied = FaultProxy(cdn_port).start()
    registry.cdn_url = proxied.url("localhost")  # the registry now redirects blob GETs through the proxy
    yield proxied
    proxied.stop()


@pytest.fixture
def blob(registry: FakeRegistry) -> Blob:
    layer = write_blob(registry.directory, 3_000_000, seed=111)
    registry.add_model("library/faulty", "1", [layer])
    return layer


def _get(url: str) -> bytes | Exception:
    try:
        with httpx.Client(timeout=60) as client:
            response = client.get(url)
            if response.status_code != 200:
                return RuntimeError(f"{response.status_code} {response.text[:200]}")
            return response.content
    except httpx.HTTPError as exc:
        return exc


def _clients(url: str) -> list[bytes | Exception]:
    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        return list(pool.map(_get, [url] * CLIENTS))


def _stored(tmp_path: Path, blob: Blob) -> Path:
    return tmp_path / "cache" / "blobs" / blob.digest.replace(":", "-")


@pytest.mark.parametrize("name", list(TRANSIENT))
def test_transient_fault_fill_completes_for_every_client(
    name: str, proxy: FaultProxy, blob: Blob, start_mirror: MirrorFactory, tmp_path: Path
) -> None:
    fault = TRANSIENT[name]
    proxy.inject(ProxyFault(**vars(fault)))
    mirror = start_mirror(**FAST)
    got = _clients(f"{mirror.url()}/v2/library/faulty/blobs/{blob.digest}")
    expected = blob.path.read_bytes()
    assert all(isinstance(g, bytes) and hashlib.sha256(g).hexdigest() == blob.digest[7:] for g in got), \
        [repr(g)[:200] for g in got if not isinstance(g, bytes)]
    assert got[0] == expected
    assert proxy.struck, "the fault never struck"
    assert _stored(tmp_path, blob).read_bytes() == expected
    assert_store_verified(tmp_path / "cache")


@pytest.mark.parametrize("name", list(PERMANENT))
def test_permanent_fault_fails_every_client_promptly_and_stores_nothing(
    name: str, proxy: FaultProxy, blob: Blob, start_mirror: MirrorFactory, tmp_path: Path, registry: FakeRegistry
) -> None:
    proxy.inject(ProxyFault(**vars(PERMANENT[name])))
    if PERMANENT[name].times == 1:  # a fill of seconds: every client joins the one that fails (a later one fills anew)
        registry.cdn.rate = 1_000_000
    mirror = start_mirror(**FAST)
    url = f"{mirror.url()}/v2/library/faulty/blobs/{blob.digest}"
    began = time.monotonic()
    got = _clients(url)
    assert all(isinstance(g, Exception) for g in got), [type(g).__name__ for g in got]
    assert time.monotonic() - began < 45
    assert not _stored(tmp_path, blob).exists()
    assert_store_verified(tmp_path / "cache")

    proxy.clear()  # the fault is gone: the next request tries again, and fills
    again = _get(url)
    assert isinstance(again, bytes) and again == blob.path.read_bytes()
    assert_store_verified(tmp_path / "cache")


def _read_like_urllib(url: str) -> tuple[int, int, int]:
    """Status, Content-Length and the bytes read as ``shutil.copyfileobj(urlopen(url), f)`` reads
    them: ``read(n)`` until it returns nothing, which http.client also does at a premature end."""
    parts = httpx.URL(url)
    conn = http.client.HTTPConnection(parts.host, parts.port, timeout=60)
    try:
        conn.request("GET", parts.raw_path.decode())
        response = conn.getresponse()
        got = 0
        try:
            while data := response.read(1 << 16):
                got += len(data)
        except http.client.IncompleteRead as exc:
            got += len(exc.partial)
        return response.status, int(response.headers.get("Content-Length", -1)), got
    finally:
        conn.close()


@pytest.mark.parametrize("retry_after", [0, 4], ids=["fails fast", "fails after 12 s of retries"])
def test_fill_failing_before_its_first_byte_answers_an_error_status(
    proxy: FaultProxy, blob: Blob, start_mirror: MirrorFactory, retry_after: int
) -> None:
    """Never a 200 whose body ends early: a client that reads with read(n) would take it for a whole
    blob. However long the fill tries before it gives up, the head waits for it."""
    proxy.inject(ProxyFault("status", status=503, times=-1,
                            headers={"Retry-After": str(retry_after)} if retry_after else {}))
    mirror = start_mirror(**FAST)
    status, _, got = _read_like_urllib(f"{mirror.url()}/v2/library/faulty/blobs/{blob.digest}")
    assert status == 502 and got < 2000  # the registry's JSON error, not blob bytes


def test_ollama_resolving_get_of_a_cold_blob_answers_at_once(
    proxy: FaultProxy, blob: Blob, start_mirror: MirrorFactory
) -> None:
    """Ollama reads only the head of its GET without Range (for the Location): no waiting for bytes."""
    proxy.inject(ProxyFault("stall", after=0, times=-1))  # the CDN never sends a byte
    mirror = start_mirror(**FAST)
    began = time.monotonic()
    with httpx.stream("GET", f"{mirror.url()}/v2/library/faulty/blobs/{blob.digest}",
                      headers={"User-Agent": "ollama/0.32.15 (amd64 linux) Go/go1.26.0"}, timeout=30) as r:
        assert r.status_code == 200 and r.headers["location"]
    assert time.monotonic() - began < 2


def test_fill_failing_after_its_first_bytes_cuts_the_body_short(
    proxy: FaultProxy, blob: Blob, start_mirror: MirrorFactory
) -> None:
    proxy.inject(ProxyFault("corrupt", after=123_456, times=-1))  # every byte arrives; the digest fails
    mirror = start_mirror(**FAST)
    status, length, got = _read_like_urllib(f"{mirror.url()}/v2/library/faulty/blobs/{blob.digest}")
    assert status == 200 and length == blob.size and got < length
