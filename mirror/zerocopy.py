"""How response bytes reach a plain-TCP socket: blob bytes by ``sendfile(2)``, and a small
response's head and body in one write.

uvicorn offers ASGI apps no zero-copy extension, and uvloop has no ``loop.sendfile``, so
each served byte would be read into Python and copied out again: on two cores, that copy
is what a warm blob or a ten-client fill costs. Plain-TCP connections get ASGI's zero-copy
extension here (``scope["extensions"]["http.response.zerocopysend"]``); a response sends::

    {"type": "http.response.zerocopysend", "file": f, "offset": o, "count": n, "more_body": True}

where ``f`` has a ``fileno()``, and the kernel moves the bytes. When the send returns,
``message["sent"]`` holds the bytes that reached the socket (the access log counts those). TLS connections (transparent mode) keep the copying path:
their bytes must pass through the TLS layer in user space.

uvicorn also writes a response's head and its body with a ``send()`` each. For a small
response (a manifest, an error) the head is held until the body joins it: one system call
instead of two, about 8% more manifest requests per second.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable
from typing import Any

from starlette.types import Message, Send

from .fds import SharedFd, in_thread

EXTENSION = "http.response.zerocopysend"  # the ASGI zero-copy extension's message and scope key
DRAIN_POLL = 0.002  # seconds between checks that the transport sent what it had queued
COUNT_WAIT = 1.0  # seconds a cancelled send waits for its sendfile call to return, to count its bytes
SMALL = 64 << 10  # bytes of body up to which the head waits for it


def supported(transport: asyncio.BaseTransport) -> bool:
    """Plain TCP: the bytes may skip user space (asked once per connection)."""
    return transport.get_extra_info("sslcontext") is None and transport.get_extra_info("socket") is not None


def install(cycle: Any) -> None:
    """Offer the extension to the app behind uvicorn's request ``cycle`` (on a ``supported``
    connection). Called before the app task first runs, so the app sees the wrapped send."""
    send: Send = cycle.send
    writes = cycle.transport = _HeadHeld(cycle.transport)

    async def send_or_sendfile(message: Message) -> None:
        kind = message["type"]
        if kind == EXTENSION:
            writes.flush()  # the head first: sendfile bypasses the transport
            await _sendfile(cycle, send, message)
            return
        if kind == "http.response.start" and _small(message):
            writes.hold_next = True
        await send(message)
        if kind == "http.response.body" and not message.get("more_body", False):
            writes.flush()  # HEAD, 204, 304: uvicorn wrote no body for the head to join

    cycle.scope.setdefault("extensions", {})[EXTENSION] = {}
    cycle.send = send_or_sendfile


def _small(message: Message) -> bool:
    """A body of known, small length: it follows the head at once (a blob's may wait for a fill)."""
    for key, value in message.get("headers", ()):
        if key.lower() == b"content-length":
            return value.isdigit() and int(value) <= SMALL
    return False


class _HeadHeld:
    """uvicorn's transport for one request, holding the head back for the body's write.

    Whatever ends the response goes through ``flush`` or ``close`` first, so the head is
    never lost or overtaken."""

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self.hold_next = False
        self._held: bytes | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def write(self, data: bytes) -> None:
        if self.hold_next:
            self.hold_next, self._held = False, data
            return
        if self._held is not None:
            data, self._held = self._held + data, None
        self._transport.write(data)

    def flush(self) -> None:
        if self._held is not None:
            data, self._held = self._held, None
            if not self._transport.is_closing():  # a client gone: nothing to send it to
                self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()


async def _sendfile(cycle: Any, send: Send, message: Message) -> None:
    """Send ``count`` bytes of ``file`` from ``offset``, then let uvicorn account for them.

    ``message["sent"]`` tells the caller how many bytes reached the socket: fewer than ``count``
    only when the client left, and then the response is over (uvicorn's later sends do nothing)."""
    count, more_body = message["count"], message.get("more_body", False)
    message["sent"] = 0
    if cycle.disconnected:  # gone before the head went out (a held head): nothing to send, nothing wrong
        return
    if not cycle.response_started or cycle.response_complete or cycle.chunked_encoding:
        raise RuntimeError(f"{EXTENSION} needs a started response with a Content-Length")
    if count > cycle.expected_content_length:
        raise RuntimeError("Response content longer than Content-Length")
    if not await _drained(cycle):
        _client_left(cycle)
        return
    if count:
        sent = await _send_all(cycle, message["file"].fileno(), message.get("offset") or 0, count, message)
        if sent < count:
            _client_left(cycle)
            return
        cycle.expected_content_length -= count
    await send({"type": "http.response.body", "body": b"", "more_body": more_body})


def _client_left(cycle: Any) -> None:
    """The connection is going (the client hung up, or closed its side after the headers, as
    Ollama's resolving GET does): what is left of the response is sent nowhere, quietly, as
    uvicorn does once it has seen the connection lost."""
    cycle.disconnected = True


async def _drained(cycle: Any) -> bool:
    """Wait until bytes queued in the transport (headers, a part header) reached the socket,
    so ours cannot overtake them; False when the client left meanwhile."""
    while cycle.transport.get_write_buffer_size() and not cycle.disconnected and not cycle.transport.is_closing():
        await asyncio.sleep(DRAIN_POLL)
    return not cycle.disconnected and not cycle.transport.is_closing()


async def _send_all(cycle: Any, file_fd: int, offset: int, count: int, message: Message) -> int:
    """sendfile from a worker thread, on duplicates of the socket's and the file's descriptors.

    The duplicates are ours: the transport may close the socket and the app its file at any
    moment (a client hanging up cancels us), and a job a thread has taken cannot be stopped, so
    each number stays open until the last system call on it has returned (``fds``). The event
    loop's watchers belong to the transport; ours wait on the duplicate. Returns the bytes sent;
    fewer than ``count`` only when the client went away. ``message["sent"]`` grows as they go, and
    counts the last call's bytes even when the client's hang-up cancelled us while it ran (a client
    that leaves right after the last byte got the whole response, and is counted so)."""
    loop = asyncio.get_running_loop()
    out = SharedFd.dup(cycle.transport.get_extra_info("socket").fileno())
    try:
        source = SharedFd.dup(file_fd)
    except BaseException:
        out.close()
        raise
    sent = 0
    try:
        while sent < count and not cycle.disconnected:
            at, left = offset + sent, count - sent
            try:
                # In a worker thread: the kernel's copy then runs beside the event loop, not on it.
                n = await _counted(in_thread(lambda sock, src: os.sendfile(sock, src, at, left), out, source),
                                   message)
            except BlockingIOError:
                await _writable(loop, out.fileno())
                continue
            except (BrokenPipeError, ConnectionError):
                break
            if n == 0:
                raise OSError(f"file ended {count - sent} bytes early at offset {offset + sent}")
            sent += n
    finally:
        out.close()
        source.close()
    return sent


async def _counted(call: Awaitable[int], message: Message) -> int:
    """``call``'s bytes, added to ``message["sent"]``; when we are cancelled meanwhile, they are
    still added once the thread returns (a non-blocking sendfile returns at once)."""
    job = asyncio.ensure_future(call)
    try:
        n = await asyncio.shield(job)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            message["sent"] += await asyncio.wait_for(job, COUNT_WAIT)
        raise
    message["sent"] += n
    return n


async def _writable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    ready = loop.create_future()
    loop.add_writer(fd, lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_writer(fd)
