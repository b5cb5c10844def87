"""The S3 bucket that mirror replicas share: every key decided in one place, every S3 call made here.

Under the prefix the bucket is laid out as an Ollama models directory, so an admin recognises it
(and ``aws s3 sync s3://BUCKET/PREFIX dir`` gives a directory Ollama can use as ``OLLAMA_MODELS``)::

    s3://<bucket>/<prefix>
      blobs/sha256-<hex>                             verified blobs only (uploaded after the sha256 check)
      manifests/<host>/<namespace>/<model>/<tag>     raw manifest bytes, as upstream sent them
      manifests-by-digest/sha256-<hex>               the same bytes by their digest (clients ask any replica)
      leases/sha256-<hex>                            fill lease, JSON: the one replica fetching it upstream
      leases/sha256-<hex>.takeover                   held for a moment by the replica taking over an expired lease
      leases/gc                                      held by the one ``ollama-mirror gc`` at work on the bucket
      replicas/<id>                                  each replica's heartbeat, JSON: id, advertise URL, version,
                                                     started, last seen, the fills it runs
      peer-token                                     the bearer token replicas present to each other (made once)
      pins/<host>/<namespace>/<model>/<tag>          a pinned tag (``ollama-mirror pin``): gc never evicts it
      removed/<host>/<namespace>/<model>/<tag>       a tag ``rm`` or gc removed, JSON {digest, at}: every replica
                                                     drops its own copy, and never uploads it again
      bad/sha256-<hex>                               a blob ``ollama-mirror verify`` found not to match its name

A blob is uploaded from a local file whose digest was checked: in one ``PutObject``, or in a
multipart upload that is aborted on any failure, so nothing is ever visible under ``blobs/`` but a
whole, verified blob. Over http, SigV4 signs each body's sha256 and the store checks it; over https,
TLS protects it.

Every method blocks (async callers go through ``asyncio.to_thread``), and a ``Bucket`` may be used
from many threads at once: boto3's clients are thread-safe. botocore signs and presigns; endpoint,
region and credentials come the standard AWS way (``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``~/.aws/config``, instance
roles). Above this module, code sees ``MirrorError``s only.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO, Self, cast

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
)

from .errors import DigestInvalid, NameInvalid, StoreFull, StoreUnavailable
from .names import Digest, Name, is_registry_host, parse_tag

log = logging.getLogger(__name__)

OnBytes = Callable[[int], None]  # progress: called with the bytes the store has acknowledged

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")  # S3's rules for new bucket names
_REPLICA_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_BLOB_FILE = re.compile(r"sha256-([0-9a-f]{64})")
PRESIGN_MAX = 7 * 24 * 3600  # SigV4's limit for a presigned URL
_CREDENTIALS_FROM = {  # botocore's names for where it found the credentials, as a user would say it
    "env": "the environment", "explicit": "the caller", "shared-credentials-file": "~/.aws/credentials",
    "config-file": "~/.aws/config", "iam-role": "the instance role", "container-role": "the container role",
    "assume-role": "an assumed role", "assume-role-with-web-identity": "a web identity", "sso": "AWS SSO",
}


@dataclass(frozen=True, slots=True)
class BucketLocation:
    """``s3://BUCKET/PREFIX``: ``prefix`` is ``""`` or ends in ``/`` (``a/b/``)."""

    bucket: str
    prefix: str = ""

    @classmethod
    def parse(cls, text: str) -> BucketLocation:
        rest = text.strip()
        if not rest.startswith("s3://"):
            raise ValueError(f"{text!r} is not an S3 location: write it as s3://BUCKET or s3://BUCKET/PREFIX")
        bucket, _, prefix = rest.removeprefix("s3://").partition("/")
        if not _BUCKET.fullmatch(bucket) or ".." in bucket:
            raise ValueError(f"{bucket!r} in {text!r} is not a bucket name: use 3 to 63 lowercase letters, "
                             f"digits, dots and hyphens, starting and ending with a letter or digit")
        parts = [part for part in prefix.split("/") if part]
        if any(part in (".", "..") for part in parts) or any(c in prefix for c in "?#\\"):
            raise ValueError(f"the prefix {prefix!r} in {text!r} is not a folder path: use names "
                             f"separated by /, without ., .., ?, # or \\")
        return cls(bucket, "".join(f"{part}/" for part in parts))

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


