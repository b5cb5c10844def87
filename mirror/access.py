"""Who may use the mirror: allowed client networks (CIDR), tokens, and Ollama machine keys.

- Tokens: ``Authorization: Bearer <token>``, or Basic with the token as password (what
  docker, skopeo and ``curl -u`` send after a Basic challenge).
- Ollama keys: the stock Ollama client answers a registry's Bearer challenge by signing a
  request to the challenge's realm with its own key (``~/.ollama/id_ed25519``). The mirror
  is that realm (``/token``): a request signed by a key listed in ``--keys-file`` (lines of
  ``id_ed25519.pub``) gets a short-lived token, so unchanged Ollama machines can pull and
  others cannot. The signature covers the URL with a fresh timestamp and a nonce, each
  nonce accepted once.

``/`` and ``/healthz`` stay open to anyone (they say only that the mirror runs); ``/token`` to
the allowed networks.

Changing the cache through Ollama's management API (``/api/pull``, ``/api/delete``) is a
separate permission, ``ManagePolicy``: the mirror's own host, an authenticated request, or the
``--manage-clients`` networks; the ``--admin-listen`` listener has no such check.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import parse_qs

from cachetools import TTLCache
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import Denied, MirrorError, Unauthorized
from .responses import registry_error

log = logging.getLogger("mirror.access")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
TOKEN_SECONDS = 3600
CLOCK_SKEW = 300  # seconds a signed token request's timestamp may differ from ours
EMPTY_BODY = base64.b64encode(hashlib.sha256(b"").hexdigest().encode()).decode()
OPEN_PATHS = frozenset({"/", "/healthz"})  # answered whoever asks: they reveal nothing


def load_keys(path: Path) -> dict[bytes, str]:
    """Raw ed25519 public keys -> their comment, from lines like Ollama's ``id_ed25519.pub``."""
    keys = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if fields[0] != "ssh-ed25519" or len(fields) < 2:
            raise ValueError(f"{path}:{number}: not an ssh-ed25519 public key")
        keys[_raw_key(fields[1], f"{path}:{number}")] = fields[2] if len(fields) > 2 else f"{path.name}:{number}"
    return keys


def _raw_key(blob_b64: str, where: str) -> bytes:
    """The 32 key bytes of an ssh wire-format ``ssh-ed25519`` public key blob."""
    try:
        blob = base64.b64decode(blob_b64, validate=True)
        (n,) = struct.unpack(">I", blob[:4])
        kind = blob[4:4 + n]
        (m,) = struct.unpack(">I", blob[4 + n:8 + n])
        raw = blob[8 + n:8 + n + m]
    except (binascii.Error, struct.error) as exc:
        raise ValueError(f"{where}: unreadable key") from exc
    if kind != b"ssh-ed25519" or len(raw) != 32:
        raise ValueError(f"{where}: not an ssh-ed25519 key")
    return raw


