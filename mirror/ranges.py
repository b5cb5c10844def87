"""Range header text to byte spans (RFC 9110 section 14).

Spans are half-open ``(start, stop)`` pairs. The parser is pure: it raises
``RangeInvalid`` (400) for text it cannot read and ``RangeNotSatisfiable`` (416)
when no span overlaps the blob, and the edge turns those into responses.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import RangeInvalid, RangeNotSatisfiable

MAX_RANGES = 32  # more than any real client sends; bounds the work per request


@dataclass(frozen=True, slots=True)
class Span:
    start: int
    stop: int  # exclusive

    @property
    def length(self) -> int:
        return self.stop - self.start

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.stop - 1}/{size}"


def parse_range(header: str, size: int) -> list[Span] | None:
    """The spans a ``Range`` header asks of a blob of ``size`` bytes, in request order; None when
    the header is ignored: ranges adding up to more than the blob (overlapping ones, say 32 times
    ``0-``) would make one small request cost many blobs, and RFC 9110 section 14.2 lets a server
    ignore them and send the whole blob once."""
    unit, sep, specs = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        raise RangeInvalid(f"malformed Range header {header[:100]!r}: expected bytes=start-end")
    items = [item.strip() for item in specs.split(",")]
    if len(items) > MAX_RANGES:
        raise RangeInvalid(f"too many ranges in Range header (at most {MAX_RANGES})")
    spans = [span for item in items if (span := _parse_one(item, size, header)) is not None]
    if not spans:
        raise RangeNotSatisfiable(size)
    if len(spans) > 1 and sum(span.length for span in spans) > size:
        return None
    return spans


def _parse_one(item: str, size: int, header: str) -> Span | None:
    first, dash, last = item.partition("-")
    first, last = first.strip(), last.strip()
    if not dash or not _digits(first, allow_empty=True) or not _digits(last, allow_empty=True):
        raise RangeInvalid(f"malformed Range header {header[:100]!r}")
    if not first:  # suffix form: the last N bytes
        if not last:
            raise RangeInvalid(f"malformed Range header {header[:100]!r}")
        n = int(last)
        return Span(max(size - n, 0), size) if n > 0 and size > 0 else None
    start = int(first)
    if last and int(last) < start:
        raise RangeInvalid(f"malformed Range header {header[:100]!r}: end before start")
    if start >= size:
        return None
    stop = size if not last else min(int(last) + 1, size)
    return Span(start, stop)


def _digits(text: str, allow_empty: bool) -> bool:
    return (allow_empty and text == "") or (text.isascii() and text.isdigit() and len(text) <= 19)
