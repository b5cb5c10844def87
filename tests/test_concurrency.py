"""How many connections a fill runs: the rule alone, then fills against CDNs of two kinds."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import httpx
import pytest

from mirror.concurrency import PER_FILL_CAP, SAMPLES, START, Adaptive, ConnectionBudget

from .conftest import MirrorFactory
from .fakes import FakeRegistry, assert_store_verified, write_blob

MB = 1_000_000


def test_a_count_that_keeps_paying_doubles_up_to_the_cap() -> None:
    adaptive = Adaptive()
    counts = []
    while not adaptive.settled:
        count = adaptive.target
        counts.append(count)
        for _ in range(SAMPLES):
            adaptive.measured(count, count * 25e6)  # each connection capped at 25 MB/s
    assert counts == [START, 2 * START, PER_FILL_CAP] and adaptive.target == PER_FILL_CAP  # the cap is measured too


def test_a_shared_pipe_settles_on_the_fewest_connections_that_fill_it() -> None:
    adaptive = Adaptive()
    adaptive.measured(START, 100e6)
    adaptive.measured(START, 101e6)
    assert adaptive.target == 2 * START and not adaptive.settled
    adaptive.measured(2 * START, 180e6)  # a burst that waited in socket buffers...
    assert not adaptive.settled
    adaptive.measured(2 * START, 104e6)  # ...then the pipe's real rate: twice the connections, no gain
    assert adaptive.settled and adaptive.target == START


def test_a_partial_window_does_not_count_as_a_step() -> None:
    adaptive = Adaptive()
    for _ in range(SAMPLES):
        adaptive.measured(START - 1, 10e6)  # one worker had not started yet
    assert adaptive.target == START and not adaptive.settled and not adaptive.rates


def test_throttling_halves_even_a_pinned_count_and_stops_growth() -> None:
    pinned = Adaptive(pinned=12)
    assert pinned.target == 12 and pinned.settled
    assert pinned.throttled(100.0) and pinned.target == 6
    growing = Adaptive()
    growing.throttled(100.0)
    assert growing.settled and not growing.measured(growing.target, 1e9)


def test_a_burst_of_refusals_halves_once() -> None:
    """The fill's first requests go out together, and a CDN refusing them refuses them together:
    one halving, not one per request (two 503s took a fill from 8 to 2 connections)."""
    adaptive = Adaptive()
    assert adaptive.throttled(100.0) and adaptive.target == START // 2
    assert not adaptive.throttled(100.2) and adaptive.target == START // 2
    assert adaptive.throttled(102.0) and adaptive.target == START // 4  # still refused later: halve again


def test_budget_shares_the_total_between_fills() -> None:
    budget = ConnectionBudget(10)
    first, second = object(), object()
    budget.join(first)
    assert sum(budget.take(first) for _ in range(12)) == 10  # alone: all of it
    budget.join(second)
    assert not budget.take(second)  # nothing left until the first gives some back
    for _ in range(5):
        budget.give_back(first)
    assert sum(budget.take(second) for _ in range(12)) == 5  # its equal share
    assert not budget.take(first)  # the first now holds its share already


def _settled(caplog: pytest.LogCaptureFixture) -> int:
    """The connections the fill ran at its end (settled, or still trying the next count)."""
    lines = [r.getMessage() for r in caplog.records if "fill done" in r.getMessage()]
    assert len(lines) == 1, lines
    return int(re.search(r"connections=(\d+)", lines[0])[1])  # type: ignore[index]


def _fill_through(registry: FakeRegistry, start_mirror: MirrorFactory, tmp_path: Path, size: int) -> None:
    layer = write_blob(registry.directory, size, seed=171)
    registry.add_model("library/paced", "1", [layer])
    mirror = start_mirror(chunk_size=2 << 20)
    with httpx.Client(timeout=120) as client:
        got = client.get(f"{mirror.url()}/v2/library/paced/blobs/{layer.digest}")
    assert got.status_code == 200 and got.content == layer.path.read_bytes()
    assert registry.cdn.bytes_by_digest[layer.digest] <= 1.02 * layer.size
    assert_store_verified(tmp_path / "cache")


def test_cdn_capping_each_connection_gets_more_connections(
    registry: FakeRegistry, start_mirror: MirrorFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mirror.fill")
    registry.cdn.rate = 2 * MB  # per connection, as a far CDN
    _fill_through(registry, start_mirror, tmp_path, 120 * MB)
    assert _settled(caplog) >= 2 * START


def test_cdn_behind_one_shared_pipe_keeps_few_connections(
    registry: FakeRegistry, start_mirror: MirrorFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mirror.fill")
    registry.cdn.shared_rate = 12 * MB  # all connections together
    # Long enough for every count tried to be measured: a noisy first window may send it up a step or
    # two, but a count is kept only if it pays, so it comes back down.
    _fill_through(registry, start_mirror, tmp_path, 130 * MB)
    assert _settled(caplog) <= 2 * START
