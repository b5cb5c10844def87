"""What the mirror did, for Prometheus (``/metrics``) and for the status page.

Event counts (requests, cache lookups, bytes served, fills) are counted as they happen;
what is a state (active fills, waiting clients, store size, free space) is read when
scraped. Each app has its own registry, so several mirrors in one process stay apart.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .eviction import store_usage
from .fill import Fill, FillState
from .health import State

if TYPE_CHECKING:
    from .app import Mirror
    from .replicas import Replicas

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
USAGE_CACHE_SECONDS = 10.0  # the store's size is a directory scan: not on every scrape


def route_of(path: str) -> str:
    """A bounded label for a request path (never the raw path: names would explode the series)."""
    if path.startswith("/v2/"):
        if "/manifests/" in path:
            return "manifest"
        if "/blobs/" in path:
            return "blob"
        return "v2" if path == "/v2/" else "other"
    if path.startswith("/api/"):
        return "api_" + path[5:].split("/", 1)[0].replace("-", "_")[:20]
    return {"/": "status", "/metrics": "metrics", "/status.json": "status"}.get(path, "other")


class Metrics:
    def __init__(self, mirror: Mirror) -> None:
        self._mirror = mirror
        self.registry = CollectorRegistry()
        self.requests = Counter("ollama_mirror_requests", "Requests answered, by route and status.",
                                ["route", "method", "status"], registry=self.registry)
        self.lookups = Counter("ollama_mirror_cache_lookups", "Manifest and blob requests by cache outcome "
                               "(hit, miss, stale, fill: streamed from a running fill).",
                               ["kind", "result"], registry=self.registry)
        self.served = Counter("ollama_mirror_served_bytes", "Blob bytes sent to clients, by where they came "
                              "from (hit: disk; fill: streamed as they arrived).", ["source"], registry=self.registry)
        self.fill_seconds = Histogram("ollama_mirror_fill_seconds", "Duration of finished fills.",
                                      buckets=(1, 5, 15, 60, 300, 900, 3600, 4 * 3600), registry=self.registry)
        self.fill_rate = Histogram("ollama_mirror_fill_throughput_bytes_per_second", "Upstream throughput of "
                                   "finished fills.", buckets=(1e6, 5e6, 10e6, 25e6, 50e6, 100e6, 250e6, 500e6, 1e9),
                                   registry=self.registry)
        self.fills = Counter("ollama_mirror_fills", "Fills that ended, by outcome.", ["outcome"],
                             registry=self.registry)
        self.retries = Counter("ollama_mirror_upstream_retries", "Upstream requests retried by fills.",
                               registry=self.registry)
        self.upstream_errors = Counter("ollama_mirror_upstream_errors", "Upstream failures that reached a "
                                       "client or ended a fill, by error code.", ["code"], registry=self.registry)
        self.fetched_done = 0  # upstream bytes of fills that ended; running fills add theirs when scraped
        self.shared_done = 0  # bytes of ended fills that came from the shared bucket or another replica
        self._served = {"hit": 0, "fill": 0}  # the same figures as plain numbers, for the status page
        self._blob_gets = {"hit": 0, "fill": 0}
        self.started = time.time()
        self.registry.register(_StateCollector(mirror, self))
        mirror.engine.finished.append(self.fill_finished)

    def request(self, path: str, method: str, status: int, cache: str | None, sent: int) -> None:
        route = route_of(path)
        self.requests.labels(route, method, str(status)).inc()
        if route in ("manifest", "blob") and cache and cache != "-" and method == "GET":
            self.lookups.labels(route, cache).inc()
        if route == "blob" and cache in ("hit", "fill"):
            self.served.labels(cache).inc(sent)
            self._served[cache] += sent
            self._blob_gets[cache] += 1

    def fill_finished(self, fill: Fill) -> None:
        self.fetched_done += fill.from_upstream
        self.shared_done += fill.fetched - fill.from_upstream
        self.retries.inc(fill.retries)
        if fill.state is FillState.DONE:
            self.fills.labels("done").inc()
            seconds = max(time.monotonic() - fill.started, 1e-3)
            self.fill_seconds.observe(seconds)
            if fill.fetched:
                self.fill_rate.observe(fill.fetched / seconds)
        else:
            self.fills.labels("failed").inc()
            code = getattr(fill.error, "code", "UNKNOWN")
            self.upstream_errors.labels(code).inc()

    def totals(self) -> dict[str, float]:
        """The figures the status page shows: hit ratio and bytes saved."""
        fetched = self.fetched_done + sum(f.from_upstream for f in self._mirror.engine.active)
        served = self._served["hit"] + self._served["fill"]
        asked = self._blob_gets["hit"] + self._blob_gets["fill"]
        return {"served_bytes": served, "upstream_bytes": fetched, "saved_bytes": max(served - fetched, 0),
                "hit_ratio": self._blob_gets["hit"] / asked if asked else 0.0, "since": self.started}

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _upstream_gauges(mirror: Mirror) -> Iterator[GaugeMetricFamily]:
    """Each upstream registry's health: up (absent until first probed, and offline), its latency,
    when it last answered."""
    up = GaugeMetricFamily("ollama_mirror_upstream_up", "Whether the upstream registry answered its last request "
                           "or probe (1) or not (0: no connection, no answer, 5xx or 429).", labels=["registry"])
    latency = GaugeMetricFamily("ollama_mirror_upstream_latency_seconds", "Seconds to the headers of the "
                                "registry's last answer.", labels=["registry"])
    reached = GaugeMetricFamily("ollama_mirror_upstream_last_reached_timestamp_seconds", "Unix time of the "
                                "registry's last answer.", labels=["registry"])
    for host, registry in mirror.registries.items():
        health = registry.upstream.health
        if health.state in (State.UP, State.DOWN):
            up.add_metric([host], 1.0 if health.state is State.UP else 0.0)
        if health.latency is not None:
            latency.add_metric([host], health.latency)
        if health.last_reached is not None:
            reached.add_metric([host], health.last_reached)
    yield from (up, latency, reached)


def _replica_metrics(replicas: Replicas, shared_bytes: int) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    yield CounterMetricFamily("ollama_mirror_replica_bytes", "Blob bytes fills got from the shared bucket or "
                              "another replica instead of upstream.", value=shared_bytes)
    up = GaugeMetricFamily("ollama_mirror_replica_up", "Replicas on the shared bucket, by their last heartbeat: "
                           "1 alive, 0 gone.", labels=["replica"])
    fills = GaugeMetricFamily("ollama_mirror_replica_fills", "Blobs each replica fills now.", labels=["replica"])
    for replica in replicas.seen:
        up.add_metric([replica.id], 0.0 if replica.gone else 1.0)
        fills.add_metric([replica.id], float(len(replica.fills)))
    yield from (up, fills)


class _StateCollector(Collector):
    """Gauges read at scrape time, from the engine and the disk."""

    def __init__(self, mirror: Mirror, metrics: Metrics) -> None:
        self._mirror, self._metrics = mirror, metrics
        self._usage: tuple[float, int] = (0.0, 0)
        self._loop = asyncio.get_running_loop()  # scrapes run in a thread: count this loop's tasks

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        mirror = self._mirror
        active = mirror.engine.active
        yield GaugeMetricFamily("ollama_mirror_active_fills", "Fills running now.", value=len(active))
        yield GaugeMetricFamily("ollama_mirror_waiting_clients", "Client streams following a running fill.",
                                value=sum(f.waiting_clients for f in active))
        fetched = self._metrics.fetched_done + sum(f.from_upstream for f in active)
        yield CounterMetricFamily("ollama_mirror_upstream_bytes", "Bytes fetched from upstream (with "
                                  "ollama_mirror_served_bytes_total: the bytes the cache saved).", value=fetched)
        if mirror.engine.replicas is not None:
            yield from _replica_metrics(mirror.engine.replicas, self._metrics.shared_done + sum(
                f.fetched - f.from_upstream for f in active))
        yield GaugeMetricFamily("ollama_mirror_event_loop_tasks", "Tasks alive on the server's event loop "
                                "(a number that only grows is a leak).", value=len(asyncio.all_tasks(self._loop)))
        yield GaugeMetricFamily("ollama_mirror_store_bytes", "Bytes of blobs in the store.", value=self.usage())
        yield GaugeMetricFamily("ollama_mirror_disk_free_bytes", "Free space on the store's filesystem.",
                                value=shutil.disk_usage(mirror.layout.root).free)
        yield from _upstream_gauges(mirror)
        evictor = mirror.evictor
        yield CounterMetricFamily("ollama_mirror_evicted_models", "Models removed by eviction.",
                                  value=evictor.evicted_models if evictor else 0)
        yield CounterMetricFamily("ollama_mirror_evicted_bytes", "Bytes freed by eviction.",
                                  value=evictor.evicted_bytes if evictor else 0)
        if evictor is not None:
            yield GaugeMetricFamily("ollama_mirror_store_limit_bytes", "The store's high watermark (--max-size).",
                                    value=evictor.high)

    def usage(self) -> int:
        at, value = self._usage
        if time.monotonic() - at > USAGE_CACHE_SECONDS:
            value = store_usage(self._mirror.layout)
            self._usage = (time.monotonic(), value)
        return value
