"""Settings: one frozen object, filled from environment variables and then flags.

Every setting has a named default and an environment variable
``OLLAMA_MIRROR_<NAME>``; a bad value is an error that names the key.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from urllib.parse import urlsplit

from .layout import registry_host

DEFAULT_LISTEN = "0.0.0.0:11435"
DEFAULT_UPSTREAM = "https://registry.ollama.ai"
DEFAULT_CACHE_DIR = Path("~/.cache/ollama-mirror").expanduser()
ENV_PREFIX = "OLLAMA_MIRROR_"


class SettingsError(ValueError):
    """A setting has a value we cannot use; the message names the key."""


@dataclass(frozen=True, kw_only=True)
class Settings:
    listen: str = DEFAULT_LISTEN
    cache_dir: Path = DEFAULT_CACHE_DIR
    upstream: str = DEFAULT_UPSTREAM
    offline: bool = False
    connections: int = 8  # parallel Range requests per fill
    chunk_size: int = 16 << 20  # unit of the fill's chunk map
    manifest_ttl: float = 600.0  # seconds a cached tag is served without asking upstream
    negative_ttl: float = 30.0  # seconds an upstream 404 for a tag is remembered
    revalidate_timeout: float = 5.0  # how long a client waits on upstream before a stale manifest
    connect_timeout: float = 10.0
    stall_timeout: float = 20.0  # no byte for this long: the range is resumed on a new connection
    max_retries: int = 10  # tries per chunk without progress before the fill fails
    log_level: str = "info"
    lock: Path | None = None  # a lock file (ollama-mirror freeze): those tags answer exactly those manifests
    allow_networks: str = ""  # CIDRs a public upstream may redirect to although private (comma-separated)
    registries: str = ""  # "HOST=URL,...": where each mirrored registry host is filled from
    proxy_listen: str = ""  # HOST:PORT for HTTPS_PROXY clients (CONNECT); empty: no proxy
    tls_listen: str = ""  # HOST:PORT presenting the mirrored hosts' certificates (LAN DNS override)
    tls_cert: Path | None = None  # the admin's certificate for --tls-listen instead of one from our CA
    tls_key: Path | None = None
    tunnel_allow: str = "ollama.com"  # hosts ("host" means port 443, or "host:port") the proxy tunnels untouched
    resolve: str = ""  # "HOST=IP,...": upstream addresses, so a LAN DNS override never loops to us

    def __post_init__(self) -> None:
        scheme = urlsplit(self.upstream).scheme
        if scheme not in ("http", "https") or not urlsplit(self.upstream).hostname:
            raise SettingsError(f"upstream: {self.upstream!r} is not an http(s) URL")
        _host_port("listen", self.listen)
        for cidr in filter(None, (c.strip() for c in self.allow_networks.split(","))):
            try:
                ipaddress.ip_network(cidr)
            except ValueError:
                raise SettingsError(f"allow_networks: {cidr!r} is not a network (CIDR)") from None
        for key in ("proxy_listen", "tls_listen"):
            if getattr(self, key):
                _host_port(key, getattr(self, key))
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SettingsError("tls_cert: give both tls_cert and tls_key, or neither")
        self.registry_urls  # noqa: B018 - validates the pairs
        self.pinned_addresses  # noqa: B018
        for key in ("connections", "chunk_size", "max_retries"):
            if getattr(self, key) < 1:
                raise SettingsError(f"{key}: must be at least 1, not {getattr(self, key)}")

    @property
    def allowed_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(c.strip()) for c in self.allow_networks.split(",") if c.strip()]

    @property
    def default_host(self) -> str:
        """The registry host that named-mode requests (``mirror.lan/library/x``) are filled from."""
        return registry_host(self.upstream)

    @property
    def registry_urls(self) -> dict[str, str]:
        """Mirrored registry host -> the URL it is filled from. ``--registry`` overrides ``--upstream``'s
        own host, so ``--registry registry.ollama.ai=URL`` also moves named mode to that URL."""
        urls = {self.default_host: self.upstream.rstrip("/")}
        for host, url in _pairs("registries", self.registries):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise SettingsError(f"registries: {url!r} (for {host}) is not an http(s) URL")
            urls[host.lower()] = url.rstrip("/")
        return urls

    @property
    def pinned_addresses(self) -> dict[str, str]:
        pins = {}
        for host, ip in _pairs("resolve", self.resolve):
            try:
                pins[host.lower()] = str(ipaddress.ip_address(ip))
            except ValueError:
                raise SettingsError(f"resolve: {ip!r} (for {host}) is not an IP address") from None
        return pins

    @property
    def tunnel_hosts(self) -> set[str]:
        return {h.strip().lower() for h in self.tunnel_allow.split(",") if h.strip()}

    @property
    def listen_host(self) -> str:
        return _host_port("listen", self.listen)[0]

    @property
    def listen_port(self) -> int:
        return _host_port("listen", self.listen)[1]


def _host_port(key: str, text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise SettingsError(f"{key}: {text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def _pairs(key: str, text: str) -> list[tuple[str, str]]:
    """``"a=b,c=d"`` as pairs; a malformed item names the key."""
    pairs = []
    for item in filter(None, (i.strip() for i in text.split(","))):
        left, sep, right = item.partition("=")
        if not sep or not left.strip() or not right.strip():
            raise SettingsError(f"{key}: {item!r} is not HOST=VALUE")
        pairs.append((left.strip(), right.strip()))
    return pairs


def _convert(key: str, kind: type, text: str) -> object:
    try:
        if kind is bool:
            lowered = text.strip().lower()
            if lowered not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ValueError(text)
            return lowered in ("1", "true", "yes", "on")
        if kind is Path:
            return Path(text).expanduser()
        return kind(text)
    except ValueError:
        raise SettingsError(f"{key}: {text!r} is not a valid {kind.__name__}") from None


def load_settings(flags: Mapping[str, object], environ: Mapping[str, str]) -> Settings:
    """Settings from ``OLLAMA_MIRROR_*`` variables, overridden by flags that were given."""
    kinds = {f.name: (Path if f.name in ("cache_dir", "lock", "tls_cert", "tls_key") else type(f.default)) for f in fields(Settings)}
    values: dict[str, object] = {}
    for key, kind in kinds.items():
        text = environ.get(ENV_PREFIX + key.upper())
        if text is not None:
            values[key] = _convert(ENV_PREFIX + key.upper(), kind, text)
    for key, value in flags.items():
        if value is not None:
            values[key] = _convert(f"--{key.replace('_', '-')}", kinds[key], str(value))
    return Settings(**values)  # type: ignore[arg-type]
