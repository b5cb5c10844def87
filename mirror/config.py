"""Settings: one frozen object, filled from (in rising precedence) a TOML file, environment
variables ``OLLAMA_MIRROR_<NAME>`` and command-line flags.

Every setting has a named default; an unknown key or a bad value is an error at start-up
that names the key and where it came from.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import shutil
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from urllib.parse import urlsplit

from .layout import registry_host

DEFAULT_LISTEN = "0.0.0.0:11435"
DEFAULT_UPSTREAM = "https://registry.ollama.ai"
DEFAULT_CACHE_DIR = Path("~/.cache/ollama-mirror").expanduser()
ENV_PREFIX = "OLLAMA_MIRROR_"
DEFAULT_CONFIG = Path("/etc/ollama-mirror/config.toml")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)


class SettingsError(ValueError):
    """A setting has a value we cannot use. ``key`` is the setting; the message names it as the
    user gave it (``--max-size``, ``OLLAMA_MIRROR_MAX_SIZE``, ``max-size in FILE``) once
    ``load_settings`` knows where it came from."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key, self.problem = key, problem


# Flags whose name is not the setting's with dashes (repeatable flags, one setting).
FLAG_NAMES = {"registries": "--registry", "tokens": "--token"}
_SIZE_HINT = "give a number with K, M, G or T, such as 500G"


def flag_name(key: str) -> str:
    return FLAG_NAMES.get(key, f"--{key.replace('_', '-')}")


def env_name(key: str) -> str:
    return f"{ENV_PREFIX}{key.upper()}"


