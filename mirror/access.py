"""Who may use the mirror: allowed client networks (CIDR) and optional tokens, checked first.

A token is presented as ``Authorization: Bearer <token>`` or as the password of Basic auth
(what docker, skopeo and curl -u send after a Basic challenge). Ollama's own client cannot
send a static token, so for Ollama machines restrict by network. ``/`` stays open: it says
only that the mirror runs.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import logging
from collections.abc import Sequence

from cachetools import TTLCache
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import Denied, MirrorError, Unauthorized
from .responses import registry_error

log = logging.getLogger("mirror.access")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
OPEN_PATHS = frozenset({"/"})


class AccessControl:
    def __init__(self, app: ASGIApp, networks: Sequence[IPNetwork] = (), tokens: frozenset[str] = frozenset()) -> None:
        self.app, self._networks, self._tokens = app, tuple(networks), tokens
        self._warned: TTLCache[str, bool] = TTLCache(maxsize=1024, ttl=60)  # one log line a minute per client

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        try:
            self._check(scope)
        except MirrorError as exc:
            headers = {"WWW-Authenticate": 'Basic realm="ollama-mirror"'} if isinstance(exc, Unauthorized) else None
            await registry_error(exc, headers)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _check(self, scope: Scope) -> None:
        client = (scope.get("client") or ("",))[0]
        if self._networks and not self._allowed(client):
            self._warn(client, f"refused client={client} reason=not in --allow-clients")
            raise Denied(f"{client} may not use this mirror (not in its allowed networks)")
        if self._tokens and not self._token_ok(scope):
            self._warn(client, f"refused client={client} path={scope['path']} reason=no valid token")
            raise Unauthorized("this mirror needs a token: Authorization: Bearer <token>, or Basic with it as password")

    def _allowed(self, client: str) -> bool:
        try:
            address = ipaddress.ip_address(client)
        except ValueError:
            return False
        return any(address in network for network in self._networks)

    def _token_ok(self, scope: Scope) -> bool:
        value = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), "")
        scheme, _, credentials = value.partition(" ")
        if scheme.lower() == "basic":
            try:
                credentials = base64.b64decode(credentials, validate=True).decode("utf-8").partition(":")[2]
            except (binascii.Error, UnicodeDecodeError):
                return False
        elif scheme.lower() != "bearer":
            return False
        return any(hmac.compare_digest(credentials.encode(), token.encode()) for token in self._tokens)

    def _warn(self, client: str, line: str) -> None:
        if client not in self._warned:
            self._warned[client] = True
            log.warning(line)
