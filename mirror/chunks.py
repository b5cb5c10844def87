"""The chunk map of one blob being filled, and which chunk a free connection takes next.

Pure data: no I/O, no awaits. The blob ``[0, size)`` is covered by contiguous
chunks; each records how many bytes from its start are on disk (``filled``) and
which connection, if any, is fetching it (``owner``). That one number per chunk
is all that readers, the hasher and resume-after-restart need.

Choosing the next chunk (``ChunkMap.claim``), in order:

1. demand: the chunk holding a position a reader is blocked on, oldest wait
   first. If that position lies well past the chunk's filled edge, the chunk is
   split there, so an Ollama part that starts mid-chunk gets bytes at once;
2. read-ahead: the chunk after a reader's position;
3. spread: the longest run of untouched chunks, entered at its start when no
   connection is streaming into it, otherwise at its middle (aria2's split), so
   a handful of long streams cover the blob without reconnecting per chunk;
4. steal: at the tail, the back half of the in-flight chunk with most bytes left,
   so the last megabytes do not trickle in over one connection.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass

SPLIT_MIN = 1 << 20  # never create a piece smaller than this by splitting


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
        return self.chunks[bisect.bisect_right(self._starts, position) - 1]

    def available(self, position: int, limit: int) -> int:
        """How many bytes from ``position`` are on disk, contiguously (at most ``limit``)."""
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
        return sum(c.filled for c in self.chunks)

    @property
    def complete(self) -> bool:
        return all(c.done for c in self.chunks)

    def next_after(self, chunk: Chunk) -> Chunk | None:
        i = bisect.bisect_right(self._starts, chunk.start)
        return self.chunks[i] if i < len(self.chunks) else None

    def idle_run_end(self, chunk: Chunk) -> int:
        """End of the run of idle chunks that follows ``chunk``: how far one request may reach."""
        i = bisect.bisect_right(self._starts, chunk.start)
        stop = chunk.stop
        while i < len(self.chunks) and self.chunks[i].idle and self.chunks[i].filled == 0:
            stop = self.chunks[i].stop
            i += 1
        return stop

    # -- choosing work ------------------------------------------------------

    def split(self, chunk: Chunk, at: int) -> Chunk:
        """Cut ``chunk`` at ``at``; the back part is a new idle chunk."""
        assert chunk.edge < at < chunk.stop, (chunk, at)
        back = Chunk(at, chunk.stop)
        chunk.stop = at
        i = bisect.bisect_right(self._starts, chunk.start)
        self.chunks.insert(i, back)
        self._starts.insert(i, at)
        return back

    def claim(self, owner: object, waiting: Iterable[int], reading: Iterable[int]) -> Chunk | None:
        """Pick the chunk ``owner`` fetches next and mark it owned; None if there is none.

        ``waiting``: positions readers are blocked on, oldest first.
        ``reading``: positions of every active reader (for read-ahead).
        """
        chunk = self._for_demand(waiting) or self._read_ahead(reading) or self._spread() or self._steal()
        if chunk is not None:
            chunk.owner = owner
        return chunk

    def _for_demand(self, waiting: Iterable[int]) -> Chunk | None:
        for position in waiting:
            if not 0 <= position < self.size:
                continue
            c = self.chunk_at(position)
            if c.done or position < c.edge:
                continue
            if position - c.edge >= SPLIT_MIN and c.stop - position >= SPLIT_MIN // 2:
                return self.split(c, position)
            if c.owner is None:
                return c
        return None

    def _read_ahead(self, reading: Iterable[int]) -> Chunk | None:
        for position in reading:
            if not 0 <= position < self.size:
                continue
            nxt = self.next_after(self.chunk_at(position))
            if nxt is not None and nxt.idle:
                return nxt
        return None

    def _spread(self) -> Chunk | None:
        best: tuple[int, int] | None = None  # (length in chunks, index of first)
        i = 0
        while i < len(self.chunks):
            if not self.chunks[i].idle:
                i += 1
                continue
            j = i
            while j < len(self.chunks) and self.chunks[j].idle:
                j += 1
            if best is None or j - i > best[0]:
                best = (j - i, i)
            i = j
        if best is None:
            return None
        length, first = best
        fed = first > 0 and self.chunks[first - 1].owner is not None
        return self.chunks[first + length // 2] if fed and length > 1 else self.chunks[first]

    def _steal(self) -> Chunk | None:
        busy = [c for c in self.chunks if c.owner is not None and not c.done]
        if not busy:
            return None
        c = max(busy, key=lambda c: c.stop - c.edge)
        left = c.stop - c.edge
        if left < 2 * SPLIT_MIN:
            return None
        return self.split(c, c.edge + left // 2)
