"""Accepting connections in batches, on any event loop.

uvloop's libuv (1.45 and later) accepts one connection per turn of the event loop. Under
load a turn serves hundreds of ready connections, so new ones wait in the kernel's queue:
measured here, 300 new connections took 3.4 s to be accepted while the server answered
4,500 requests/s, and their first requests timed out in the load generator. An ``Acceptor``
takes up to ``BATCH`` connections each time the listening socket is ready, and hands each
to ``loop.connect_accepted_socket``: a new client waits no longer than a kept-alive one.

It has the two methods uvicorn's shutdown calls on its servers: ``close`` and ``wait_closed``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from collections.abc import Callable

log = logging.getLogger("mirror")

BATCH = 256  # connections accepted per readiness; the rest wait one turn
OUT_OF_DESCRIPTORS_PAUSE = 1.0  # seconds without accepting when the process is out of descriptors
_TRANSIENT = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM}  # the client gave up, or a firewall said no
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class Acceptor:
    def __init__(self, sock: socket.socket, protocol_factory: Callable[[], asyncio.BaseProtocol], *,
                 ssl_context: ssl.SSLContext | None = None, ssl_handshake_timeout: float | None = None) -> None:
        self._sock, self._factory = sock, protocol_factory
        self._ssl, self._handshake_timeout = ssl_context, ssl_handshake_timeout
        self._loop = asyncio.get_running_loop()
        self._connecting: set[asyncio.Task[object]] = set()
        self._closed = False
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self._accept_ready)

    def close(self) -> None:
        """Stop accepting and close the listening socket; connections already made live on."""
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()

    async def wait_closed(self) -> None:
        """Connections still in their TLS handshake are cut, like asyncio's server does."""
        for task in list(self._connecting):
            task.cancel()
        await asyncio.gather(*self._connecting, return_exceptions=True)

    def _accept_ready(self) -> None:
        for _ in range(BATCH):
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _TRANSIENT:
                    continue
                if exc.errno in _OUT_OF_RESOURCES:
                    self._pause(exc)
                    return
                raise
            self._connect(conn)

    def _connect(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # responses go out as written
        task = self._loop.create_task(self._connected(conn))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    async def _connected(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, conn, ssl=self._ssl,
                                                     ssl_handshake_timeout=self._handshake_timeout)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError) as exc:
            conn.close()
            log.debug("connection dropped before it was made: %r", exc)

    def _pause(self, exc: OSError) -> None:
        """Out of descriptors: the socket stays readable, so wait instead of spinning on it."""
        log.warning("accept failed reason=%s; pausing new connections for %.0f s (raise LimitNOFILE?)",
                    exc.strerror, OUT_OF_DESCRIPTORS_PAUSE)
        self._loop.remove_reader(self._sock.fileno())
        self._loop.call_later(OUT_OF_DESCRIPTORS_PAUSE, self._resume)

    def _resume(self) -> None:
        if not self._closed:
            self._loop.add_reader(self._sock.fileno(), self._accept_ready)
