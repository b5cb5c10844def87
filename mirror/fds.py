"""Descriptors shared with worker threads, closed only once no thread can still use their number.

A descriptor number is handed out again by the next ``open`` or ``accept`` as soon as it is
closed. A job given to a worker thread (sendfile, pread, pwrite) cannot be stopped once a thread
has taken it: if the task awaiting it is cancelled (a client hung up) and its cleanup closes the
descriptor before the thread reaches its system call, the call lands on whatever took the number
next, another client's connection or a file of the store. Seen here: blob bytes in the middle of
another client's response, and a verified blob overwritten.

So every thread job holds the ``SharedFd``s it uses and gets their numbers as arguments
(``in_thread``), and ``SharedFd.close`` only marks the descriptor: the number is closed when the
owner has let go and the last job returned.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class SharedFd:
    """One open descriptor with an owner and the thread jobs using it."""

    __slots__ = ("_fd", "_users", "_closing", "_lock")

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._users = 0
        self._closing = False
        self._lock = threading.Lock()

    @classmethod
    def dup(cls, fd: int) -> SharedFd:
        """A descriptor of our own on what ``fd`` refers to: its owner may close ``fd`` any time."""
        return cls(os.dup(fd))

    def fileno(self) -> int:
        """The number, for the owner on the event loop (a thread job gets it as an argument)."""
        if self._closing:
            raise ValueError("descriptor already closed")
        return self._fd

    def duplicate(self) -> SharedFd:
        """A descriptor of the caller's own on the same file, made while this one is surely open
        (its owner may be closing it from another thread)."""
        with self._lock:
            if self._closing:
                raise ValueError("descriptor already closed")
            return SharedFd(os.dup(self._fd))

    @property
    def closed(self) -> bool:
        return self._closing

    def close(self) -> None:
        """The owner lets go; the number is closed now, or when the last running job returns."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            last = self._users == 0
        if last:
            os.close(self._fd)

    def _hold(self) -> int:
        with self._lock:
            if self._closing:
                raise ValueError("descriptor already closed")
            self._users += 1
            return self._fd

    def _release(self) -> None:
        with self._lock:
            self._users -= 1
            last = self._closing and self._users == 0
        if last:
            os.close(self._fd)


class _Job:
    """A call that either runs with its descriptors held, or is abandoned before it starts."""

    def __init__(self, func: Callable[..., T], held: list[SharedFd]) -> None:
        self._func, self._held = func, held
        self._state = "pending"  # -> "running" (the thread took it) or "abandoned" (its awaiter left first)
        self._lock = threading.Lock()

    def run(self) -> T:
        with self._lock:
            if self._state == "abandoned":
                raise asyncio.CancelledError()
            self._state = "running"
        try:
            return self._func(*(shared._fd for shared in self._held))
        finally:
            self._release()

    def abandon(self) -> None:
        """The awaiter was cancelled: a job no thread has started will never use its descriptors."""
        with self._lock:
            if self._state != "pending":
                return
            self._state = "abandoned"
        self._release()

    def _release(self) -> None:
        for shared in self._held:
            shared._release()


async def in_thread(func: Callable[..., T], *shared_fds: SharedFd) -> T:
    """``func(fd, ...)`` in a worker thread, with the numbers of ``shared_fds`` kept open until it
    returns, however the awaiting task ends. Raises ``ValueError`` at once if one is already closed."""
    held: list[SharedFd] = []
    try:
        for shared in shared_fds:
            shared._hold()
            held.append(shared)
    except BaseException:
        for shared in held:
            shared._release()
        raise
    job = _Job(func, held)
    try:
        return await asyncio.get_running_loop().run_in_executor(None, job.run)
    except asyncio.CancelledError:
        job.abandon()
        raise