@dataclass(frozen=True, slots=True)
class BucketKeys:
    """The object keys of the layout above, under one prefix, and back."""

    prefix: str

    @property
    def blobs(self) -> str:
        return f"{self.prefix}blobs/"

    @property
    def manifests(self) -> str:
        return f"{self.prefix}manifests/"

    @property
    def leases(self) -> str:
        return f"{self.prefix}leases/"

    @property
    def peer_token(self) -> str:
        return f"{self.prefix}peer-token"

    @property
    def replicas(self) -> str:
        return f"{self.prefix}replicas/"

    @property
    def pins(self) -> str:
        return f"{self.prefix}pins/"

    @property
    def removed(self) -> str:
        return f"{self.prefix}removed/"

    @property
    def bad(self) -> str:
        return f"{self.prefix}bad/"

    @property
    def gc_lock(self) -> str:
        return f"{self.leases}gc"

    def blob(self, digest: Digest) -> str:
        return f"{self.blobs}sha256-{digest.hex}"

    def manifest(self, host: str, name: Name, tag: str) -> str:
        # Ollama lowercases every part of a manifest path, as layout.py does on disk.
        return f"{self.manifests}{_tag_path(host, name, tag)}"

    def pin(self, host: str, name: Name, tag: str) -> str:
        return f"{self.pins}{_tag_path(host, name, tag)}"

    def removal(self, host: str, name: Name, tag: str) -> str:
        return f"{self.removed}{_tag_path(host, name, tag)}"

    def manifest_by_digest(self, digest: Digest) -> str:
        return f"{self.prefix}manifests-by-digest/sha256-{digest.hex}"

    def lease(self, digest: Digest) -> str:
        return f"{self.leases}sha256-{digest.hex}"

    def takeover(self, digest: Digest) -> str:
        return f"{self.lease(digest)}.takeover"

    def replica(self, replica_id: str) -> str:
        if not _REPLICA_ID.fullmatch(replica_id):
            raise ValueError(f"replica id {replica_id[:100]!r} is not a name: use up to 64 letters, "
                             f"digits, _, . and -, starting with a letter or digit")
        return f"{self.replicas}{replica_id}"

    def blob_digest(self, key: str) -> Digest | None:
        """The digest of a key under ``blobs/``, or None for anything else kept there."""
        match = _BLOB_FILE.fullmatch(key.removeprefix(self.blobs))
        return Digest(match[1]) if match and key.startswith(self.blobs) else None

    def lease_digest(self, key: str) -> Digest | None:
        """The digest of a fill lease's key, or None for anything else under ``leases/``."""
        match = _BLOB_FILE.fullmatch(key.removeprefix(self.leases))
        return Digest(match[1]) if match and key.startswith(self.leases) else None

    def manifest_tag(self, key: str) -> tuple[str, Name, str] | None:
        """``(host, name, tag)`` of a key under ``manifests/``, or None for one that names no tag."""
        return self._tag(key, self.manifests)

    def removal_tag(self, key: str) -> tuple[str, Name, str] | None:
        """``(host, name, tag)`` of a key under ``removed/``, or None."""
        return self._tag(key, self.removed)

    def pin_tag(self, key: str) -> tuple[str, Name, str] | None:
        """``(host, name, tag)`` of a key under ``pins/``, or None."""
        return self._tag(key, self.pins)

    @staticmethod
    def _tag(key: str, folder: str) -> tuple[str, Name, str] | None:
        parts = key.removeprefix(folder).split("/")
        if not key.startswith(folder) or len(parts) != 4 or not is_registry_host(parts[0]):
            return None
        try:
            return parts[0], Name.parse(f"{parts[1]}/{parts[2]}"), parse_tag(parts[3])
        except NameInvalid:
            return None


