"""The event loop fills run on: a thread of its own, beside the loop that serves clients.

A fill's upstream reads (socket reads, HTTP parsing), its chunk scheduling and its thread hops for
writes and hashing are many small steps per megabyte. On the serving loop they made every other
client's request wait behind them (a cold manifest waited up to 0.74 s during an unthrottled
fill). Here they run on a loop of their own: the serving loop only follows the fills' progress,
and the kernel work of both (receiving, sendfile, writes, sha256, all outside the GIL) spreads
over the cores.

What crosses between the loops is small and explicit: a fill is started and cancelled through
``run_coroutine_threadsafe``; progress reaches readers through ``call_soon_threadsafe``
(``fill.py``); the chunk map is guarded by a lock (``chunks.py``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop  # the serving loop's kind, where installed (uvicorn[standard])
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class FillLoop:
    """One event loop in a daemon thread; started on first use, stopped by ``stop``."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                ready = threading.Event()
                self._loop = _new_loop()
                self._thread = threading.Thread(target=self._run, args=(ready,), name="fills", daemon=True)
                self._thread.start()
                ready.wait()
            return self._loop

    def _run(self, ready: threading.Event) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    async def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the fill loop and wait for it from the caller's loop."""
        return await asyncio.wrap_future(self.submit(coroutine))

    def stop(self) -> None:
        """Stop the loop and its thread (call when no fill runs any more)."""
        with self._lock:
            loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
