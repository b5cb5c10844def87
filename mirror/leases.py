"""Fill leases in the shared bucket: one upstream fetch per blob across all replicas.

A lease is the object ``leases/sha256-<hex>`` (see bucket.py), JSON ``{owner, url, expires, ttl,
token}``. A replica holds it while it fills the blob, renews it well before it expires, and deletes
it when done; the others stream from its ``url`` meanwhile. Only ``PutObject`` with
``If-None-Match: *`` is relied on: RGW, MinIO, S3 and R2 all honour it. Neither a conditional delete
nor ``If-Match`` is (RGW 16.2 ignores the first and compares the second without the ETag's quotes).

Who may change a lease, and when:
- anyone creates a missing one (``acquire``: the conditional put lets exactly one through);
- its holder renews or deletes it, only while it has more than ``skew`` seconds left by the holder's clock;
- once it has expired by a taker's clock, only the replica holding ``leases/sha256-<hex>.takeover``
  (created with the same conditional put) may delete it, and then ``acquire`` it as anyone would
  (``ollama-mirror gc`` deletes it that way too, and acquires nothing: ``clear``).

So no two replicas hold one lease, as long as clocks agree within ``skew`` and no single step stalls
for longer than that. A holder should take a ``ttl`` well above ``skew`` (15 s or more) and renew every
``ttl / 3``: a lease with less than ``skew`` left can be neither renewed nor released. The races accepted beyond it:
- ``renew`` and ``release`` read, compare the token, then write: a holder stalled for ``skew`` seconds
  between the two can overwrite or delete a taker's new lease. Then two replicas fill one blob (its
  bytes are fetched twice, verified and identical) until the taker's next renew finds a foreign token.
- a take-over marker older than ``takeover_ttl`` is taken for one left by a replica that died while
  taking over, and is removed: a taker stalled for that long in its three requests loses its exclusion.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace

from .bucket import Bucket
from .errors import StoreUnavailable
from .names import Digest


@dataclass(frozen=True, slots=True)
class Lease:
    digest: Digest
    owner: str  # the replica's id
    url: str  # where the others stream the blob from while it fills (its --advertise-url)
    expires: float  # unix time
    ttl: float  # seconds a renewal adds
    token: str  # random: tells this holding from any other, the same owner's included

    @property
    def expired(self) -> bool:
        return time.time() >= self.expires

    def to_json(self) -> bytes:
        fields = asdict(self)
        fields.pop("digest")  # the key names it
        return json.dumps(fields).encode()

    @classmethod
    def from_json(cls, digest: Digest, data: bytes) -> Lease:
        """A lease that cannot be read is taken for an expired one, so it can be taken over."""
        try:
            fields = json.loads(data)
            return cls(digest, str(fields["owner"]), str(fields["url"]), float(fields["expires"]),
                       float(fields.get("ttl", 0.0)), str(fields["token"]))
        except (ValueError, TypeError, KeyError):
            return cls(digest, owner="", url="", expires=0.0, ttl=0.0, token="")


class Leases:
    """Acquire, renew, release and take over fill leases (blocking calls; thread-safe)."""

    skew = 2.0  # seconds replicas' clocks may disagree by; a holder stops touching its lease this early
    takeover_ttl = 30.0  # a take-over marker older than this was left by a replica that died taking over

    def __init__(self, bucket: Bucket) -> None:
        self.bucket = bucket

    def acquire(self, digest: Digest, owner: str, url: str, ttl: float) -> Lease | None:
        """The blob's lease for ``owner``, or None when another replica holds it (expired or not)."""
        lease = Lease(digest, owner, url, time.time() + ttl, ttl, secrets.token_hex(16))
        if self.bucket.write_object(self.bucket.keys.lease(digest), lease.to_json(), if_absent=True):
            return lease
        held = self.read(digest)  # a put retried after its first try landed finds our own lease
        return lease if held is not None and held.token == lease.token else None

    def read(self, digest: Digest) -> Lease | None:
        data = self.bucket.read_object(self.bucket.keys.lease(digest))
        return None if data is None else Lease.from_json(digest, data)

    def renew(self, lease: Lease, ttl: float | None = None) -> Lease | None:
        """The lease with a later expiry, or None when it is no longer ours: stop claiming the fill."""
        if not self._still_ours(lease):
            return None
        ttl = lease.ttl if ttl is None else ttl
        renewed = replace(lease, expires=time.time() + ttl, ttl=ttl)
        self.bucket.write_object(self.bucket.keys.lease(lease.digest), renewed.to_json())
        return renewed

    def release(self, lease: Lease) -> bool:
        """Delete the lease if it is still ours; one about to expire is left to expire."""
        if not self._still_ours(lease):
            return False
        self.bucket.delete_object(self.bucket.keys.lease(lease.digest))
        return True

    def take_over(self, expired: Lease, owner: str, url: str, ttl: float) -> Lease | None:
        """The lease of a holder that stopped renewing (it died), for ``owner``; None when another
        replica takes it over first, or the holder renewed it after all."""
        with self._taking_over(expired, owner) as cleared:
            return self.acquire(expired.digest, owner, url, ttl) if cleared else None

    def clear(self, expired: Lease, owner: str) -> bool:
        """Remove a lease its holder left to expire (``gc``), under the take-over marker as
        ``take_over`` does, so that a replica taking it over at that moment is not undone."""
        with self._taking_over(expired, owner) as cleared:
            return cleared

    @contextlib.contextmanager
    def _taking_over(self, expired: Lease, owner: str) -> Iterator[bool]:
        """Holding the take-over marker, the expired lease deleted: True; False when another replica
        holds the marker, or the lease was renewed or replaced meanwhile."""
        marker = self.bucket.keys.takeover(expired.digest)
        if not self._claim(marker, owner):
            yield False
            return
        try:
            current = self.read(expired.digest)
            if current is not None and (current.token != expired.token or not current.expired):
                yield False
                return
            if current is not None:
                self.bucket.delete_object(self.bucket.keys.lease(expired.digest))
            yield True
        finally:
            self.bucket.delete_object(marker)

    def all(self) -> tuple[list[Lease], list[Digest]]:
        """Every fill lease in the bucket, expired ones too; and the digests of the take-over
        markers left by a replica that died while taking over (older than ``takeover_ttl``)."""
        leases, stale = [], []
        for entry in self.bucket.list_objects(self.bucket.keys.leases):
            if entry.key.endswith(".takeover"):
                digest = self.bucket.keys.lease_digest(entry.key.removesuffix(".takeover"))
                if digest is not None and _stale(self.bucket.read_object(entry.key)):
                    stale.append(digest)
            elif (digest := self.bucket.keys.lease_digest(entry.key)) is not None:
                lease = self.read(digest)
                if lease is not None:
                    leases.append(lease)
        return leases, stale

    def remove_marker(self, digest: Digest) -> None:
        self.bucket.delete_object(self.bucket.keys.takeover(digest))

    def check(self) -> None:
        """Raise ``StoreUnavailable`` if the store ignores ``If-None-Match: *`` on PutObject, which
        every lease relies on (an old MinIO, or a gateway that drops the header)."""
        key = f"{self.bucket.keys.leases}check-{secrets.token_hex(8)}"
        try:
            first = self.bucket.write_object(key, b"{}", if_absent=True)
            second = self.bucket.write_object(key, b"{}", if_absent=True)
        finally:
            self.bucket.delete_object(key)
        if not first or second:
            raise StoreUnavailable(
                f"the object store at {self.bucket.endpoint_url} ignores If-None-Match on PutObject, so replicas "
                f"cannot share fills through it: run one replica, or use a store that honours it")

    def _still_ours(self, lease: Lease) -> bool:
        current = self.read(lease.digest)
        return current is not None and current.token == lease.token and time.time() < current.expires - self.skew

    def _claim(self, marker: str, owner: str) -> bool:
        """Create the take-over marker; remove a stale one, for the next round to claim."""
        body = json.dumps({"owner": owner, "expires": time.time() + self.takeover_ttl}).encode()
        if self.bucket.write_object(marker, body, if_absent=True):
            return True
        if _stale(self.bucket.read_object(marker)):
            self.bucket.delete_object(marker)
        return False


def _stale(marker: bytes | None) -> bool:
    """Whether a take-over marker's time is up (one that cannot be read is); a gone one is not stale."""
    if marker is None:
        return False
    try:
        return time.time() >= float(json.loads(marker)["expires"])
    except (ValueError, TypeError, KeyError):
        return True