def _tag_path(host: str, name: Name, tag: str) -> str:
    return f"{host.lower()}/{name.namespace.lower()}/{name.model.lower()}/{tag.lower()}"


@dataclass(frozen=True, slots=True)
class StoredObject:
    key: str
    size: int
    modified: float  # unix time it was last written (S3's LastModified)


@dataclass(frozen=True, slots=True)
class Upload:
    """A multipart upload not completed nor aborted: its parts use space no listing of objects shows."""

    key: str
    upload_id: str
    started: float  # unix time


class _Slice(io.RawIOBase):
    """``size`` bytes of ``fd`` from ``offset``, read with ``os.pread``: a body botocore can hash,
    send and rewind for a retry, while other threads read other slices of the same descriptor."""

    def __init__(self, fd: int, offset: int, size: int) -> None:
        super().__init__()
        self.fd, self.offset, self.size, self.pos = fd, offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        self.pos = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.size}[whence] + pos
        return self.pos

    def read(self, n: int | None = -1) -> bytes:
        left = self.size - self.pos
        n = left if n is None or n < 0 else min(n, left)
        if n <= 0:
            return b""
        data = os.pread(self.fd, n, self.offset + self.pos)
        if not data:
            raise ValueError(f"the file ended at byte {self.offset + self.pos}, before the "
                             f"{self.offset + self.size} bytes the upload was given")
        self.pos += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def client_config(path_style: bool) -> Config:
    """Settings that work on Ceph RGW, MinIO, AWS S3 and R2. Checksums only where an operation
    requires one (RGW 16.2 fails PutObject over https with boto3's default flexible checksums), and
    SigV4 for presigned URLs too (boto3 presigns with SigV2 against a custom endpoint; R2 has no SigV2)."""
    return Config(
        signature_version="s3v4",
        s3={"addressing_style": "path" if path_style else "auto"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        retries={"max_attempts": 2, "mode": "standard"},
        max_pool_connections=32,
        # botocore's 60 s, three times, held a cold manifest 2 minutes on a store that stopped answering
        connect_timeout=3,
        read_timeout=8,
    )


class Bucket:
    """Blobs, manifests and small shared objects in one bucket, under one prefix."""

    multipart_threshold = 64 << 20  # below this, one PutObject
    part_size = 64 << 20
    part_workers = 4  # parts in flight at once, per upload

    def __init__(self, location: BucketLocation, client: Any, credentials_from: str = "unknown") -> None:
        self.location = location
        self.keys = BucketKeys(location.prefix)
        self._client = client
        self._credentials_from = credentials_from  # "the environment", "~/.aws/credentials", ...

    @classmethod
    def connect(cls, location: BucketLocation, *, endpoint_url: str | None = None, path_style: bool = False,
                session: boto3.Session | None = None) -> Self:
        """A client configured the standard AWS way; ``endpoint_url`` overrides the configured one."""
        session = session or boto3.Session()
        client = session.client("s3", endpoint_url=endpoint_url, config=client_config(path_style))
        credentials = session.get_credentials()  # resolved once already, by the client
        method = getattr(credentials, "method", None) or "nowhere"
        return cls(location, client, _CREDENTIALS_FROM.get(method, method))

    @property
    def endpoint_url(self) -> str:
        """The endpoint requests go to (for logs, and for the network policy to allow)."""
        return str(self._client.meta.endpoint_url)

    # -- health ----------------------------------------------------------------

    def check(self) -> None:
        """Raise ``StoreUnavailable`` with one line naming the cause and the fix, unless the bucket
        is there and these credentials may use it."""
        try:
            self._client.head_bucket(Bucket=self.location.bucket)
        except ClientError as exc:
            raise StoreUnavailable(self._head_refused(exc)) from exc
        except NoCredentialsError as exc:
            raise StoreUnavailable(self._no_credentials()) from exc
        except BotoCoreError as exc:
            raise StoreUnavailable(
                f"cannot reach the S3 endpoint {self.endpoint_url} for {self.location} ({_reason(exc)}): check "
                f"AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) and that the object store is up") from exc

    def _no_credentials(self) -> str:
        return (f"no S3 credentials for {self.location}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                f"or AWS_PROFILE, or run where an instance role applies")

    def _head_refused(self, exc: ClientError) -> str:
        """HeadBucket's answer has no body, so a 403 does not say whether the key is unknown, its
        secret wrong, or the bucket forbidden to it: a listing of the bucket, which has a body, does."""
        bucket, endpoint = self.location.bucket, self.endpoint_url
        status, code = _status(exc), _code(exc)
        if status == 404 or code == "NoSuchBucket":
            return (f"bucket {bucket!r} does not exist at {endpoint}: create it (aws s3 mb s3://{bucket}) "
                    f"or name an existing one in the store location")
        if status == 301:
            region = _headers(exc).get("x-amz-bucket-region", "another region")
            return (f"bucket {bucket!r} is in {region}, not in {self._client.meta.region_name}: "
                    f"set AWS_DEFAULT_REGION={region}")
        if status in (400, 403) and code in ("400", "403"):
            try:
                self._client.list_objects_v2(Bucket=bucket, Prefix=self.location.prefix, MaxKeys=1)
            except ClientError as listing:
                code = _code(listing)
            except BotoCoreError:
                pass
        source = self._credentials_from
        if code == "InvalidAccessKeyId":
            return (f"the S3 endpoint {endpoint} does not know the access key (credentials from {source}): "
                    f"check AWS_ACCESS_KEY_ID")
        if code == "SignatureDoesNotMatch":
            return (f"the S3 endpoint {endpoint} refused the secret key (credentials from {source}): "
                    f"check AWS_SECRET_ACCESS_KEY")
        if status == 403 or code in ("AccessDenied", "403"):
            return (f"access to bucket {bucket!r} at {endpoint} is denied to these credentials (from {source}): "
                    f"allow them to list, get, put and delete objects in it")
        return f"the S3 endpoint {endpoint} answered {status} {code} for bucket {bucket!r}"

    # -- blobs -----------------------------------------------------------------

    def blob_size(self, digest: Digest) -> int | None:
        """Size of the blob in the bucket, or None when it is not there."""
        key = self.keys.blob(digest)
        try:
            with self._errors(f"HeadObject {key}", missing_ok=True):
                return int(self._client.head_object(Bucket=self.location.bucket, Key=key)["ContentLength"])
        except _Missing:
            return None

    def put_blob(self, digest: Digest, fd: int, size: int, on_bytes: OnBytes | None = None) -> None:
        """Upload ``size`` bytes of ``fd`` (a local, already verified file) as the blob."""
        key, started = self.keys.blob(digest), time.monotonic()
        if size < self.multipart_threshold:
            with self._errors(f"PutObject {key}"):
                self._client.put_object(Bucket=self.location.bucket, Key=key, Body=_Slice(fd, 0, size),
                                        ContentLength=size, ContentType="application/octet-stream")
            parts = 1
            if on_bytes is not None:
                on_bytes(size)
        else:
            parts = self._put_multipart(digest, key, fd, size, on_bytes)
        seconds = time.monotonic() - started
        log.info("store put digest=%s bytes=%d parts=%d seconds=%.1f mb_s=%.1f", digest.short, size, parts,
                 seconds, size / 1e6 / max(seconds, 1e-6))

    def _put_multipart(self, digest: Digest, key: str, fd: int, size: int, on_bytes: OnBytes | None) -> int:
        """Parts of ``part_size``, ``part_workers`` at a time; aborted on any failure, after the parts
        in flight have ended, so that no part outlives the upload."""
        bucket = self.location.bucket
        part_size = max(self.part_size, -(-size // 10_000))  # S3 takes at most 10,000 parts
        offsets = range(0, size, part_size)
        with self._errors(f"CreateMultipartUpload {key}"):
            upload_id = self._client.create_multipart_upload(
                Bucket=bucket, Key=key, ContentType="application/octet-stream")["UploadId"]

        def upload(number: int, offset: int) -> dict[str, Any]:
            length = min(part_size, size - offset)
            with self._errors(f"UploadPart {number} of {key}"):
                answer = self._client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number,
                                                  Body=_Slice(fd, offset, length), ContentLength=length)
            if on_bytes is not None:
                on_bytes(length)
            return {"PartNumber": number, "ETag": answer["ETag"]}

        try:
            pool = ThreadPoolExecutor(self.part_workers, thread_name_prefix=f"put {digest.short}")
            try:
                futures = [pool.submit(upload, number, offset) for number, offset in enumerate(offsets, 1)]
                wait(futures, return_when=FIRST_EXCEPTION)
            finally:
                pool.shutdown(wait=True, cancel_futures=True)  # parts in flight end; the rest never start
            parts = [future.result() for future in futures]  # parts start in order: the failure raises first
            with self._errors(f"CompleteMultipartUpload {key}"):
                self._client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id,
                                                       MultipartUpload={"Parts": parts})
        except BaseException as exc:
            log.warning("store put aborted digest=%s size=%d reason=%s", digest.short, size, exc)
            self._abort(key, upload_id)
            raise
        return len(parts)

    def _abort(self, key: str, upload_id: str) -> None:
        try:
            self._client.abort_multipart_upload(Bucket=self.location.bucket, Key=key, UploadId=upload_id)
        except (BotoCoreError, ClientError) as exc:  # the bucket's lifecycle rule, or gc, has to remove it
            log.warning("store abort failed key=%s upload=%s reason=%s", key, upload_id, exc)

    def presign_blob(self, digest: Digest, expires_seconds: int) -> str:
        """A URL anyone may GET (with a Range) for ``expires_seconds``, without credentials."""
        if not 0 < expires_seconds <= PRESIGN_MAX:
            raise ValueError(f"a presigned URL lasts 1 to {PRESIGN_MAX} seconds, not {expires_seconds}")
        with self._errors(f"presigning {self.keys.blob(digest)}"):
            return str(self._client.generate_presigned_url(
                "get_object", Params={"Bucket": self.location.bucket, "Key": self.keys.blob(digest)},
                ExpiresIn=expires_seconds))

    def list_blobs(self) -> dict[Digest, int]:
        """Every blob in the bucket and its size."""
        return {digest: entry.size for digest, entry in self.blob_objects().items()}

    def blob_objects(self) -> dict[Digest, StoredObject]:
        """Every blob in the bucket, with its size and when it was uploaded."""
        found = {}
        for entry in self.list_objects(self.keys.blobs):
            digest = self.keys.blob_digest(entry.key)
            if digest is not None:
                found[digest] = entry
        return found

    def delete_blob(self, digest: Digest) -> None:
        self.delete_object(self.keys.blob(digest))

    @contextmanager
    def read_blob(self, digest: Digest) -> Iterator[BinaryIO | None]:
        """The blob's bytes as a stream, for hashing or a verified copy; None when it is not there.
        A failure mid-way raises ``StoreUnavailable``."""
        key = self.keys.blob(digest)
        try:
            with self._errors(f"GetObject {key}", missing_ok=True):
                body = self._client.get_object(Bucket=self.location.bucket, Key=key)["Body"]
        except _Missing:
            yield None
            return
        with body:
            yield cast(BinaryIO, _Body(body, lambda: self._errors(f"GetObject {key}")))

    def quarantine_blob(self, digest: Digest) -> str:
        """Move the blob to ``bad/`` (kept there for a look, out of every replica's way); its new key.
        A server-side copy: the bytes do not pass through here (in parts above 8 MiB, for any size)."""
        key, bad = self.keys.blob(digest), f"{self.keys.bad}sha256-{digest.hex}"
        with self._errors(f"CopyObject {key} to {bad}"):
            self._client.copy({"Bucket": self.location.bucket, "Key": key}, self.location.bucket, bad)
        self.delete_object(key)
        return bad

    # -- unfinished multipart uploads --------------------------------------------

    def list_uploads(self) -> list[Upload]:
        """Every multipart upload under the prefix that was neither completed nor aborted."""
        found = []
        with self._errors(f"ListMultipartUploads {self.location.prefix}"):
            pages = self._client.get_paginator("list_multipart_uploads").paginate(Bucket=self.location.bucket,
                                                                                  Prefix=self.location.prefix)
            for page in pages:
                for entry in page.get("Uploads", []):
                    found.append(Upload(entry["Key"], entry["UploadId"], entry["Initiated"].timestamp()))
        return found

    def upload_size(self, upload: Upload) -> int:
        """Bytes of the parts uploaded so far (0 for an upload that has ended since it was listed)."""
        try:
            with self._errors(f"ListParts {upload.key}", missing_ok=True):
                pages = self._client.get_paginator("list_parts").paginate(
                    Bucket=self.location.bucket, Key=upload.key, UploadId=upload.upload_id)
                return sum(int(part["Size"]) for page in pages for part in page.get("Parts", []))
        except _Missing:
            return 0

    def abort_upload(self, upload: Upload) -> None:
        """Abort it, and free its parts; one that has ended already is not an error."""
        try:
            with self._errors(f"AbortMultipartUpload {upload.key}", missing_ok=True):
                self._client.abort_multipart_upload(Bucket=self.location.bucket, Key=upload.key,
                                                    UploadId=upload.upload_id)
        except _Missing:
            pass

    # -- manifests -------------------------------------------------------------

    def get_manifest(self, host: str, name: Name, tag: str) -> bytes | None:
        return self.read_object(self.keys.manifest(host, name, tag))

    def put_manifest(self, host: str, name: Name, tag: str, data: bytes) -> None:
        """The tag, for every replica; a removal of it said earlier no longer holds."""
        self.write_object(self.keys.manifest(host, name, tag), data)
        self.delete_object(self.keys.removal(host, name, tag))

    def delete_manifest(self, host: str, name: Name, tag: str) -> None:
        self.delete_object(self.keys.manifest(host, name, tag))

    def list_manifests(self) -> list[tuple[str, Name, str]]:
        """``(host, name, tag)`` of every manifest in the bucket."""
        return list(self.manifest_objects())

    def manifest_objects(self) -> dict[tuple[str, Name, str], StoredObject]:
        """Every manifest in the bucket by ``(host, name, tag)``, with when it was last written."""
        found = {}
        for entry in self.list_objects(self.keys.manifests):
            tag = self.keys.manifest_tag(entry.key)
            if tag is not None:
                found[tag] = entry
        return found

    # -- pins ------------------------------------------------------------------

    def mark_removed(self, host: str, name: Name, tag: str, digest: Digest) -> None:
        """Say that the tag (as ``digest``) was removed: replicas drop their copies of it."""
        note = json.dumps({"digest": str(digest), "at": time.time()}).encode()
        self.write_object(self.keys.removal(host, name, tag), note)

    def removed_tags(self) -> set[tuple[str, Name, str]]:
        """Every tag said removed (lowercased, as manifest keys are)."""
        found = (self.keys.removal_tag(entry.key) for entry in self.list_objects(self.keys.removed))
        return {tag for tag in found if tag is not None}

    def removed_digest(self, host: str, name: Name, tag: str) -> Digest | None:
        """The manifest digest the tag had when it was removed, or None (not removed, or unreadable)."""
        data = self.read_object(self.keys.removal(host, name, tag))
        with contextlib.suppress(ValueError, KeyError, TypeError, DigestInvalid):
            return Digest.parse(json.loads(data or b"")["digest"])
        return None

    def list_pins(self) -> set[tuple[str, Name, str]]:
        """``(host, name, tag)`` of every pinned tag (lowercased, as manifest keys are)."""
        found = (self.keys.pin_tag(entry.key) for entry in self.list_objects(self.keys.pins))
        return {tag for tag in found if tag is not None}

    def set_pinned(self, host: str, name: Name, tag: str, pinned: bool, note: bytes = b"{}") -> None:
        """Pin the tag (``note``: who pinned it, when) or unpin it."""
        key = self.keys.pin(host, name, tag)
        if pinned:
            self.write_object(key, note)
        else:
            self.delete_object(key)

    # -- small objects (manifests, leases, heartbeats) -------------------------

    def read_object(self, key: str) -> bytes | None:
        """The object's bytes, or None when there is none."""
        try:
            with self._errors(f"GetObject {key}", missing_ok=True):
                body = self._client.get_object(Bucket=self.location.bucket, Key=key)["Body"]
                with body:
                    return bytes(body.read())
        except _Missing:
            return None

    def write_object(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        """Write the object; with ``if_absent``, only if no object has that key (``If-None-Match: *``,
        which RGW, MinIO, S3 and R2 honour on PutObject), and say whether it was written."""
        extra = {"IfNoneMatch": "*"} if if_absent else {}
        try:
            with self._errors(f"PutObject {key}", taken_ok=if_absent):
                self._client.put_object(Bucket=self.location.bucket, Key=key, Body=data, **extra)
        except _Taken:
            return False
        return True

    def delete_object(self, key: str) -> None:
        """Remove the object; removing one that is not there is not an error (S3 answers 204)."""
        with self._errors(f"DeleteObject {key}"):
            self._client.delete_object(Bucket=self.location.bucket, Key=key)

    def list_objects(self, prefix: str) -> Iterator[StoredObject]:
        """Every object whose key starts with ``prefix``."""
        with self._errors(f"ListObjectsV2 {prefix}"):
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.location.bucket,
                                                                           Prefix=prefix)
            for page in pages:
                for entry in page.get("Contents", []):
                    yield StoredObject(entry["Key"], int(entry["Size"]), entry["LastModified"].timestamp())

    # -- errors ----------------------------------------------------------------

    @contextmanager
    def _errors(self, action: str, *, missing_ok: bool = False, taken_ok: bool = False) -> Iterator[None]:
        """botocore's exceptions as ``MirrorError``s (or ``_Missing``/``_Taken``, where they are answers)."""
        try:
            yield
        except ClientError as exc:
            status, code = _status(exc), _code(exc)
            if missing_ok and (status == 404 or code in ("NoSuchKey", "404")):
                raise _Missing from None
            if taken_ok and status == 412:
                raise _Taken from None
            if code == "QuotaExceeded":
                raise StoreFull(f"{action} failed: the quota of bucket {self.location.bucket!r} is used up; "
                                f"raise it, or evict models (ollama-mirror gc --max-size SIZE)") from exc
            raise StoreUnavailable(f"{action} failed at {self.endpoint_url}: the object store answered "
                                   f"{status} {code}") from exc
        except NoCredentialsError as exc:
            raise StoreUnavailable(f"{action} failed: {self._no_credentials()}") from exc
        except BotoCoreError as exc:
            raise StoreUnavailable(f"{action} failed: cannot reach the object store at {self.endpoint_url} "
                                   f"({_reason(exc)})") from exc


class _Body(io.RawIOBase):
    """An object's body as a raw stream (``readinto``, which ``hash_stream`` reads with), whose
    failures mid-way are ``MirrorError``s as every other call's."""

    def __init__(self, body: Any, errors: Callable[[], Any]) -> None:
        super().__init__()
        self._body, self._errors = body, errors

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        with self._errors():
            data = self._body.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class _Missing(Exception):
    """No object under the key: an answer, not an error."""


class _Taken(Exception):
    """A conditional write found the key taken (412): an answer, not an error."""


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _headers(exc: ClientError) -> dict[str, str]:
    return dict(exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {}))


def _reason(exc: BaseException) -> str:
    """The operating system's words for a failed connection ("connection refused"), if it said any."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror.lower()
        seen = seen.__cause__ or seen.__context__ or getattr(seen, "kwargs", {}).get("error")
    return type(exc).__name__