class AccessControl:
    def __init__(self, app: ASGIApp, networks: Sequence[IPNetwork] = (), tokens: frozenset[str] = frozenset(),
                 keys: dict[bytes, str] | None = None) -> None:
        self.app, self._networks, self._tokens, self._keys = app, tuple(networks), tokens, keys or {}
        self._issued: TTLCache[str, str] = TTLCache(maxsize=100_000, ttl=TOKEN_SECONDS)
        self._nonces: TTLCache[str, bool] = TTLCache(maxsize=100_000, ttl=2 * CLOCK_SKEW)
        self._warn = _Warnings()
        self._secret = secrets.token_bytes(32)  # signs blob grants, for this process's life

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        try:
            self._check_network(scope)
            if scope["path"] == "/token":
                await self._issue(scope)(scope, receive, send)
                return
            self._check_credentials(scope)
        except MirrorError as exc:
            await registry_error(exc, self._challenge(scope) if isinstance(exc, Unauthorized) else None)(
                scope, receive, send)
            return
        await self.app(scope, receive, send)

    # -- networks and credentials ---------------------------------------------------

    def _check_network(self, scope: Scope) -> None:
        client = _client(scope)
        if self._networks and not in_networks(client, self._networks):
            self._warn(client, f"refused client={client} reason=not in --allow-clients")
            raise Denied(f"{client} may not use this mirror (not in its allowed networks)")

    def _check_credentials(self, scope: Scope) -> None:
        if not (self._tokens or self._keys):
            return
        scheme, _, credentials = _header(scope, b"authorization").partition(" ")
        if scheme.lower() == "bearer" and _peer_ok(scope, credentials):
            return  # another replica: it may read the registry protocol, and nothing else (not manage)
        if (scheme.lower() == "bearer" and (credentials in self._issued or self._static_ok(credentials))
                or scheme.lower() == "basic" and self._static_ok(_basic_password(credentials))):
            state = scope.setdefault("state", {})
            state["authenticated"] = True  # the management API lets such a request change the cache
            if "/blobs/" in scope["path"]:
                state["grant"] = self._grant(scope["path"])
            return
        presented = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("grant", [""])[0]
        if presented and hmac.compare_digest(presented, self._grant(scope["path"])):
            return  # the Location we gave an authorized client: Ollama fetches its parts there without a token
        self._warn(_client(scope), f"refused client={_client(scope)} path={scope['path']} reason=no valid token")
        raise Unauthorized("this mirror needs credentials: a token (Bearer, or Basic with it as password) "
                           "or an Ollama key listed in its --keys-file")

    def _grant(self, path: str) -> str:
        """A capability for one blob path, put in the Location of an authorized blob GET: Ollama
        sends its Range parts to that URL as to a presigned CDN URL, without credentials."""
        return hmac.new(self._secret, path.encode(), hashlib.sha256).hexdigest()[:32]

    def _static_ok(self, presented: str) -> bool:
        return any(hmac.compare_digest(presented.encode(), token.encode()) for token in self._tokens)

    def _challenge(self, scope: Scope) -> dict[str, str]:
        if self._keys:  # Ollama (and docker) follow a Bearer challenge to our /token
            realm = f"{scope.get('scheme', 'http')}://{_header(scope, b'host') or 'localhost'}/token"
            return {"WWW-Authenticate": f'Bearer realm="{realm}",service="ollama-mirror",scope="pull"'}
        return {"WWW-Authenticate": 'Basic realm="ollama-mirror"'}

    # -- the token endpoint ---------------------------------------------------------------

    def _issue(self, scope: Scope) -> Response:
        """A token for a request signed by an allowed Ollama key, or carrying a static token."""
        value = _header(scope, b"authorization")
        scheme, _, credentials = value.partition(" ")
        if scheme.lower() == "basic" and self._static_ok(_basic_password(credentials)):
            who = "token"
        elif scheme.lower() == "bearer" and self._static_ok(credentials):
            who = "token"
        else:
            who = self._signed_by(scope, value)
        token = secrets.token_urlsafe(32)
        self._issued[token] = who
        log.info("token issued client=%s to=%s", _client(scope), who)
        body = {"token": token, "access_token": token, "expires_in": TOKEN_SECONDS}
        return Response(json.dumps(body), media_type="application/json")

    def _signed_by(self, scope: Scope, value: str) -> str:
        """The key's name, if ``value`` is Ollama's ``<key blob>:<signature>`` over this very
        request by an allowed key with a fresh timestamp and an unused nonce."""
        blob, sep, signature = value.strip().partition(":")
        if not sep or not self._keys:
            raise Unauthorized("sign the token request with an Ollama key this mirror allows")
        try:
            raw = _raw_key(blob, "key")
            name = self._keys.get(raw)
            if name is None:
                self._warn(_client(scope), f"refused client={_client(scope)} reason=Ollama key not in --keys-file")
                raise Denied("this Ollama key is not allowed to use the mirror")
            query = scope.get("query_string", b"").decode("latin-1")
            params = parse_qs(query)
            ts, nonce = int(params.get("ts", ["0"])[0]), params.get("nonce", [""])[0]
            if abs(time.time() - ts) > CLOCK_SKEW or not nonce or nonce in self._nonces:
                raise Unauthorized("stale or replayed token request")
            url = f"{scope.get('scheme', 'http')}://{_header(scope, b'host')}{scope['raw_path'].decode('latin-1')}?{query}"
            Ed25519PublicKey.from_public_bytes(raw).verify(base64.b64decode(signature, validate=True),
                                                           f"GET,{url},{EMPTY_BODY}".encode())
        except (ValueError, binascii.Error, InvalidSignature):
            raise Unauthorized("the token request's signature does not verify") from None
        self._nonces[nonce] = True
        return name


