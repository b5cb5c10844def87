"""How many upstream connections a fill runs: adapted to what the upstream gives, within a share
of the total.

A CDN that caps each connection (25 MB/s each, say) rewards more connections up to the link's
speed; a single shared pipe does not, and there more connections only add overhead. So a fill
starts with a few connections and doubles them while the aggregate rate keeps rising (by a quarter at least), then
settles on the smallest count that reached the best rate. 429 or 503 halves it and stops the
growth. ``--connections N`` pins the count instead.

All fills draw from one ``ConnectionBudget`` (``--upstream-connections``): a fill may hold at most
an equal share of it while others are running, so a second fill never waits for the first.

Pure logic: no I/O, no awaits; ``download.py`` feeds it bytes and time and asks for the target.
"""

from __future__ import annotations

from dataclasses import dataclass, field

START = 8  # connections a fill opens first
PER_FILL_CAP = 32  # the most one fill ever runs (Ollama itself runs 16 parts at once)
GAIN = 0.25  # a doubling must raise the aggregate rate by this share to be kept (noise stays below it)
WINDOW = 0.5  # seconds of one measurement, taken once every stream of the count has delivered
SAMPLES = 2  # windows per connection count
THROTTLE_GAP = 1.0  # seconds: 429/503 answers closer together are one signal (requests sent at once)


class ConnectionBudget:
    """The upstream connections all fills share, handed out as equal shares of the total."""

    def __init__(self, total: int) -> None:
        self.total = total
        self._held: dict[object, int] = {}

    def join(self, fill: object) -> None:
        self._held.setdefault(fill, 0)

    def leave(self, fill: object) -> None:
        self._held.pop(fill, None)

    @property
    def in_use(self) -> int:
        return sum(self._held.values())

    def share(self) -> int:
        """What one fill may hold: an equal part of the total (at least one connection)."""
        return max(1, self.total // max(1, len(self._held)))

    def take(self, fill: object) -> bool:
        """One more connection for ``fill``, if the total and its share allow it."""
        held = self._held.get(fill, 0)
        if held >= self.share() or self.in_use >= self.total:
            return False
        self._held[fill] = held + 1
        return True

    def give_back(self, fill: object) -> None:
        if self._held.get(fill, 0) > 0:
            self._held[fill] -= 1


@dataclass
class Adaptive:
    """The connection count of one fill, stepped by the rate each count achieved."""

    pinned: int | None = None  # --connections: no adapting
    cap: int = PER_FILL_CAP
    target: int = 0
    settled: bool = False
    rates: dict[int, float] = field(default_factory=dict)  # connection count -> aggregate bytes/s it reached
    _samples: dict[int, list[float]] = field(default_factory=dict)
    _throttled_at: float | None = None

    def __post_init__(self) -> None:
        if self.pinned:
            self.target, self.settled = min(self.pinned, self.cap), True
        else:
            self.target = min(START, self.cap)

    def measured(self, count: int, rate: float) -> bool:
        """The aggregate ``rate`` with ``count`` connections streaming for a whole window; True
        when the target changed. A count is judged by the slower of its last two windows: a burst
        of bytes that waited in socket buffers must not pass for a faster link."""
        if self.settled or count < self.target:
            return False  # not every connection of this step was running: measure again
        seen = self._samples.setdefault(count, [])
        seen.append(rate)
        if len(seen) < SAMPLES:
            return False
        self.rates[count] = min(seen[-SAMPLES:])
        previous = max((r for c, r in self.rates.items() if c < count), default=None)
        if previous is not None and self.rates[count] < previous * (1 + GAIN):
            best = max(self.rates.values())
            self.target = min(c for c, r in self.rates.items() if r * (1 + GAIN) >= best)
            self.settled = True
            return True
        if count >= self.cap:
            self.settled = True
            return False
        self.target = min(count * 2, self.cap)  # the cap is measured too: kept only if it pays as any step must
        return True

    def throttled(self, now: float) -> bool:
        """Upstream said 429 or 503 at ``now`` (seconds): half the connections (pinned or not:
        it asked us to slow down), and no more growth. Answers within ``THROTTLE_GAP`` of the
        last halving count once: a burst of requests sent together and refused together (the
        fill's first ones) would otherwise halve it once per request. True if the target changed."""
        if self._throttled_at is not None and now - self._throttled_at < THROTTLE_GAP:
            return False
        self._throttled_at = now
        before = self.target
        self.target = max(1, self.target // 2)
        self.settled = True
        return self.target != before
