"""uvicorn's HTTP protocol with what it lacks: limits on the request head, and sendfile.

uvicorn closes idle keep-alive connections, but a client that sends its request head a
byte at a time (slow loris) holds a connection for ever, and an endless header is read
into memory. Each connection here must complete a request head within ``HEAD_TIMEOUT``
seconds of its start (or of the request's first byte), in at most ``MAX_HEAD`` bytes.
Plain-TCP requests also get the zero-copy extension of ``zerocopy``.
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from . import zerocopy

log = logging.getLogger("mirror.access")

HEAD_TIMEOUT = 15.0
MAX_HEAD = 64 << 10


def guarded_protocol(head_timeout: float) -> type[GuardedHttpProtocol]:
    return type("GuardedHttpProtocol", (GuardedHttpProtocol,), {"head_timeout": head_timeout})


class GuardedHttpProtocol(HttpToolsProtocol):
    head_timeout = HEAD_TIMEOUT  # a subclass per server sets the configured value
    via = ""  # how the connection reached us, for the app (request.state.via): "proxy" for HTTPS_PROXY clients

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._zero_copy = zerocopy.supported(transport)
        self._head_bytes = 0
        self._in_head = True
        self._head_started = self.loop.time()
        self._head_timer: asyncio.TimerHandle | None = self.loop.call_later(self.head_timeout, self._check_head)

    def data_received(self, data: bytes) -> None:
        if self._in_head:  # counted before parsing: a whole oversized head may come in one read
            end = data.find(b"\r\n\r\n")
            if self._head_bytes + (len(data) if end < 0 else end + 4) > MAX_HEAD:
                self._refuse(431, "Request Header Fields Too Large", f"request head over {MAX_HEAD} bytes")
                return
        super().data_received(data)
        if self._in_head and not self.transport.is_closing():  # all of it was head: no head end yet
            self._head_bytes += len(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self._in_head:  # the next request on a kept-alive connection
            self._in_head, self._head_bytes = True, 0
            self._head_started = self.loop.time()
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(self.head_timeout, self._check_head)

    def on_headers_complete(self) -> None:
        self._in_head = False  # the timer, if armed, finds nothing to do (not re-armed per request)
        previous = self.cycle
        super().on_headers_complete()
        if self.cycle is None or self.cycle is previous:
            return
        if self.via:
            self.cycle.scope.setdefault("state", {})["via"] = self.via
        if self._zero_copy:
            zerocopy.install(self.cycle)  # before the app's task first runs

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        super().connection_lost(exc)

    def _cancel_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _check_head(self) -> None:
        """One timer per connection, moved on lazily: arming one per request cost 3% of a manifest GET."""
        self._head_timer = None
        if not self._in_head or self.transport.is_closing():
            return  # armed again when the next request begins
        left = self._head_started + self.head_timeout - self.loop.time()
        if left > 0:
            self._head_timer = self.loop.call_later(left, self._check_head)
        elif self._head_bytes:  # a connection that sent nothing is just idle: no line for it
            self._refuse(408, "Request Timeout", f"request head incomplete after {self.head_timeout:g}s")
        else:
            self.transport.close()

    def _refuse(self, status: int, reason: str, why: str) -> None:
        peer = self.transport.get_extra_info("peername") or ("?",)
        log.warning("connection closed client=%s status=%d reason=%s", peer[0], status, why)
        self._cancel_timer()
        self._in_head = False
        self.transport.write(f"HTTP/1.1 {status} {reason}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
        self.transport.close()
