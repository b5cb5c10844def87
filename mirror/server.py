"""The running server: uvicorn on the plain listener, plus transparent mode's proxy and TLS listeners
and the admin listener.

All of them hand connections to the same uvicorn HTTP protocol and app, so a request reaches
the same routes whichever way it came; uvicorn's graceful shutdown covers them all.
``build_server`` is the one way to make it: ``serve`` runs what it returns, and so do the tests.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass

import uvicorn
from starlette.types import ASGIApp

from .acceptor import Acceptor
from .app import create_admin_app, create_app
from .ca import CertificateAuthority, ServerIdentities
from .config import Settings
from .intercept import HANDSHAKE_TIMEOUT, Policy, ProxyProtocol
from .protocol import guarded_protocol

log = logging.getLogger("mirror")
BACKLOG = 2048


def bind(address: tuple[str, int]) -> socket.socket:
    """A listening socket, bound now, so the log names the real port (port 0 in tests) and
    connections queue before uvicorn accepts."""
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def url_of(sock: socket.socket, scheme: str = "http") -> str:
    host, port = sock.getsockname()[:2]
    return f"{scheme}://{f'[{host}]' if sock.family == socket.AF_INET6 else host}:{port}"


class ListenError(OSError):
    """A listener could not be bound; ``flag`` names the setting, as the user typed it."""

    def __init__(self, flag: str, address: str, reason: str) -> None:
        super().__init__(f"cannot listen on {address} (--{flag}): {reason}")
        self.flag, self.address = flag, address


@dataclass
class Listeners:
    """The sockets the server accepts on, bound before it starts."""

    main: socket.socket
    proxy: socket.socket | None = None
    tls: socket.socket | None = None
    admin: socket.socket | None = None

    @classmethod
    def bind(cls, settings: Settings) -> Listeners:
        bound: list[socket.socket] = []

        def one(flag: str, address: str) -> socket.socket | None:
            if not address:
                return None
            host, _, port = address.rpartition(":")
            try:
                sock = bind((host.strip("[]"), int(port)))
            except OSError as exc:
                for sock in bound:
                    sock.close()
                raise ListenError(flag, address, exc.strerror or str(exc)) from exc
            bound.append(sock)
            return sock

        main = one("listen", settings.listen)
        assert main is not None
        return cls(main, one("proxy-listen", settings.proxy_listen), one("tls-listen", settings.tls_listen),
                   one("admin-listen", settings.admin_listen))

    def close(self) -> None:
        for sock in (self.main, self.proxy, self.tls, self.admin):
            if sock is not None:
                sock.close()


def build_server(settings: Settings, app: ASGIApp | None = None, listeners: Listeners | None = None) -> MirrorServer:
    """The mirror's server, its listeners bound: what ``serve`` runs, and what the tests run."""
    config = uvicorn.Config(
        app if app is not None else create_app(settings),
        http=guarded_protocol(settings.head_timeout),  # request heads must arrive in time and in bounds (slow loris)
        log_config=None,
        access_log=False,
        proxy_headers=False,  # the client address is the socket's: no header may claim another (--allow-clients)
        timeout_keep_alive=30,
        timeout_graceful_shutdown=10,
        h11_max_incomplete_event_size=64 * 1024,
    )
    return MirrorServer(config, settings, listeners or Listeners.bind(settings))


class MirrorServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, settings: Settings, listeners: Listeners) -> None:
        super().__init__(config)
        self._settings, self.listeners = settings, listeners
        self._proxy_sock, self._tls_sock, self._admin_sock = listeners.proxy, listeners.tls, listeners.admin

    @property
    def url(self) -> str:
        return url_of(self.listeners.main)

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        await super().serve(sockets=[self.listeners.main] if sockets is None else sockets)

    def run(self, sockets: list[socket.socket] | None = None) -> None:
        super().run(sockets=[self.listeners.main] if sockets is None else sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=[])  # the lifespan only: our acceptors take the connections
        if self.should_exit:
            return
        self.servers.extend(Acceptor(sock, self._http_protocol) for sock in sockets or [])
        if self._admin_sock is not None:
            await self._start_admin(self._admin_sock)
        if not (self._proxy_sock or self._tls_sock):
            return
        mirror = self.config.app.state.mirror
        identities = ServerIdentities(self._certificate_authority(mirror.layout.state / "ca"), mirror.answers_for,
                                      self._settings.tls_cert, self._settings.tls_key)
        if self._proxy_sock is not None:
            policy = Policy(mirror.answers_for, self._settings.tunnel_hosts, self._settings.client_networks)
            self.servers.append(Acceptor(self._proxy_sock, lambda: ProxyProtocol(policy, identities,
                                                                                 self._proxied_protocol)))
            log.info("proxy ready url=%s answers_for=%s tunnels=%s", url_of(self._proxy_sock),
                     ",".join(sorted(mirror.registries)), ",".join(sorted(self._settings.tunnel_hosts)) or "-")
        if self._tls_sock is not None:
            context = identities.sni_context(_tls_default_host(mirror.registries))
            self.servers.append(Acceptor(self._tls_sock, self._http_protocol, ssl_context=context,
                                         ssl_handshake_timeout=HANDSHAKE_TIMEOUT))
            log.info("tls ready url=%s answers_for=%s", url_of(self._tls_sock, "https"),
                     ",".join(sorted(mirror.registries)))

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Pause fills first: clients following a fill would otherwise hold the graceful
        shutdown open while the fill runs on, and a stop would take the full timeout."""
        mirror = getattr(self.config.app.state, "mirror", None)
        began = time.monotonic()
        if mirror is not None:
            fills = len(mirror.engine.active)
            await mirror.engine.close()
            log.info("stopping fills_paused=%d seconds=%.2f; closing connections", fills, time.monotonic() - began)
        await super().shutdown(sockets=sockets)
        log.info("stopped seconds=%.2f", time.monotonic() - began)

    async def _start_admin(self, sock: socket.socket) -> None:
        """The status page and /metrics on a listener of their own (e.g. 127.0.0.1 only)."""
        config = uvicorn.Config(create_admin_app(self.config.app), http=self.config.http, log_config=None,
                                access_log=False, timeout_keep_alive=self.config.timeout_keep_alive, lifespan="off")
        config.load()

        def admin_protocol() -> asyncio.Protocol:
            protocol: asyncio.Protocol = config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state, app_state=self.lifespan.state)
            return protocol

        self.servers.append(Acceptor(sock, admin_protocol))
        log.info("admin ready url=%s (status page and /metrics)", url_of(sock))

    def _http_protocol(self) -> asyncio.Protocol:
        """The protocol uvicorn gives its own connections, for ours: same app, same limits, and
        counted in its graceful shutdown."""
        protocol: asyncio.Protocol = self.config.http_protocol_class(  # type: ignore[call-arg]
            config=self.config, server_state=self.server_state, app_state=self.lifespan.state)
        return protocol

    def _proxied_protocol(self) -> asyncio.Protocol:
        """The same protocol, for a connection that came through the ``HTTPS_PROXY`` listener."""
        protocol = self._http_protocol()
        protocol.via = "proxy"  # type: ignore[attr-defined]
        return protocol

    def _certificate_authority(self, directory: object) -> CertificateAuthority | None:
        if self._settings.tls_cert is not None:
            return None  # the admin's certificate: no CA of ours is used
        ca = CertificateAuthority(directory)  # type: ignore[arg-type]
        if ca.init():
            log.warning("created a private CA at %s: clients must trust it; `ollama-mirror ca export` prints it "
                        "and how to install it", ca.cert_path)
        return ca


def _tls_default_host(registries: dict[str, object]) -> str:
    """The certificate for clients that send no SNI: Ollama's registry when mirrored."""
    if "registry.ollama.ai" in registries:
        return "registry.ollama.ai"
    names = [host for host in registries if ":" not in host]
    if not names:
        raise SystemExit("ollama-mirror: --tls-listen needs a mirrored registry host without a port (--registry)")
    return sorted(names)[0]