@dataclass(frozen=True, kw_only=True)
class Settings:
    listen: str = DEFAULT_LISTEN
    cache_dir: Path = DEFAULT_CACHE_DIR
    upstream: str = DEFAULT_UPSTREAM
    offline: bool = False
    connections: int = 0  # parallel Range requests per fill; 0: adapt to what upstream gives (up to 32)
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
    max_size: str = ""  # high watermark of the store: "500G" (K/M/G/T, powers of 1024) or "80%" of the disk
    low_watermark: float = 0.9  # eviction stops at this share of max_size
    min_free: str = "1G"  # a fill that would leave less free space than this is refused (507)
    upstream_connections: int = 64  # upstream connections in total, all fills together
    upstream_rate: str = ""  # bandwidth cap for all fills together, bytes/s ("50M"); empty: none
    allow_clients: str = ""  # CIDRs that may use the mirror (comma-separated); empty: anyone
    manage_clients: str = ""  # CIDRs that may pull/delete through the management API besides loopback
    tokens: str = ""  # bearer tokens that may pull (comma-separated); empty: no token needed
    keys_file: Path | None = None  # Ollama public keys (id_ed25519.pub lines) whose machines may pull
    admin_listen: str = ""  # HOST:PORT for /metrics and the status page only; empty: on the main listener
    head_timeout: float = 15.0  # seconds a client has to send a request head (slow-loris clients are dropped)
    log_format: str = "text"  # "text" or "json" (one object per line, for log shippers)
    store: str = ""  # "s3://BUCKET/PREFIX": a bucket shared by replicas; empty: the cache directory alone
    s3_path_style: bool = False  # bucket in the URL path (MinIO, Ceph RGW without wildcard DNS)
    advertise_url: str = ""  # how other replicas reach this one (http://host:port); default: from --listen
    blob_redirect: bool = False  # answer a warm blob's resolving GET with a 307 to a presigned store URL
    replica_id: str = ""  # this replica's name in the bucket (leases, status); default: host-port

    def __post_init__(self) -> None:
        scheme = urlsplit(self.upstream).scheme
        if scheme not in ("http", "https") or not urlsplit(self.upstream).hostname:
            raise SettingsError("upstream", f"{self.upstream!r} is not an http(s) URL: give one such as "
                                            f"{DEFAULT_UPSTREAM}")
        _host_port("listen", self.listen)
        for cidr in filter(None, (c.strip() for c in self.allow_networks.split(","))):
            try:
                ipaddress.ip_network(cidr)
            except ValueError:
                raise SettingsError("allow_networks", f"{cidr!r} is not a network: give CIDRs such as "
                                                      "10.0.0.0/8, comma-separated") from None
        for key in ("proxy_listen", "tls_listen", "admin_listen"):
            if getattr(self, key):
                _host_port(key, getattr(self, key))
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SettingsError("tls_cert" if self.tls_key is None else "tls_key",
                                "give both the certificate and its key (tls_cert and tls_key), or neither")
        self.registry_urls  # noqa: B018 - validates the pairs
        self.pinned_addresses  # noqa: B018
        self.client_networks  # noqa: B018
        self.manage_networks  # noqa: B018
        if self.max_size and not self.max_size.strip().endswith("%"):
            parse_size("max_size", self.max_size, or_share=True)
        elif self.max_size and not 0 < _number(self.max_size.strip()[:-1]) <= 100:
            raise SettingsError("max_size", f"{self.max_size!r} is not a share of the disk: give a percentage "
                                            "between 0 and 100, such as 80%")
        parse_size("min_free", self.min_free)
        if self.upstream_rate:
            parse_size("upstream_rate", self.upstream_rate)
        if not 0 < self.low_watermark < 1:
            raise SettingsError("low_watermark", f"{self.low_watermark} is not between 0 and 1: give 0.9, say")
        if self.log_format not in ("text", "json"):
            raise SettingsError("log_format", f"{self.log_format!r} is neither 'text' nor 'json'")
        if self.store and not self.store.startswith("s3://"):
            raise SettingsError("store", f"{self.store!r} is not a bucket URL: give s3://BUCKET/PREFIX, or leave it "
                                         "empty for the cache directory alone")
        if self.advertise_url and urlsplit(self.advertise_url).scheme not in ("http", "https"):
            raise SettingsError("advertise_url", f"{self.advertise_url!r} is not an http(s) URL: give the URL other "
                                                 "replicas reach this one at, such as http://10.0.0.5:11435")
        if self.replica_id and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", self.replica_id):
            raise SettingsError("replica_id", f"{self.replica_id!r} is not a replica name: use letters, digits, "
                                              "'.', '_' and '-', up to 64, such as mirror-2")
        if self.blob_redirect and not self.store:
            raise SettingsError("blob_redirect", "needs a bucket to send clients to: give --store s3://BUCKET/PREFIX")
        for key in ("chunk_size", "max_retries", "upstream_connections"):
            if getattr(self, key) < 1:
                raise SettingsError(key, f"must be at least 1, not {getattr(self, key)}")
        if self.connections < 0:
            raise SettingsError("connections", f"must be 0 (adapt to upstream) or more, not {self.connections}")

    @property
    def allowed_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(c.strip()) for c in self.allow_networks.split(",") if c.strip()]

    @property
    def default_host(self) -> str:
        """The registry host that named-mode requests (``mirror.lan/library/x``) and host-less model
        names (``qwen2.5:7b``) mean, and whose tags live under ``manifests/<host>/``: the one that
        ``--registry`` maps to the upstream URL (a mirror of a mirror keeps the registry's names),
        else the upstream URL's own host."""
        upstream = self.upstream.rstrip("/")
        for host, url in self._registry_pairs():
            if url == upstream:
                return host
        return registry_host(self.upstream)

    @property
    def registry_urls(self) -> dict[str, str]:
        """Mirrored registry host -> the URL it is filled from. ``--registry`` overrides ``--upstream``'s
        own host, so ``--registry registry.ollama.ai=URL`` also moves named mode to that URL."""
        urls = {self.default_host: self.upstream.rstrip("/")}
        urls.update(self._registry_pairs())
        return urls

    def _registry_pairs(self) -> list[tuple[str, str]]:
        pairs = []
        for host, url in _pairs("registries", self.registries):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise SettingsError("registries", f"{url!r} (for {host}) is not an http(s) URL: give HOST=URL, "
                                                  "such as hf.co=https://hf.co")
            pairs.append((host.lower(), url.rstrip("/")))
        return pairs

    def mirroring(self, host: str) -> Settings:
        """These settings for an upstream that is itself a mirror of ``host``'s registry: its tags are
        stored and named under ``host``, as ``--registry HOST=<upstream>`` says explicitly."""
        pair = f"{host}={self.upstream.rstrip('/')}"
        return replace(self, registries=f"{pair},{self.registries}" if self.registries else pair)

    @property
    def pinned_addresses(self) -> dict[str, str]:
        pins = {}
        for host, ip in _pairs("resolve", self.resolve):
            try:
                pins[host.lower()] = str(ipaddress.ip_address(ip))
            except ValueError:
                raise SettingsError("resolve", f"{ip!r} (for {host}) is not an IP address: give HOST=IP") from None
        return pins

    @property
    def client_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return _networks("allow_clients", self.allow_clients)

    @property
    def manage_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """Networks whose clients may change the cache through the main listener (loopback always may)."""
        return _networks("manage_clients", self.manage_clients)

    @property
    def token_set(self) -> frozenset[str]:
        return frozenset(t.strip() for t in self.tokens.split(",") if t.strip())

    @property
    def rate_limit(self) -> int | None:
        return parse_size("upstream_rate", self.upstream_rate) if self.upstream_rate else None

    @property
    def min_free_bytes(self) -> int:
        return parse_size("min_free", self.min_free)

    def max_bytes(self) -> int | None:
        """The store's high watermark in bytes; a percentage is of the cache's filesystem."""
        text = self.max_size.strip()
        if not text:
            return None
        if text.endswith("%"):
            return int(shutil.disk_usage(_existing_parent(self.cache_dir)).total * float(text[:-1]) / 100)
        return parse_size("max_size", text)

    @property
    def tunnel_hosts(self) -> set[str]:
        return {h.strip().lower() for h in self.tunnel_allow.split(",") if h.strip()}

    @property
    def listen_host(self) -> str:
        return _host_port("listen", self.listen)[0]

    @property
    def listen_port(self) -> int:
        return _host_port("listen", self.listen)[1]


