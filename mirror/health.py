"""What the mirror knows of each upstream registry's health, for the log, ``/status.json``,
the status page and ``/metrics``.

Each registry is probed once at start-up, in the background (start-up never waits for it),
and again only when nothing was heard of it for a minute; every registry request the mirror
makes in between updates the same record. A failure is logged once per cause per minute: a
pull whose upstream is down makes dozens of requests, and one line with the cause and the fix
says it all. A recovery is logged once.

Pure bookkeeping: the probe itself is the caller's (``Upstream.probe``), so this module knows
neither HTTP nor the network.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from enum import Enum

from cachetools import TTLCache

from .errors import FillFailed, MirrorError, UpstreamError

log = logging.getLogger(__name__)

LOG_EVERY = 60.0  # seconds: one line per cause in this time, however many requests meet it
PROBE_EVERY = 60.0  # seconds without news of a registry before it is probed again


class State(Enum):
    UNKNOWN = "unknown"  # not probed yet
    UP = "up"  # its last answer came, with any status below 500
    DOWN = "down"  # its last request failed: no connection, no answer, or a 5xx or 429
    OFFLINE = "offline"  # --offline: the mirror never asks it


def cause_of(exc: MirrorError) -> str:
    """A short word for what went wrong (``refused``, ``dns``, ``tls``...), set where the failure
    was translated (``upstream.py``); the class name otherwise."""
    return str(exc.detail.get("cause") or type(exc).__name__)


def upstream_cause(exc: BaseException) -> UpstreamError | None:
    """The upstream failure behind ``exc``: itself, or what made a fill fail."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, UpstreamError):
            return exc
        if not isinstance(exc, FillFailed):
            return None
        exc, seen = exc.__cause__, seen + 1  # type: ignore[assignment]
    return None


class Health:
    """One registry's record: reachable or not, the last error, when it was last reached, latency."""

    def __init__(self, registry: str, url: str, *, offline: bool = False, kind: str = "upstream") -> None:
        self.kind = kind  # what the log lines call it: "upstream", or "replica" for a peer on the bucket
        self.registry = registry
        self.url = url
        self.state = State.OFFLINE if offline else State.UNKNOWN
        self.latency: float | None = None  # seconds to the headers of its last answer
        self.last_reached: float | None = None  # unix time of its last answer
        self.last_error: str | None = None
        self.last_error_at: float | None = None  # unix time
        self.heard = -float("inf")  # monotonic time of the last news, either way
        self._logged: TTLCache[str, bool] = TTLCache(maxsize=64, ttl=LOG_EVERY)

    def reached(self, latency: float) -> None:
        """The registry answered (any status below 500) after ``latency`` seconds."""
        was = self.state
        self.state, self.latency, self.last_reached, self.heard = State.UP, latency, time.time(), time.monotonic()
        if was is not State.UP:
            log.info("%s up registry=%s url=%s latency_ms=%.0f%s", self.kind, self.registry, self.url, latency * 1000,
                     " (recovered)" if was is State.DOWN else "")
            self._logged.clear()  # the next failure is news again

    def failed(self, exc: MirrorError) -> None:
        """A registry request failed: no connection, no answer, or a 5xx or 429."""
        self.state, self.heard = State.DOWN, time.monotonic()
        self.last_error, self.last_error_at = str(exc), time.time()
        self._log(f"{self.kind} down", exc)

    def met(self, exc: MirrorError) -> None:
        """A request met this failure (a CDN's, an invalid answer...): logged, the state untouched."""
        self._log(f"{self.kind} error", exc)

    def _log(self, event: str, exc: MirrorError) -> None:
        cause = cause_of(exc)
        if cause not in self._logged:
            self._logged[cause] = True
            log.warning("%s registry=%s url=%s cause=%s reason=%s", event, self.registry, self.url, cause, exc)

    def snapshot(self) -> dict[str, object]:
        """The record as ``/status.json`` shows it."""
        return {
            "registry": self.registry,
            "url": self.url,
            "state": self.state.value,
            "latency_ms": round(self.latency * 1000, 1) if self.latency is not None else None,
            "last_reached": self.last_reached,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
        }

    async def watch(self, probe: Callable[[], Awaitable[None]], every: float = PROBE_EVERY) -> None:
        """Probe now, then whenever nothing was heard of the registry for ``every`` seconds
        (requests count as news), so the record never tells an old story for long."""
        while True:
            quiet = time.monotonic() - self.heard
            if quiet >= every:
                try:
                    await probe()
                except Exception as exc:  # a bug: said once, and the watch goes on
                    log.error("upstream probe bug registry=%s: %r", self.registry, exc, exc_info=exc)
                quiet = 0.0
            await asyncio.sleep(max(every - quiet, 1.0))
