"""The fill engine under concurrency and upstream faults, through real sockets."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from . import ollama_like
from .conftest import MirrorFactory
from .fakes import Blob, FakeRegistry, Fault, assert_store_verified, wait_for_file, write_blob

MB = 1_000_000


def _pull_many(base: str, dest: Path, clients: int, min_part: int = 2 * MB) -> list[object]:
    async def run() -> list[object]:
        return await asyncio.gather(
            *(ollama_like.pull(base, "library/m", "latest", dest / str(i), min_part=min_part) for i in range(clients)),
            return_exceptions=True,
        )
    return asyncio.run(run())


@pytest.fixture
def big(registry: FakeRegistry) -> Blob:
    blob = write_blob(registry.directory, 40 * MB, seed=21)
    registry.add_model("library/m", "latest", [blob])
    return blob


def test_ten_clients_one_cold_blob_upstream_sends_it_once(registry: FakeRegistry, start_mirror: MirrorFactory,
                                                          big: Blob, tmp_path: Path) -> None:
    registry.cdn.rate = 20 * MB  # per response: the fill takes long enough for all clients to overlap
    mirror = start_mirror()
    results = _pull_many(mirror.url(), tmp_path / "dl", clients=10)
    assert not [r for r in results if isinstance(r, BaseException)], results
    for i in range(10):
        assert (tmp_path / "dl" / str(i) / big.digest.replace(":", "-")).read_bytes() == big.path.read_bytes()
    assert registry.cdn.bytes_by_digest[big.digest] <= 1.02 * big.size
    assert registry.count("GET", "/manifests/latest") == 1
    assert_store_verified(tmp_path / "cache")


def test_fill_survives_repeated_resets(registry: FakeRegistry, start_mirror: MirrorFactory, big: Blob,
                                       tmp_path: Path) -> None:
    registry.cdn.faults.append(Fault("reset", after=300_000, times=12))
    mirror = start_mirror()
    results = _pull_many(mirror.url(), tmp_path / "dl", clients=2)
    assert not [r for r in results if isinstance(r, BaseException)], results
    assert wait_for_file(tmp_path / "cache" / "blobs" / big.digest.replace(":", "-")).read_bytes() == \
        big.path.read_bytes()
    # resumed from the byte each connection reached: little is fetched twice
    assert registry.cdn.bytes_by_digest[big.digest] <= 1.25 * big.size


@pytest.mark.parametrize("fault", [
    pytest.param(Fault("status", status=503, times=3), id="503"),
    pytest.param(Fault("status", status=429, times=2, headers={"retry-after": "1"}), id="429-retry-after"),
    pytest.param(Fault("expire", after=2_000_000, times=1), id="expired-url"),
    pytest.param(Fault("stall", after=1_000_000, seconds=30, times=2), id="stall"),
])
def test_fill_completes_through_transient_faults(registry: FakeRegistry, start_mirror: MirrorFactory, big: Blob,
                                                 tmp_path: Path, fault: Fault) -> None:
    registry.cdn.faults.append(fault)
    mirror = start_mirror(stall_timeout=1.0)
    started = time.monotonic()
    results = _pull_many(mirror.url(), tmp_path / "dl", clients=3)
    assert not [r for r in results if isinstance(r, BaseException)], results
    assert time.monotonic() - started < 25
    wait_for_file(tmp_path / "cache" / "blobs" / big.digest.replace(":", "-"))
    assert_store_verified(tmp_path / "cache")


def test_corrupt_upstream_bytes_are_never_stored(registry: FakeRegistry, start_mirror: MirrorFactory, big: Blob,
                                                 tmp_path: Path) -> None:
    registry.cdn.faults.append(Fault("corrupt", after=1000, times=-1))
    mirror = start_mirror()
    results = _pull_many(mirror.url(), tmp_path / "dl", clients=3)
    assert all(isinstance(r, BaseException) for r in results), results
    cache = tmp_path / "cache"
    assert not (cache / "blobs" / big.digest.replace(":", "-")).exists()
    assert not list((cache / ".mirror" / "staging").glob("*.data"))
    assert_store_verified(cache)
    # the fault passes: the next request starts over and succeeds
    registry.cdn.faults.clear()
    r = httpx.get(f"{mirror.url()}/v2/library/m/blobs/{big.digest}", timeout=60)
    assert r.status_code == 200 and r.content == big.path.read_bytes()


def test_whole_blob_get_of_corrupt_fill_never_ends_cleanly(registry: FakeRegistry, start_mirror: MirrorFactory,
                                                           big: Blob) -> None:
    registry.cdn.faults.append(Fault("corrupt", after=100, times=-1))
    mirror = start_mirror()
    with pytest.raises(httpx.HTTPError):  # the connection is cut short: no clean 200 with wrong bytes
        httpx.get(f"{mirror.url()}/v2/library/m/blobs/{big.digest}", timeout=60)


def test_permanent_failure_fails_every_waiter_promptly(registry: FakeRegistry, start_mirror: MirrorFactory,
                                                       big: Blob, tmp_path: Path) -> None:
    registry.cdn.faults.append(Fault("status", status=500, times=-1))
    mirror = start_mirror(max_retries=2)
    started = time.monotonic()
    results = _pull_many(mirror.url(), tmp_path / "dl", clients=4)
    assert all(isinstance(r, BaseException) for r in results), results
    assert time.monotonic() - started < 20
    assert not (tmp_path / "cache" / "blobs" / big.digest.replace(":", "-")).exists()
    registry.cdn.faults.clear()
    results = _pull_many(mirror.url(), tmp_path / "dl2", clients=1)
    assert not [r for r in results if isinstance(r, BaseException)], results


def test_range_near_the_end_of_a_cold_blob_gets_bytes_in_seconds(registry: FakeRegistry,
                                                                 start_mirror: MirrorFactory, tmp_path: Path) -> None:
    blob = write_blob(registry.directory, 200 * MB, seed=22)
    registry.add_model("library/big", "latest", [blob])
    registry.cdn.rate = 2 * MB  # per connection: the whole blob would take 12 s even on 8 connections
    mirror = start_mirror(connections=4, chunk_size=16 << 20)
    url = f"{mirror.url()}/v2/library/big/blobs/{blob.digest}"
    with httpx.stream("GET", url) as probe:  # the Ollama probe starts the fill at offset 0
        assert probe.status_code == 200
    start = int(blob.size * 0.9) + 12345
    began = time.monotonic()
    with httpx.stream("GET", url, headers={"Range": f"bytes={start}-{start + 999_999}"}, timeout=30) as r:
        first = next(r.iter_raw(65536))
        ttfb = time.monotonic() - began
    with open(blob.path, "rb") as f:
        f.seek(start)
        assert first == f.read(len(first))
    assert ttfb < 5, ttfb


def test_client_hanging_up_does_not_cancel_the_fill(registry: FakeRegistry, start_mirror: MirrorFactory, big: Blob,
                                                    tmp_path: Path) -> None:
    registry.cdn.rate = 20 * MB
    mirror = start_mirror()
    with httpx.stream("GET", f"{mirror.url()}/v2/library/m/blobs/{big.digest}") as r:
        next(r.iter_raw(65536))
    final = wait_for_file(tmp_path / "cache" / "blobs" / big.digest.replace(":", "-"))
    assert final.read_bytes() == big.path.read_bytes()
    assert registry.cdn.bytes_by_digest[big.digest] <= 1.02 * big.size


def test_workers_with_nothing_left_to_fetch_wait_quietly(registry: FakeRegistry, start_mirror: MirrorFactory) -> None:
    """One response stalls for 3 s near its start; the other connections finish and have nothing
    to take (too little is left to split). They must wait, not spin the event loop: spinning
    took a whole core and halved the speed of the streams still running."""
    blob = write_blob(registry.directory, 24 * MB, seed=23)
    registry.add_model("library/tail", "latest", [blob])
    registry.cdn.faults.append(Fault("stall", after=1 * MB, seconds=3.0))
    mirror = start_mirror(connections=3, chunk_size=8 << 20)
    url = f"{mirror.url()}/v2/library/tail/blobs/{blob.digest}"
    with ThreadPoolExecutor(1) as pool:
        whole = pool.submit(lambda: httpx.get(url, timeout=30).content)  # starts the fill, waits for all of it
        time.sleep(0.8)  # the two unstalled chunks are done by now: their workers sit idle
        wall, cpu = time.monotonic(), time.process_time()
        time.sleep(1.5)
        used = (time.process_time() - cpu) / (time.monotonic() - wall)
        assert not whole.done(), "the stall should still hold the fill"
        assert whole.result() == blob.path.read_bytes()
    assert used < 0.3, f"the mirror used {used:.0%} of a core while its fill waited on one stalled stream"


def test_readers_waiting_where_no_connection_can_cut_in_cost_no_requests(registry: FakeRegistry,
                                                                         start_mirror: MirrorFactory) -> None:
    """Readers blocked just before the end of chunks other connections are fetching: a chunk is
    never cut so close to its end, so no connection stops its request for them (each one that
    did took the same chunk back and stopped again, every megabyte: a CDN that sends ahead was
    paid 20-30% of a 1 GB blob twice for ten short ranges)."""
    chunk = 4 << 20
    blob = write_blob(registry.directory, 10 * chunk, seed=23)
    registry.add_model("library/spread", "latest", [blob])
    registry.cdn.rate = MB  # per connection: a chunk takes 4 s, and the readers wait past their patience
    mirror = start_mirror(chunk_size=chunk, connections=8)  # every connection busy
    url = f"{mirror.url()}/v2/library/spread/blobs/{blob.digest}"
    data = blob.path.read_bytes()
    starts = [k * chunk - 300_000 for k in range(1, 9)]

    def read(start: int) -> bytes:
        got = httpx.get(url, headers={"Range": f"bytes={start}-{start + 99_999}"}, timeout=60)
        assert got.status_code == 206
        return got.content

    with ThreadPoolExecutor(len(starts)) as pool:
        assert list(pool.map(read, starts)) == [data[s:s + 100_000] for s in starts]
    with httpx.stream("GET", url, timeout=120) as whole:  # to the end of the fill
        assert whole.status_code == 200
        assert sum(len(piece) for piece in whole.iter_bytes()) == blob.size
    asked = [r for r in registry.cdn.requests if blob.digest in r[0]]
    assert len(asked) <= 12, asked  # one per chunk, and a few for the tail
    assert registry.cdn.bytes_by_digest[blob.digest] <= 1.02 * blob.size
