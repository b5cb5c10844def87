"""The roster: replica heartbeats in the shared bucket: who serves, where, since when, and what each one fills.

Each replica rewrites ``replicas/<id>`` (see bucket.py) every few seconds; an entry not rewritten
for ``Replica.gone_after`` seconds belongs to a replica that stopped or died. The status page and
metrics show them; nothing waits on them (the fill leases are what coordinates).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from typing import ClassVar

from .bucket import Bucket
from .errors import DigestInvalid
from .names import Digest


@dataclass(frozen=True, slots=True)
class Replica:
    id: str
    url: str  # its --advertise-url
    version: str
    started: float  # unix time
    last_seen: float = 0.0  # unix time; announce() sets it
    fills: tuple[Digest, ...] = ()  # the blobs it fetches from upstream now

    gone_after: ClassVar[float] = 30.0

    @property
    def gone(self) -> bool:
        return time.time() - self.last_seen > self.gone_after

    def to_json(self) -> bytes:
        return json.dumps({"id": self.id, "url": self.url, "version": self.version, "started": self.started,
                           "last_seen": self.last_seen, "fills": [str(d) for d in self.fills]}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Replica | None:
        """None for an entry that cannot be read (written by another version, or damaged)."""
        try:
            fields = json.loads(data)
            return cls(str(fields["id"]), str(fields["url"]), str(fields["version"]), float(fields["started"]),
                       float(fields["last_seen"]), tuple(Digest.parse(d) for d in fields["fills"]))
        except (ValueError, TypeError, KeyError, DigestInvalid):
            return None


class Roster:
    """Every replica's heartbeat in the bucket."""

    def __init__(self, bucket: Bucket) -> None:
        self.bucket = bucket

    def announce(self, replica: Replica) -> Replica:
        """Write the heartbeat, stamped now; returns it as written."""
        seen = replace(replica, last_seen=time.time())
        self.bucket.write_object(self.bucket.keys.replica(seen.id), seen.to_json())
        return seen

    def all(self) -> list[Replica]:
        """Every replica that has announced itself and not retired, gone ones included, by id."""
        found = []
        for entry in self.bucket.list_objects(self.bucket.keys.replicas):
            data = self.bucket.read_object(entry.key)
            replica = None if data is None else Replica.from_json(data)
            if replica is not None:
                found.append(replica)
        return sorted(found, key=lambda r: r.id)

    def retire(self, replica_id: str) -> None:
        """Remove the heartbeat: a replica shutting down cleanly is not shown as gone."""
        self.bucket.delete_object(self.bucket.keys.replica(replica_id))