class ManagePolicy:
    """Who may change the cache (pull, delete) through the main listener's management API.

    Anyone who may use the mirror may read it; writing is for the mirror's own host (loopback),
    a request that AccessControl authenticated with a token or key, and the ``--manage-clients``
    networks. The ``--admin-listen`` listener serves the API without this policy: reaching it
    is the permission."""

    def __init__(self, networks: Sequence[IPNetwork] = ()) -> None:
        self._networks = tuple(networks)
        self._warn = _Warnings()

    def refusal(self, scope: Scope) -> str | None:
        """None when this request may change the cache; else the one sentence to answer with."""
        client = _client(scope)
        if is_loopback(client) or in_networks(client, self._networks) or scope.get("state", {}).get("authenticated"):
            return None
        self._warn(client, f"refused client={client} path={scope['path']} reason=not allowed to manage")
        return (f"{client or 'this client'} may not change this mirror's cache: run the command on the mirror's "
                "own host or through its --admin-listen address, or add this client's network to --manage-clients")


class _Warnings:
    """Log a refusal once a minute per client, so a client retrying in a loop cannot flood the log."""

    def __init__(self) -> None:
        self._recent: TTLCache[str, bool] = TTLCache(maxsize=1024, ttl=60)

    def __call__(self, client: str, line: str) -> None:
        if client not in self._recent:
            self._recent[client] = True
            log.warning(line)


def _addresses(client: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The client's address, and for an IPv4 client of a dual-stack listener (``::ffff:10.1.2.3``)
    its IPv4 address too; none when unreadable."""
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return []
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return [address] if mapped is None else [address, mapped]


def in_networks(client: str, networks: Sequence[IPNetwork]) -> bool:
    """Whether the address ``client`` lies in one of ``networks`` (an unreadable address does not)."""
    return any(address in network for address in _addresses(client) for network in networks)


def is_loopback(client: str) -> bool:
    """A client on the mirror's own host (127.0.0.0/8, ::1)."""
    return any(address.is_loopback for address in _addresses(client))


def _client(scope: Scope) -> str:
    return str((scope.get("client") or ("",))[0])


def _header(scope: Scope, name: bytes) -> str:
    return next((v.decode("latin-1") for k, v in scope["headers"] if k == name), "")


def _basic_password(credentials: str) -> str:
    try:
        return base64.b64decode(credentials, validate=True).decode("utf-8").partition(":")[2]
    except (binascii.Error, UnicodeDecodeError):
        return ""


def _peer_ok(scope: Scope, credentials: str) -> bool:
    """Another replica on the same bucket, streaming a blob this one fills (``replicas.py``): the
    token lets it read blobs and manifests (GET, HEAD under /v2/), never manage the cache."""
    if scope.get("method") not in ("GET", "HEAD") or not scope["path"].startswith("/v2/"):
        return False
    mirror = getattr(getattr(scope.get("app"), "state", None), "mirror", None)
    replicas = mirror.engine.replicas if mirror is not None else None
    return replicas is not None and replicas.is_peer(credentials)
