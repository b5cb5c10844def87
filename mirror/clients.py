"""Who asks for a manifest, and what upstream answered each client for a tag.

The registry answers a tag by User-Agent: an Ollama older than the model needs gets
412 ("this model requires a newer version of Ollama"), a newer one the manifest. Ollama
sends ``ollama/<version> (<arch> <os>) Go/<go>`` on every registry and API request
(server/images.go ``makeRequest``, api/client.go ``do``, v0.32.15). Other clients (curl,
skopeo, docker) are told apart by their product name alone.

``TagAnswers`` is what the mirror learned for one tag: per client, accepted or refused
(with upstream's status and body), and when. Ollama versions are ordered, so one answer
also decides for others: a client at least as new as an accepted one is accepted, one at
most as new as a refused one is refused. Pure: persisted by ``metadata``, used by
``manifests``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

_OLLAMA = re.compile(r"ollama/([0-9][0-9A-Za-z.+-]{0,39})(?=[\s;(]|$)")
_ORDERED = re.compile(r"([0-9]{1,6})\.([0-9]{1,6})\.([0-9]{1,6})(?:-rc([0-9]{1,4}))?")
_PRODUCT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,39}")


@dataclass(frozen=True, slots=True)
class ClientAgent:
    """A client as its User-Agent names it: Ollama and its version, or another product."""

    product: str  # "ollama", "curl", "skopeo", ...; "" when the request named none
    version: str = ""  # Ollama's version as sent ("0.32.15", "0.33.0-rc2"); "" for other products

    @classmethod
    def parse(cls, user_agent: str) -> ClientAgent:
        text = user_agent.strip()
        found = _OLLAMA.match(text)
        if found:
            return cls("ollama", found.group(1))
        product = _PRODUCT.match(text)
        return cls(product.group(0).lower() if product else "")

    @property
    def key(self) -> str:
        """``ollama/0.32.15`` or ``curl``: what answers are remembered under (``parse`` reads it back)."""
        return f"ollama/{self.version}" if self.version else self.product

    @property
    def order(self) -> tuple[int, ...] | None:
        """Numeric order of an Ollama release or release candidate (0.9.3 < 0.33.0-rc2 < 0.33.0);
        None for anything else (dev builds, other products), which only its own answer decides."""
        found = _ORDERED.fullmatch(self.version)
        if not found:
            return None
        major, minor, patch, rc = found.groups()
        return (int(major), int(minor), int(patch), 0 if rc else 1, int(rc or 0))


@dataclass(frozen=True, slots=True)
class Refusal:
    """Upstream's refusal, kept to be given again exactly: status, body and its type."""

    status: int
    body: bytes
    content_type: str


@dataclass(frozen=True, slots=True)
class Answer:
    at: float  # unix time upstream gave it
    refusal: Refusal | None = None  # None: accepted (upstream served the manifest)


@dataclass(frozen=True, slots=True)
class TagAnswers:
    """What upstream answered which clients for one tag. Acceptances are for the manifest
    ``digest``; refusals learned before any manifest was seen carry over to the first one."""

    digest: str = ""  # the manifest upstream served the accepted clients; "" before any
    by_client: dict[str, Answer] = field(default_factory=dict)

    def answer_for(self, client: ClientAgent) -> Answer | None:
        """The freshest answer that decides for ``client``: its own, or an ordered neighbour's."""
        deciding = [self.by_client[client.key]] if client.key in self.by_client else []
        order = client.order
        if order is not None:
            for key, answer in self.by_client.items():
                other = ClientAgent.parse(key).order
                if other is not None and (other >= order if answer.refusal else other <= order):
                    deciding.append(answer)
        return max(deciding, key=lambda answer: answer.at, default=None)

    def accepted(self, client: ClientAgent, digest: str, at: float) -> TagAnswers:
        """Upstream served ``digest`` to ``client``. Another manifest than before: the tag moved,
        and what was learned about the old one no longer holds."""
        kept = self.by_client if self.digest in ("", digest) else {}
        kept = {key: answer for key, answer in kept.items() if not _contradicts(key, answer, client, accepted=True)}
        return TagAnswers(digest, {**kept, client.key: Answer(at)})

    def refused(self, client: ClientAgent, refusal: Refusal, at: float) -> TagAnswers:
        kept = {key: answer for key, answer in self.by_client.items()
                if not _contradicts(key, answer, client, accepted=False)}
        return replace(self, by_client={**kept, client.key: Answer(at, refusal)})

    def to_dict(self) -> dict[str, Any]:
        return {"digest": self.digest, "clients": {
            key: {"at": a.at, **({"status": a.refusal.status, "body": a.refusal.body,
                                  "content_type": a.refusal.content_type} if a.refusal else {})}
            for key, a in self.by_client.items()}}

    @classmethod
    def from_dict(cls, value: object) -> TagAnswers:
        """Read back ``to_dict``; anything else (an older format, damage) is nothing learned."""
        if not isinstance(value, dict):
            return cls()
        try:
            answers = {}
            for key, item in value["clients"].items():
                refusal = (Refusal(int(item["status"]), bytes(item["body"]), str(item["content_type"]))
                           if "status" in item else None)
                answers[str(key)] = Answer(float(item["at"]), refusal)
            return cls(str(value["digest"]), answers)
        except (KeyError, TypeError, ValueError, AttributeError):
            return cls()


def _contradicts(key: str, answer: Answer, client: ClientAgent, accepted: bool) -> bool:
    """An older answer that the new one proves outdated (the tag moved upstream): an accepted
    client at most as new as a refused one, or a refused one at least as new as an accepted one."""
    order, other = client.order, ClientAgent.parse(key).order
    if order is None or other is None:
        return False
    if accepted:
        return answer.refusal is not None and other >= order
    return answer.refusal is None and other <= order