def parse_size(key: str, text: str, *, or_share: bool = False) -> int:
    """``"500G"``, ``"1.5T"``, ``"64M"``, ``"1000"``: bytes, in powers of 1024."""
    match = _SIZE.match(str(text))
    if match is None:
        negative = str(text).strip().startswith("-")
        what = "a size below zero" if negative else "not a size"
        share = ", or a share of the disk such as 80%" if or_share else ""
        raise SettingsError(key, f"{text!r} is {what}: {_SIZE_HINT}{share}")
    return int(float(match[1]) * _UNITS[match[2].upper()])


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return -1.0


def _networks(key: str, text: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """``"10.0.0.0/8, 192.168.1.7"``: networks (a lone address is a network of one)."""
    try:
        return [ipaddress.ip_network(c.strip(), strict=False) for c in text.split(",") if c.strip()]
    except ValueError as exc:
        raise SettingsError(key, f"{exc}: give addresses or CIDRs such as 10.0.0.0/8, comma-separated") from None


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _host_port(key: str, text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise SettingsError(key, f"{text!r} is not HOST:PORT: give one such as {DEFAULT_LISTEN}")
    return host.strip("[]"), int(port)


def _pairs(key: str, text: str) -> list[tuple[str, str]]:
    """``"a=b,c=d"`` as pairs; a malformed item names the key."""
    pairs = []
    for item in filter(None, (i.strip() for i in text.split(","))):
        left, sep, right = item.partition("=")
        if not sep or not left.strip() or not right.strip():
            raise SettingsError(key, f"{item!r} is not HOST=VALUE")
        pairs.append((left.strip(), right.strip()))
    return pairs


def _convert(key: str, kind: type, value: object) -> object:
    """A value of the setting's type, from a string (environment, flags) or a TOML value."""
    if not isinstance(value, str):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is bool and isinstance(value, bool) or kind is float and number:
            return kind(value)
        if kind is int and number and float(value).is_integer():
            return int(value)
        if kind is str and number or kind is Path and isinstance(value, Path):
            return kind(value)
        raise SettingsError(key, f"{value!r} is not {_KIND_NAMES[kind]}")
    text = value
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
        raise SettingsError(key, f"{text!r} is not {_KIND_NAMES[kind]}") from None


_KIND_NAMES = {bool: "yes or no", int: "a whole number", float: "a number", str: "text", Path: "a path"}


SettingSources = dict[str, str]  # setting -> where its value came from


def _kinds() -> dict[str, type]:
    return {f.name: (Path if f.name in ("cache_dir", "lock", "tls_cert", "tls_key", "keys_file") else type(f.default))
            for f in fields(Settings)}


def _from_toml(path: Path, kinds: Mapping[str, type]) -> dict[str, tuple[object, str]]:
    """A TOML file's settings, keys as in the table of the README (dashes or underscores):
    {setting: (value, how the file names it)}."""
    try:
        doc = tomllib.loads(path.read_text())
    except PermissionError:
        raise SettingsError("config", f"cannot read {path} (permission denied): run the command as root or as "
                                      "the mirror's user (sudo -u ollama-mirror), or name another file with "
                                      "--config") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError("config", f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError("config", f"{path} is not valid TOML: {exc}") from None
    values: dict[str, tuple[object, str]] = {}
    for raw_key, value in doc.items():
        key = raw_key.replace("-", "_")
        where = f"{raw_key} (in {path})"
        if key not in kinds:
            raise SettingsError(where, f"unknown setting{_did_you_mean(key, kinds)}")
        if isinstance(value, dict) and key in ("registries", "resolve"):
            value = ",".join(f"{k}={v}" for k, v in value.items())  # [registries] "hf.co" = "https://hf.co"
        elif isinstance(value, list):
            value = ",".join(str(v) for v in value)
        values[key] = (_convert(where, kinds[key], value), where)
    return values


def _did_you_mean(key: str, kinds: Mapping[str, type], env: bool = False) -> str:
    close = difflib.get_close_matches(key, list(kinds), n=1)
    if not close:
        return ""
    return f": did you mean {env_name(close[0]) if env else close[0]}?"


def load_settings(
    flags: Mapping[str, object], environ: Mapping[str, str], config: Path | None = None
) -> tuple[Settings, SettingSources]:
    """Settings from a TOML file, then ``OLLAMA_MIRROR_*`` variables, then flags that were given.

    ``config``: the file named by ``--config``; else ``OLLAMA_MIRROR_CONFIG``; else
    /etc/ollama-mirror/config.toml when it exists. Returns the settings and each one's source.
    An error names the setting as it was given: the flag, the variable, or the key and the file.
    """
    kinds = _kinds()
    values: dict[str, object] = {}
    sources: SettingSources = {}
    named: dict[str, str] = {}  # setting -> how the user named it
    path = config or (Path(environ["OLLAMA_MIRROR_CONFIG"]) if environ.get("OLLAMA_MIRROR_CONFIG") else None)
    if path is None and DEFAULT_CONFIG.is_file():
        path = DEFAULT_CONFIG
    if path is not None:
        for key, (value, where) in _from_toml(path, kinds).items():
            values[key], sources[key], named[key] = value, str(path), where
    for name, text in environ.items():
        if name.startswith(ENV_PREFIX) and name != "OLLAMA_MIRROR_CONFIG":
            key = name[len(ENV_PREFIX):].lower()
            if key not in kinds:
                raise SettingsError(name, f"unknown setting (environment){_did_you_mean(key, kinds, env=True)}")
            values[key], sources[key], named[key] = _convert(name, kinds[key], text), "environment", name
    for key, value in flags.items():
        if value is not None:
            values[key] = _convert(flag_name(key), kinds[key], value)
            sources[key], named[key] = "command line", flag_name(key)
    try:
        return Settings(**values), sources  # type: ignore[arg-type]
    except SettingsError as exc:
        raise SettingsError(named.get(exc.key, exc.key), exc.problem) from None


def render(settings: Settings, sources: SettingSources) -> str:
    """The effective settings as TOML a config file can take, each with where it came from."""
    lines = []
    for f in fields(Settings):
        value = getattr(settings, f.name)
        if value is None:
            lines.append(f"# {f.name} =  # not set")
            continue
        if f.name == "tokens" and value:
            lines.append(f"# tokens: {len(settings.token_set)} set, not shown  # {sources.get(f.name)}")
            continue
        shown = str(value).lower() if isinstance(value, bool) else (
            repr(value) if isinstance(value, (int, float)) else _toml_string(str(value)))
        lines.append(f"{f.name} = {shown}  # {sources.get(f.name, 'default')}")
    return "\n".join(lines)


def _toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
