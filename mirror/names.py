"""Model names, references and digests: parsed once at the edge, immutable after.

The rules follow Ollama's ``types/model/name.go``: parts are made of letters,
digits, ``_``, ``-`` and ``.``; a namespace has no ``.``. We are stricter where
a part becomes a directory name: no leading ``.`` or ``-``, no ``..``, so no
part can ever mean anything to the filesystem but itself.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from dataclasses import dataclass
from enum import Enum, auto

from .errors import DigestInvalid, NameInvalid

DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
MAX_PART = 80

_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_NAMESPACE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _check_part(kind: str, text: str, pattern: re.Pattern[str]) -> str:
    if not (0 < len(text) <= MAX_PART) or not pattern.fullmatch(text) or ".." in text:
        raise NameInvalid(f"invalid {kind} {text[:100]!r} in model name", part=kind)
    return text


@dataclass(frozen=True, slots=True)
class Digest:
    """A sha256 digest; ``hex`` is 64 lowercase hex digits."""

    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        algo, sep, hex_ = text.partition(":")
        if not sep:  # Ollama's file-name form, sha256-<hex>
            algo, sep, hex_ = text.partition("-")
        if algo != "sha256" or not _HEX64.fullmatch(hex_):
            raise DigestInvalid(f"invalid digest {text[:100]!r}: expected sha256:<64 hex digits>")
        return cls(hex_)

    @classmethod
    def of(cls, data: bytes) -> Digest:
        """The sha256 of ``data``."""
        return cls(hashlib.sha256(data).hexdigest())

    @classmethod
    def is_digest(cls, text: str) -> bool:
        return text.startswith("sha256:")

    def __str__(self) -> str:
        return f"sha256:{self.hex}"

    @property
    def short(self) -> str:
        """12 hex digits: enough to tell blobs apart in a log line."""
        return f"sha256:{self.hex[:12]}"


TagKey = tuple[str, str, str]  # (host, namespace/model, tag), lowercased as Ollama's manifest paths are


def tag_key(host: str, name: Name, tag: str) -> TagKey:
    """One tag however it is spelled: the local cache, the bucket and the CLI compare by this."""
    return host.lower(), str(name).lower(), tag.lower()


@dataclass(frozen=True, slots=True)
class Name:
    """``namespace/model`` as the registry paths carry it (host is the upstream's)."""

    namespace: str
    model: str

    @classmethod
    def parse(cls, text: str) -> Name:
        parts = text.split("/")
        if len(parts) == 1:
            parts = [DEFAULT_NAMESPACE, parts[0]]
        if len(parts) != 2:
            raise NameInvalid(f"invalid model name {text[:100]!r}: expected namespace/model")
        namespace = _check_part("namespace", parts[0], _NAMESPACE)
        model = _check_part("model", parts[1], _PART)
        return cls(namespace, model)

    def __str__(self) -> str:
        return f"{self.namespace}/{self.model}"


def parse_tag(text: str) -> str:
    """A tag, as it may appear in a manifest path or a user's ``model:tag``."""
    return _check_part("tag", text, _PART)



@dataclass(frozen=True, slots=True)
class ModelRef:
    """A model as a user types it, ``[host/][namespace/]model[:tag]``, with Ollama's defaults."""

    host: str | None  # None: the default registry, which for the mirror is its upstream
    name: Name
    tag: str

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        rest = text.strip().removeprefix("https://").removeprefix("http://")
        host = None
        if rest.count("/") == 2:
            host, rest = rest.split("/", 1)
            if not _HOST.fullmatch(host):
                raise NameInvalid(f"invalid registry host {host[:100]!r} in model name")
            host = host.lower()  # as Ollama writes it in manifest paths
        path, sep, tag = rest.rpartition(":")
        if not sep:
            path, tag = rest, DEFAULT_TAG
        return cls(host, Name.parse(path), parse_tag(tag))

    def __str__(self) -> str:
        prefix = f"{self.host}/" if self.host else ""
        return f"{prefix}{self.name}:{self.tag}"


class Source(Enum):
    """Where a name asks for the model (Ollama v0.32's internal/modelref): ``x:local``, ``x:cloud``."""

    ANY = auto()  # no suffix
    LOCAL = auto()  # ``x:local``, ``x:8b:local``: the model on this machine
    CLOUD = auto()  # ``x:cloud``, ``x:8b:cloud``, ``x:8b-cloud``: the model ollama.com runs


@dataclass(frozen=True, slots=True)
class SourcedName:
    """A name as Ollama's API takes it, with its ``:local`` or ``:cloud`` suffix taken apart.

    ``base`` is the name without the suffix (``x:8b`` for ``x:8b:cloud``). The registry
    holds a cloud model as a small tag of its own, ``x:cloud`` or ``x:8b-cloud``, which is
    what pulling or removing a ``:cloud`` name acts on (modelref.NormalizePullName)."""

    typed: str  # as the user typed it: Ollama's "model '...' not found" quotes it
    base: str
    source: Source

    @classmethod
    def parse(cls, text: str) -> SourcedName:
        typed = text.strip()
        base, source = _cut_source(typed)
        if source is not Source.ANY and _cut_source(base)[1] is not Source.ANY:
            raise NameInvalid(f"use either :local or :cloud, not both: {json.dumps(typed)}")  # Ollama's words
        return cls(typed, base, source)

    def ref(self) -> ModelRef:
        """The model on this machine (``show``): the name without its suffix."""
        return ModelRef.parse(self.base)

    def pull_ref(self) -> ModelRef:
        """The tag ``pull`` and ``rm`` act on: a ``:cloud`` name's tag in the registry's form."""
        if self.source is not Source.CLOUD:
            return ModelRef.parse(self.base)
        explicit_tag = self.base.rfind(":") > self.base.rfind("/")
        return ModelRef.parse(f"{self.base}-cloud" if explicit_tag else f"{self.base}:cloud")


def _cut_source(text: str) -> tuple[str, Source]:
    """modelref.parseSourceSuffix: the last ``:`` part, if it is ``local``, ``cloud`` or ``<tag>-cloud``."""
    head, sep, suffix = text.rpartition(":")
    if not sep:
        return text, Source.ANY
    lowered = suffix.strip().lower()
    if lowered in ("local", "cloud"):
        return head, Source.LOCAL if lowered == "local" else Source.CLOUD
    if "/" not in suffix and lowered.endswith("-cloud"):
        return f"{head}:{suffix.strip()[:-len('-cloud')]}", Source.CLOUD
    return text, Source.ANY


def typed_name(host: str, name: Name, tag: str, default_host: str) -> str:
    """The shortest name a user types for a stored model, against a default registry host:
    ``qwen2.5:7b`` for its library, ``team/model:v1`` for another namespace, the full name for any
    other host. ``ModelRef.parse`` of it, with that default, names the same model again."""
    if host != default_host:
        return f"{host}/{name}:{tag}"
    if name.namespace == DEFAULT_NAMESPACE:
        return f"{name.model}:{tag}"
    return f"{name}:{tag}"


_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*(:[0-9]{1,5})?")


def is_registry_host(text: str) -> bool:
    """``registry.ollama.ai``, ``host:5000``: a host as it may stand first in a model name."""
    return bool(_HOST.fullmatch(text))


def respelled(host: str, scheme: str) -> str:
    """``host`` (a Host header: name or address, maybe a port) written another way that reaches
    the same server: a name with its letters' case flipped (names are case-insensitive in DNS,
    hosts files and certificates), an address with its default port written out or dropped, or
    an IPv4 address as IPv4-mapped IPv6 (which Go dials over IPv4). Ollama's tensor downloader
    takes a redirect to another host, compared as text, as the place to fetch from without
    fetching it there and then."""
    name, port = _host_and_port(host)
    bare = name.strip("[]")
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        ip = None
    if ip is None:
        flipped = name.lower() if name == name.upper() else name.upper()
        return f"{flipped}:{port}" if port else flipped
    default = "443" if scheme == "https" else "80"
    if not port:
        return f"{name}:{default}"
    if port == default:
        return name
    if ip.version == 4:
        return f"[::ffff:{ip}]:{port}"
    other = ip.exploded if bare != ip.exploded else ip.compressed
    return f"[{other}]:{port}"


def _host_and_port(host: str) -> tuple[str, str]:
    if host.startswith("["):  # [v6]:port
        name, _, rest = host.partition("]")
        return name + "]", rest.removeprefix(":")
    name, colon, port = host.rpartition(":")
    return (name, port) if colon and port.isdigit() else (host, "")
