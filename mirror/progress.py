"""Progress for long CLI work: a bar with bytes, rate and ETA on a terminal, log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

log = logging.getLogger("mirror.progress")

LOG_EVERY = 5.0  # seconds between progress lines when stderr is not a terminal
DRAW_EVERY = 0.1


def human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class Progress:
    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.label, self.total, self.done = label, total, 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.started = self._last = time.monotonic()

    def set(self, done: int) -> None:
        self.advance(done - self.done)

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= (DRAW_EVERY if self.tty else LOG_EVERY):
            self._last = now
            self._show(final=False)

    def finish(self, outcome: str = "done") -> None:
        self._show(final=True, outcome=outcome)

    def _show(self, final: bool, outcome: str = "") -> None:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = self.done / elapsed
        if self.tty:
            fraction = self.done / self.total if self.total else 1.0
            bar = "█" * int(fraction * 24)
            eta = (self.total - self.done) / rate if rate and not final else 0
            tail = outcome if final else f"ETA {eta:.0f}s"
            self.stream.write(f"\r{self.label[:40]:40} {fraction:4.0%} ▕{bar:24}▏ {human(self.done)}/"
                              f"{human(self.total)} {human(rate)}/s {tail}\x1b[K")
            if final:
                self.stream.write("\n")
            self.stream.flush()
        else:
            log.info("%s %s bytes=%d/%d mb_s=%.1f", self.label, outcome or "progress", self.done, self.total,
                     rate / 1e6)
