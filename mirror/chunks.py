"""The chunk map of one blob being filled, and which chunk a free connection takes next.

Pure data: no I/O, no awaits. The map is written by its fill's download (on the fill loop) and
read by the readers serving clients (on the serving loop): cutting a chunk and reading what is
available take a lock, so a reader never sees the list half-updated.
The blob ``[0, size)`` is covered by contiguous
chunks; each records how many bytes from its start are on disk (``filled``) and
which connection is writing it (``owner``). ``filled`` is all that readers, the
hasher and resume-after-restart need.

One request fetches one chunk, read to its end, so its keep-alive connection is
reused and no response is ever cut short (that wastes what the CDN had in flight,
megabytes on a fast link). Choosing the next chunk (``claim``):

1. urgent demand: the chunk holding a position a reader has been blocked on for
   a while; when that position lies well past the front of a chunk another
   connection is writing, the chunk is split there;
2. demand: the chunk holding any blocked reader's position, if nobody writes it;
3. read-ahead: the first idle chunk after a reader's position, for the reader with the
   least fetched ahead of it, so that readers of different parts progress alike;
4. lowest: the first idle chunk. The connections work as a sliding window from the
   start, so the verified prefix, and every reader streaming from the start, grows
   at the speed of all connections together, and the hash is nearly done when the
   last byte lands. (Spreading connections over the blob, aria2's way, finished
   1 GB 15% later here: the hash could only start over the last segments at the end.)
5. steal: at the tail, the back half of the in-flight chunk with most bytes left,
   so the last megabytes do not trickle in over one slow connection.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable
from dataclasses import dataclass

SPLIT_MIN = 1 << 20  # never create a piece smaller than this by splitting
STEAL_MIN = 8 << 20  # steal only halves this large: a steal cuts the victim's response short
READ_AHEAD = 256 << 20  # how far past a reader read-ahead looks; beyond, the window from the start


@dataclass(slots=True, eq=False)
class Chunk:
    start: int
    stop: int
    filled: int = 0
    owner: object | None = None

    @property
    def edge(self) -> int:
        """First offset of this chunk not yet on disk."""
        return self.start + self.filled

    @property
    def done(self) -> bool:
        return self.edge >= self.stop

    @property
    def idle(self) -> bool:
        """Not done, and no connection is fetching it."""
        return self.owner is None and not self.done

    def advance(self, n: int) -> None:
        self.filled = min(self.filled + n, self.stop - self.start)


class ChunkMap:
    def __init__(self, size: int, chunks: list[Chunk]) -> None:
        self.size = size
        self.chunks = chunks
        self._starts = [c.start for c in chunks]
        self._lock = threading.Lock()  # split() against readers on another thread

    @classmethod
    def empty(cls, size: int, chunk_size: int) -> ChunkMap:
        bounds = list(range(0, size, chunk_size)) + [size]
        return cls(size, [Chunk(a, b) for a, b in zip(bounds, bounds[1:])])

    @classmethod
    def from_state(cls, size: int, state: list[list[int]]) -> ChunkMap | None:
        """A map saved by ``to_state``, or None when it does not describe this size."""
        chunks = [Chunk(start, stop, filled) for start, stop, filled in state]
        position = 0
        for c in chunks:
            if c.start != position or c.stop <= c.start or not 0 <= c.filled <= c.stop - c.start:
                return None
            position = c.stop
        return cls(size, chunks) if position == size and chunks else None

    def to_state(self) -> list[list[int]]:
        return [[c.start, c.stop, c.filled] for c in self.chunks]

    # -- what is on disk ----------------------------------------------------

    def chunk_at(self, position: int) -> Chunk:
        with self._lock:
            return self.chunks[bisect.bisect_right(self._starts, position) - 1]

    def available(self, position: int, limit: int) -> int:
        """How many bytes from ``position`` are on disk, contiguously (at most ``limit``)."""
        if not 0 <= position < self.size:
            return 0
        with self._lock:
            return self._available(position, limit)

    def _available(self, position: int, limit: int) -> int:
        total = 0
        i = bisect.bisect_right(self._starts, position) - 1
        while i < len(self.chunks) and total < limit:
            c = self.chunks[i]
            if c.edge <= position + total:
                break
            total = c.edge - position
            if not c.done:
                break
            i += 1
        return min(total, limit)

    @property
    def done_bytes(self) -> int:
        with self._lock:
            return sum(c.filled for c in self.chunks)

    @property
    def complete(self) -> bool:
        return all(c.done for c in self.chunks)

    def next_after(self, chunk: Chunk) -> Chunk | None:
        i = bisect.bisect_right(self._starts, chunk.start)
        return self.chunks[i] if i < len(self.chunks) else None

    def release(self, owner: object) -> None:
        """Forget what ``owner`` held: its request ended."""
        for c in self.chunks:
            if c.owner == owner:
                c.owner = None

    # -- choosing work ------------------------------------------------------

    def split(self, chunk: Chunk, at: int) -> Chunk:
        """Cut ``chunk`` at ``at``; the back part is a new idle chunk."""
        assert chunk.edge < at < chunk.stop, (chunk, at)
        back = Chunk(at, chunk.stop)
        with self._lock:
            chunk.stop = at
            i = bisect.bisect_right(self._starts, chunk.start)
            self.chunks.insert(i, back)
            self._starts.insert(i, at)
        return back

    def claim(
        self, owner: object, urgent: Iterable[int], waiting: Iterable[int], reading: Iterable[int]
    ) -> Chunk | None:
        """Pick the chunk ``owner`` fetches next and mark it owned; None if there is none.

        ``urgent``: positions readers have been blocked on for too long, oldest first;
        ``waiting``: positions readers are blocked on; ``reading``: every reader's position.
        """
        chunk = (
            self._for_demand(urgent, pre_empt=True)
            or self._for_demand(waiting, pre_empt=False)
            or self._read_ahead(reading)
            or next((c for c in self.chunks if c.idle), None)
            or self._steal()
        )
        if chunk is not None:
            chunk.owner = owner
        return chunk

    def _for_demand(self, positions: Iterable[int], pre_empt: bool) -> Chunk | None:
        for position in positions:
            found = self._demand_chunk(position, pre_empt)
            if found is not None:
                c, split = found
                return self.split(c, position) if split else c
        return None

    def can_cut_in(self, position: int) -> bool:
        """Whether a connection freed for a reader blocked at ``position`` would fetch from there.
        A connection that stops its request for nothing only pays the CDN for bytes again."""
        return self._demand_chunk(position, pre_empt=True) is not None

    def _demand_chunk(self, position: int, pre_empt: bool) -> tuple[Chunk, bool] | None:
        """The chunk a reader at ``position`` waits for, and whether it is cut there first: when
        the position lies well past the chunk's edge, and leaves a piece worth a request after
        it. None when its bytes are there, or another connection has the chunk and cannot be
        cut (not ``pre_empt``, or too close to the chunk's end)."""
        if not 0 <= position < self.size:
            return None
        c = self.chunk_at(position)
        if c.done or position < c.edge or not (pre_empt or c.idle):
            return None
        if position - c.edge >= SPLIT_MIN and c.stop - position >= SPLIT_MIN // 2:
            return c, True
        return (c, False) if c.owner is None else None

    def _read_ahead(self, reading: Iterable[int]) -> Chunk | None:
        """The first idle chunk ahead of the reader with the least fetched or in flight before
        it. Connections spread evenly over the readers: Ollama reads a blob as up to 16 parts at
        once, and a reader served first-come (the first in the list taking every spare
        connection) finished its part seconds before the last one did, which the pull waits for."""
        best: tuple[int, Chunk] | None = None
        for position in reading:
            if not 0 <= position < self.size:
                continue
            i = bisect.bisect_right(self._starts, position)  # the chunk after the reader's own
            while i < len(self.chunks) and self.chunks[i].start - position < READ_AHEAD:
                c = self.chunks[i]
                if c.idle:
                    if best is None or c.start - position < best[0]:
                        best = (c.start - position, c)
                    break
                i += 1
        return best[1] if best else None

    def _steal(self) -> Chunk | None:
        """Split the in-flight chunk with most bytes left; its back half is taken."""
        busy = [c for c in self.chunks if c.owner is not None and not c.done]
        if not busy:
            return None
        c = max(busy, key=lambda c: c.stop - c.edge)
        left = c.stop - c.edge
        if left < 2 * STEAL_MIN:
            return None
        return self.split(c, c.edge + left // 2)
