"""Transparent mode: stock model names through ``HTTPS_PROXY`` (CONNECT) or a LAN DNS override.

For a host the mirror answers for (a mirrored registry, or a CDN one of them redirected
to), the TLS is ours: the decrypted connection is handed to the same uvicorn protocol the
plain listener uses, so the app sees ``Host: registry.ollama.ai`` over https and serves it
from the cache. Hosts on the tunnel allow list are passed through byte for byte; any other
CONNECT gets 403. It is never an open proxy, and no certificate is minted for a host it
does not answer for.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from .access import IPNetwork, in_networks
from .ca import NotIntercepted, ServerIdentities

log = logging.getLogger("mirror.proxy")

MAX_HEAD = 16 << 10  # a CONNECT request is one short line and a few headers
HEAD_TIMEOUT = 10.0  # seconds to send the CONNECT head: slow-loris clients are dropped
HANDSHAKE_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0
_CONNECT_TARGET = re.compile(r"^(?:\[([0-9a-fA-F:.]+)\]|([A-Za-z0-9.-]+)):(\d{1,5})$")

Decision = Literal["intercept", "tunnel", "refuse"]
ProtocolFactory = Callable[[], asyncio.Protocol]


@dataclass
class Policy:
    """Which CONNECT targets are answered by us, tunnelled, or refused."""

    answers_for: Callable[[str], bool]  # mirrored registries and the CDNs they redirect to
    tunnel_hosts: set[str]  # "host" (port 443) or "host:port"
    clients: Sequence[IPNetwork] = ()  # --allow-clients: who may use the proxy at all (empty: anyone)

    def admits(self, peer: str) -> bool:
        return not self.clients or in_networks(peer, self.clients)

    def decide(self, host: str, port: int) -> Decision:
        host = host.lower().rstrip(".")
        if self.answers_for(f"{host}:{port}") or (port == 443 and self.answers_for(host)):
            return "intercept"
        if f"{host}:{port}" in self.tunnel_hosts or (port == 443 and host in self.tunnel_hosts):
            return "tunnel"
        return "refuse"


class ProxyProtocol(asyncio.Protocol):
    """One client connection to the proxy port: read the CONNECT head, then intercept,
    tunnel or refuse. Plain protocol callbacks, so the socket can be handed over whole."""

    def __init__(self, policy: Policy, identities: ServerIdentities, make_http: ProtocolFactory) -> None:
        self._policy, self._identities, self._make_http = policy, identities, make_http
        self._head = bytearray()
        self._task: asyncio.Task[None] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses
        self._timer = asyncio.get_running_loop().call_later(HEAD_TIMEOUT, self._too_slow)

    def _too_slow(self) -> None:
        self._reply(408, "the CONNECT request did not arrive in time")

    def data_received(self, data: bytes) -> None:
        if self._task is not None:
            self._head += data  # bytes before our answer: kept, and refused below
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > MAX_HEAD:
                self._reply(431, "request head too large")
            return
        self._timer.cancel()
        assert self.transport is not None
        self.transport.pause_reading()
        head = bytes(self._head[:end])
        del self._head[: end + 4]
        self._task = asyncio.get_running_loop().create_task(self._guarded(head))

    def connection_lost(self, exc: Exception | None) -> None:
        self._timer.cancel()

    async def _guarded(self, head: bytes) -> None:
        try:
            await self._handle(head)
        except Exception as exc:  # a bug must not leave the connection hanging, nor go unseen
            log.error("proxy failed client=%s: %r", self._peer(), exc, exc_info=exc)
            if self.transport is not None:
                self.transport.abort()

    async def _handle(self, head: bytes) -> None:
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        method, _, rest = line.partition(" ")
        target, _, version = rest.partition(" ")
        if not version.startswith("HTTP/1."):
            self._reply(400, "not an HTTP/1.x request")
            return
        if method != "CONNECT":
            self._reply(405, "this proxy only accepts CONNECT (set HTTPS_PROXY, not HTTP_PROXY, to it)")
            return
        match = _CONNECT_TARGET.match(target)
        if match is None or not 0 < int(match[3]) < 65536:
            self._reply(400, f"CONNECT target {target[:100]!r} is not HOST:PORT")
            return
        host, port = match[1] or match[2], int(match[3])
        peer = self._peer().rpartition(":")[0]
        if not self._policy.admits(peer):
            log.warning("proxy refused client=%s reason=not in --allow-clients", peer)
            self._reply(403, "this client may not use the proxy")
            return
        decision = self._policy.decide(host, port)
        if decision == "refuse":
            log.warning("proxy refused CONNECT %s:%d client=%s: not a mirrored registry and not on the tunnel "
                        "allow list (--tunnel-allow)", host, port, self._peer())
            self._reply(403, f"{host}:{port} is neither mirrored nor on this proxy's tunnel allow list")
            return
        if self._head:
            self._reply(400, "bytes sent before the CONNECT was answered")
            return
        if decision == "intercept":
            await self._intercept(host, port)
        else:
            await self._tunnel(host, port)

    async def _intercept(self, host: str, port: int) -> None:
        transport = self.transport
        assert transport is not None
        try:
            context = await asyncio.to_thread(self._identities.context_for, host, port)
        except NotIntercepted:
            self._reply(403, f"{host} is not a host this mirror answers for")
            return
        transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        handover = _Handover()
        loop = asyncio.get_running_loop()
        try:
            tls = await loop.start_tls(transport, handover, context, server_side=True,
                                       ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            log.warning("proxy TLS handshake failed host=%s client=%s: %s (does the client trust the "
                        "mirror's CA? see `ollama-mirror ca export`)", host, self._peer(), exc or type(exc).__name__)
            transport.abort()
            return
        if tls is None:  # the client went away during the handshake
            return
        http = self._make_http()
        tls.set_protocol(http)
        http.connection_made(tls)
        handover.hand_to(http)

    async def _tunnel(self, host: str, port: int) -> None:
        client = self.transport
        assert client is not None
        loop = asyncio.get_running_loop()
        try:
            remote, remote_pipe = await asyncio.wait_for(loop.create_connection(_Pipe, host, port), CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            log.warning("proxy could not reach %s:%d for a tunnel: %s", host, port, exc)
            self._reply(502, f"cannot reach {host}:{port}")
            return
        log.info("proxy tunnel opened host=%s:%d client=%s", host, port, self._peer())
        client.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        client_pipe = _Pipe()
        client_pipe.link(remote)
        remote_pipe.link(client)
        client.set_protocol(client_pipe)
        client.resume_reading()

    def _reply(self, status: int, message: str) -> None:
        """An answer to the CONNECT itself, then close: the client sees why in plain text."""
        if self.transport is None or self.transport.is_closing():
            return
        reason = {400: "Bad Request", 403: "Forbidden", 405: "Method Not Allowed", 408: "Request Timeout",
                  431: "Request Header Fields Too Large", 502: "Bad Gateway"}[status]
        body = (message + "\n").encode()
        extra = "Allow: CONNECT\r\n" if status == 405 else ""
        self.transport.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
            f"{extra}Connection: close\r\n\r\n".encode() + body)
        self.transport.close()

    def _peer(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return f"{peer[0]}:{peer[1]}" if peer else "?:0"


class _Handover(asyncio.Protocol):
    """Holds what the TLS layer delivers between the handshake and the HTTP protocol taking
    over (a TLS 1.3 client sends its request right behind its Finished)."""

    def __init__(self) -> None:
        self._events: list[tuple[str, object]] = []

    def data_received(self, data: bytes) -> None:
        self._events.append(("data", data))

    def eof_received(self) -> bool:
        self._events.append(("eof", None))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._events.append(("lost", exc))

    def hand_to(self, protocol: asyncio.Protocol) -> None:
        for kind, value in self._events:
            if kind == "data":
                protocol.data_received(value)  # type: ignore[arg-type]
            elif kind == "eof":
                protocol.eof_received()
            else:
                protocol.connection_lost(value)  # type: ignore[arg-type]
        self._events.clear()


class _Pipe(asyncio.Protocol):
    """One direction of a tunnel: what arrives on ``own`` is written to ``peer``; when the peer
    cannot take more, ``own`` stops reading (backpressure both ways)."""

    def __init__(self) -> None:
        self.peer: asyncio.Transport | None = None
        self._early: list[bytes] = []  # before the link: a server that speaks first

    def link(self, peer: asyncio.Transport) -> None:
        self.peer = peer
        for data in self._early:
            peer.write(data)
        self._early.clear()

    def data_received(self, data: bytes) -> None:
        if self.peer is not None:
            self.peer.write(data)
        else:
            self._early.append(data)

    def eof_received(self) -> bool:
        if self.peer is not None and self.peer.can_write_eof():
            self.peer.write_eof()
        return True  # keep our side open until the peer closes

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None:
            self.peer.close()
