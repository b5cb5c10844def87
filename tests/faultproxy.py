"""A fault-injecting HTTP proxy for the tests, between the mirror and its fake upstream.

It forwards each request to the target (one request per connection: it answers with
``Connection: close``) and does to the response what the next queued fault says:

- ``reset``: forward ``after`` body bytes, then reset both connections
- ``stall``: forward ``after`` body bytes, then hold the connection open, sending nothing
- ``trickle``: forward the body at ``rate`` bytes per second
- ``status``: answer ``status`` itself (with ``headers``, e.g. Retry-After), never reaching the target
- ``expired``: answer 403 as an object store does for an expired presigned URL
- ``short``: forward the head, then ``after`` body bytes fewer than Content-Length, then close
- ``corrupt``: flip one byte at body offset ``after``

A fault applies to ``times`` responses (-1: every one until cleared). Loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from dataclasses import dataclass, field

STALL_SECONDS = 3600.0
PIECE = 64 << 10


@dataclass
class ProxyFault:
    kind: str
    after: int = 0
    status: int = 503
    headers: dict[str, str] = field(default_factory=dict)
    rate: float = 200_000.0
    times: int = 1


class FaultProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.faults: list[ProxyFault] = []
        self.struck: list[str] = []  # the faults applied, in order
        self.requests = 0
        self._lock = threading.Lock()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._stopping: asyncio.Event | None = None

    def url(self, host: str = "localhost") -> str:
        return f"http://{host}:{self.port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(10)
        return self

    def stop(self) -> None:
        async def close() -> None:
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def inject(self, fault: ProxyFault) -> None:
        with self._lock:
            self.faults.append(fault)

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def _next_fault(self) -> ProxyFault | None:
        with self._lock:
            self.requests += 1
            for fault in self.faults:
                if fault.times != 0:
                    fault.times -= 1 if fault.times > 0 else 0
                    self.struck.append(fault.kind)
                    return fault
        return None

    async def _serve(self) -> None:
        self._server = await asyncio.start_server(self._handle, sock=self._sock)

    async def _handle(self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        upstream: asyncio.StreamWriter | None = None
        try:
            head = await client_reader.readuntil(b"\r\n\r\n")
            fault = self._next_fault()
            if fault is not None and fault.kind in ("status", "expired"):
                await self._answer(client, fault)
                return
            reader, upstream = await asyncio.open_connection(*self.target)
            upstream.write(_with_close(head))
            await upstream.drain()
            response_head = await reader.readuntil(b"\r\n\r\n")
            length = _content_length(response_head)
            client.write(_with_close(response_head))
            await self._body(reader, client, length, fault)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            for writer in (client, upstream):
                if writer is not None:
                    with contextlib.suppress(Exception):
                        writer.close()

    async def _answer(self, client: asyncio.StreamWriter, fault: ProxyFault) -> None:
        if fault.kind == "expired":
            status, body = 403, b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>"
        else:
            status, body = fault.status, b"injected failure"
        extra = "".join(f"{k}: {v}\r\n" for k, v in fault.headers.items())
        client.write(f"HTTP/1.1 {status} Injected\r\nContent-Length: {len(body)}\r\n{extra}"
                     f"Connection: close\r\n\r\n".encode() + body)
        await client.drain()

    async def _body(self, reader: asyncio.StreamReader, client: asyncio.StreamWriter, length: int | None,
                    fault: ProxyFault | None) -> None:
        kind = fault.kind if fault else ""
        limit = length if length is not None else 1 << 62
        if kind == "short" and length is not None:
            limit = max(length - max(fault.after, 1), 0)  # type: ignore[union-attr]
        strike = fault.after if kind in ("reset", "stall", "corrupt") else None  # type: ignore[union-attr]
        sent = 0
        while sent < limit:
            want = min(PIECE, limit - sent)
            if strike is not None and strike > sent:
                want = min(want, strike - sent)
            if strike is not None and strike == sent:
                strike = None
                if kind == "reset":
                    _reset(client)
                    return
                if kind == "stall":
                    await asyncio.sleep(STALL_SECONDS)
                    return
            data = await reader.read(want)
            if not data:
                break
            if kind == "corrupt" and fault is not None and sent <= fault.after < sent + len(data):
                i = fault.after - sent
                data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]
            client.write(data)
            await client.drain()
            sent += len(data)
            if kind == "trickle" and fault is not None:
                await asyncio.sleep(len(data) / fault.rate)
        await client.drain()


def _with_close(head: bytes) -> bytes:
    lines = [line for line in head[:-4].split(b"\r\n") if not line.lower().startswith(b"connection:")]
    return b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n"


def _content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            return int(value)
    return None


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST, as a dropped connection looks to the other side."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    writer.transport.abort()


def wait_until(predicate, timeout: float = 30.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False
