"""The shared S3 bucket, its fill leases and replica heartbeats, against a real Ceph RGW."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from botocore.exceptions import ClientError

from mirror.bucket import Bucket, BucketLocation
from mirror.errors import StoreUnavailable
from mirror.leases import Lease, Leases
from mirror.names import Digest, Name
from mirror.roster import Replica, Roster
from mirror.store import hash_stream

from .s3 import S3Endpoint, free_port

MiB = 1 << 20
T = TypeVar("T")


def blob_file(path: Path, size: int, seed: int = 0) -> tuple[Digest, int]:
    """A file of ``size`` bytes that are not all alike; its digest, and an open read-only fd on it."""
    data = (hashlib.sha256(str(seed).encode()).digest() * (MiB // 32 + 1))[:MiB]
    with path.open("wb") as out:
        for offset in range(0, size, MiB):
            out.write(bytes([offset // MiB % 251]) + data[1 : min(MiB, size - offset)])
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while piece := source.read(8 * MiB):
            digest.update(piece)
    return Digest(digest.hexdigest()), os.open(path, os.O_RDONLY)


def uploaded(bucket: Bucket, tmp_path: Path, size: int, seed: int = 0) -> Digest:
    digest, fd = blob_file(tmp_path / f"blob-{seed}", size, seed)
    try:
        bucket.put_blob(digest, fd, size)
    finally:
        os.close(fd)
    return digest


def race(threads: int, work: Callable[[int], T]) -> list[T]:
    """``work(i)`` on ``threads`` threads, started together; the results in order."""
    start = threading.Barrier(threads)
    results: list[Any] = [None] * threads

    def run(i: int) -> None:
        start.wait()
        results[i] = work(i)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    return results


# -- the location ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "bucket", "prefix"), [
    pytest.param("s3://models", "models", "", id="bucket"),
    pytest.param("s3://models/", "models", "", id="bucket-slash"),
    pytest.param("s3://models/site/a", "models", "site/a/", id="prefix"),
    pytest.param(" s3://models//site//a/ ", "models", "site/a/", id="slashes-folded"),
])
def test_location_parse(text: str, bucket: str, prefix: str) -> None:
    location = BucketLocation.parse(text)
    assert (location.bucket, location.prefix) == (bucket, prefix)
    assert str(location) == f"s3://{bucket}/{prefix}"


@pytest.mark.parametrize(("text", "message"), [
    pytest.param("models", "'models' is not an S3 location: write it as s3://BUCKET or s3://BUCKET/PREFIX",
                 id="no-scheme"),
    pytest.param("https://models/x", "'https://models/x' is not an S3 location: write it as s3://BUCKET or "
                 "s3://BUCKET/PREFIX", id="http"),
    pytest.param("s3://Models", "'Models' in 's3://Models' is not a bucket name: use 3 to 63 lowercase letters, "
                 "digits, dots and hyphens, starting and ending with a letter or digit", id="uppercase"),
    pytest.param("s3://", "'' in 's3://' is not a bucket name: use 3 to 63 lowercase letters, digits, dots and "
                 "hyphens, starting and ending with a letter or digit", id="empty"),
    pytest.param("s3://models/a/../b", "the prefix 'a/../b' in 's3://models/a/../b' is not a folder path: use "
                 "names separated by /, without ., .., ?, # or \\", id="dotdot"),
    pytest.param("s3://models/a?x=1", "the prefix 'a?x=1' in 's3://models/a?x=1' is not a folder path: use "
                 "names separated by /, without ., .., ?, # or \\", id="query"),
])
def test_location_invalid(text: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        BucketLocation.parse(text)
    assert str(caught.value) == message


# -- check() --------------------------------------------------------------------------------------


def test_check_passes(bucket: Bucket) -> None:
    bucket.check()
    Leases(bucket).check()  # RGW honours If-None-Match on PutObject


def test_check_missing_bucket(rgw: S3Endpoint) -> None:
    missing = rgw.connect(BucketLocation("no-such-bucket"))
    with pytest.raises(StoreUnavailable) as caught:
        missing.check()
    assert str(caught.value) == (f"bucket 'no-such-bucket' does not exist at {rgw.url}: create it "
                                 f"(aws s3 mb s3://no-such-bucket) or name an existing one in the store location")


def aws_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **values: str) -> None:
    """Only these AWS settings in the environment: no ~/.aws files, no instance metadata."""
    for name in os.environ:
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    isolated = {"AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
                "AWS_EC2_METADATA_DISABLED": "true"}
    for name, value in {**isolated, **values}.items():
        monkeypatch.setenv(name, value)


def test_check_wrong_secret_from_the_environment(bucket: Bucket, rgw: S3Endpoint, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Configured as a user would: endpoint and keys in the environment, nothing passed in."""
    aws_environment(monkeypatch, tmp_path, AWS_ENDPOINT_URL_S3=rgw.url, AWS_ACCESS_KEY_ID=rgw.access_key,
                    AWS_SECRET_ACCESS_KEY=rgw.secret_key, AWS_DEFAULT_REGION=rgw.region)
    configured = Bucket.connect(bucket.location, path_style=True)
    assert configured.endpoint_url == rgw.url
    configured.check()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StoreUnavailable) as caught:
        Bucket.connect(bucket.location, path_style=True).check()
    assert str(caught.value) == (f"the S3 endpoint {rgw.url} refused the secret key (credentials from the "
                                 f"environment): check AWS_SECRET_ACCESS_KEY")


def test_check_no_credentials(bucket: Bucket, rgw: S3Endpoint, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    aws_environment(monkeypatch, tmp_path, AWS_ENDPOINT_URL=rgw.url)
    with pytest.raises(StoreUnavailable) as caught:
        Bucket.connect(bucket.location, path_style=True).check()
    assert str(caught.value) == (f"no S3 credentials for s3://{bucket.location.bucket}/site/: set AWS_ACCESS_KEY_ID "
                                 f"and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run where an instance role applies")


def test_check_unknown_access_key(bucket: Bucket, rgw: S3Endpoint) -> None:
    with pytest.raises(StoreUnavailable) as caught:
        rgw.connect(bucket.location, session=rgw.session("nobody", "nothing")).check()
    assert str(caught.value) == (f"the S3 endpoint {rgw.url} does not know the access key (credentials from the "
                                 f"caller): check AWS_ACCESS_KEY_ID")


def test_check_access_denied(bucket: Bucket, rgw: S3Endpoint) -> None:
    stranger = rgw.session(*rgw.add_user("stranger"))
    with pytest.raises(StoreUnavailable) as caught:
        rgw.connect(bucket.location, session=stranger).check()
    assert str(caught.value) == (f"access to bucket '{bucket.location.bucket}' at {rgw.url} is denied to these "
                                 f"credentials (from the caller): allow them to list, get, put and delete "
                                 f"objects in it")


def test_check_endpoint_unreachable(rgw: S3Endpoint) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(StoreUnavailable) as caught:
        Bucket.connect(BucketLocation("models", "a/"), endpoint_url=url, session=rgw.session()).check()
    assert str(caught.value) == (f"cannot reach the S3 endpoint {url} for s3://models/a/ (connection refused): "
                                 f"check AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) and that the object store is up")


# -- blobs ----------------------------------------------------------------------------------------


def test_blob_round_trip_small(bucket: Bucket, rgw: S3Endpoint, tmp_path: Path) -> None:
    digest, fd = blob_file(tmp_path / "blob", 3 * MiB + 5)
    progress: list[int] = []
    try:
        bucket.put_blob(digest, fd, 3 * MiB + 5, on_bytes=progress.append)
    finally:
        os.close(fd)
    assert progress == [3 * MiB + 5]
    assert bucket.blob_size(digest) == 3 * MiB + 5
    assert bucket.list_blobs() == {digest: 3 * MiB + 5}
    body = httpx.get(bucket.presign_blob(digest, 60)).content
    assert hashlib.sha256(body).hexdigest() == digest.hex
    keys = [entry["Key"] for entry in rgw.client().list_objects_v2(Bucket=bucket.location.bucket)["Contents"]]
    assert keys == [f"site/blobs/sha256-{digest.hex}"]  # Ollama's blob name, under the prefix
    bucket.delete_blob(digest)
    assert bucket.blob_size(digest) is None
    assert bucket.list_blobs() == {}


def test_blob_multipart_150mib(bucket: Bucket, rgw: S3Endpoint, tmp_path: Path) -> None:
    size = 150 * MiB
    digest, fd = blob_file(tmp_path / "blob", size)
    progress: list[int] = []
    started = time.monotonic()
    try:
        bucket.put_blob(digest, fd, size, on_bytes=progress.append)
    finally:
        os.close(fd)
    up = time.monotonic() - started
    assert sorted(progress) == [22 * MiB, 64 * MiB, 64 * MiB]
    head = rgw.client().head_object(Bucket=bucket.location.bucket, Key=bucket.keys.blob(digest))
    assert head["ContentLength"] == size and head["ETag"].endswith('-3"')  # three parts, put together

    started, sha = time.monotonic(), hashlib.sha256()
    with httpx.stream("GET", bucket.presign_blob(digest, 60)) as answer:
        assert answer.status_code == 200
        for piece in answer.iter_bytes(4 * MiB):
            sha.update(piece)
    down = time.monotonic() - started
    assert sha.hexdigest() == digest.hex
    print(f"\n150 MiB through RGW: up {size / 1e6 / up:.0f} MB/s ({up:.2f} s), "
          f"down {size / 1e6 / down:.0f} MB/s ({down:.2f} s)")


def test_presigned_url_range(bucket: Bucket, tmp_path: Path) -> None:
    digest = uploaded(bucket, tmp_path, 2 * MiB)
    data = (tmp_path / "blob-0").read_bytes()
    answer = httpx.get(bucket.presign_blob(digest, 60), headers={"Range": "bytes=1048570-1048585"})
    assert answer.status_code == 206
    assert answer.headers["content-range"] == f"bytes 1048570-1048585/{2 * MiB}"
    assert answer.content == data[1048570:1048586]


def test_presigned_url_tampered_or_expired_is_refused(bucket: Bucket, tmp_path: Path) -> None:
    digest, other = uploaded(bucket, tmp_path, 1000, seed=1), uploaded(bucket, tmp_path, 1000, seed=2)
    url = bucket.presign_blob(digest, 60)
    signature = url.rpartition("X-Amz-Signature=")[2]
    flipped = url.replace(signature, ("0" if signature[0] != "0" else "1") + signature[1:])
    assert httpx.get(flipped).status_code == 403
    assert httpx.get(url.replace(digest.hex, other.hex)).status_code == 403  # signed for another blob
    assert httpx.get(url.replace("X-Amz-Expires=60", "X-Amz-Expires=600")).status_code == 403
    short = bucket.presign_blob(digest, 1)
    time.sleep(2.1)
    assert httpx.get(short).status_code == 403


def test_presigned_url_with_credentials_is_refused(bucket: Bucket, tmp_path: Path) -> None:
    """A client's Authorization header must never reach the store: RGW refuses the pair outright."""
    digest = uploaded(bucket, tmp_path, 1000)
    url = bucket.presign_blob(digest, 60)
    assert httpx.get(url).status_code == 200
    assert httpx.get(url, headers={"Authorization": "Bearer registry-token"}).status_code == 400


class SmallParts(Bucket):
    multipart_threshold = part_size = 5 * MiB  # S3's smallest part
    part_workers = 2


class FailingPart:
    """The S3 client, except that one UploadPart fails as a store in trouble answers."""

    def __init__(self, inner: Any, fail_at: int) -> None:
        self.inner, self.fail_at, self.parts_sent = inner, fail_at, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def upload_part(self, **kwargs: Any) -> Any:
        if kwargs["PartNumber"] == self.fail_at:
            answer: Any = {"Error": {"Code": "InternalError", "Message": "injected"},
                           "ResponseMetadata": {"HTTPStatusCode": 500}}
            raise ClientError(answer, "UploadPart")
        self.parts_sent += 1
        return self.inner.upload_part(**kwargs)


def assert_nothing_left(bucket: Bucket, rgw: S3Endpoint, digest: Digest) -> None:
    assert bucket.blob_size(digest) is None
    assert rgw.client().list_multipart_uploads(Bucket=bucket.location.bucket).get("Uploads", []) == []


def test_multipart_failing_part_leaves_nothing(bucket: Bucket, rgw: S3Endpoint, tmp_path: Path) -> None:
    client = FailingPart(rgw.mirror_client(), fail_at=3)
    failing = SmallParts(bucket.location, client)
    digest, fd = blob_file(tmp_path / "blob", 40 * MiB)
    try:
        with pytest.raises(StoreUnavailable) as caught:
            failing.put_blob(digest, fd, 40 * MiB)
    finally:
        os.close(fd)
    assert str(caught.value) == (f"UploadPart 3 of site/blobs/sha256-{digest.hex} failed at {rgw.url}: "
                                 f"the object store answered 500 InternalError")
    assert client.parts_sent < 7  # the parts after the failure were not sent
    assert_nothing_left(bucket, rgw, digest)


def test_multipart_short_file_leaves_nothing(bucket: Bucket, rgw: S3Endpoint, tmp_path: Path) -> None:
    """A file that ends before the size it was given (truncated under us): the upload is aborted."""
    short = rgw.connect(bucket.location, SmallParts)
    digest, fd = blob_file(tmp_path / "blob", 12 * MiB)
    try:
        with pytest.raises(ValueError, match=f"the file ended at byte {12 * MiB}, before the {15 * MiB} bytes"):
            short.put_blob(digest, fd, 20 * MiB)
    finally:
        os.close(fd)
    assert_nothing_left(bucket, rgw, digest)


def test_store_errors_are_sentences(rgw: S3Endpoint) -> None:
    gone = rgw.connect(BucketLocation("no-such-bucket", "a/"))
    with pytest.raises(StoreUnavailable) as caught:
        gone.write_object("a/x", b"{}")
    assert str(caught.value) == f"PutObject a/x failed at {rgw.url}: the object store answered 404 NoSuchBucket"


def test_blob_read_streams_and_a_bad_one_moves_to_bad(bucket: Bucket, rgw: S3Endpoint, tmp_path: Path) -> None:
    digest = uploaded(bucket, tmp_path, 9 * MiB + 3)
    with bucket.read_blob(digest) as body:
        assert body is not None
        actual, size = hash_stream(body)
    assert (actual, size) == (digest.hex, 9 * MiB + 3)
    with bucket.read_blob(Digest("0" * 64)) as missing:
        assert missing is None
    assert bucket.quarantine_blob(digest) == f"site/bad/sha256-{digest.hex}"  # a server-side copy in parts
    assert bucket.blob_size(digest) is None
    bad = rgw.client().head_object(Bucket=bucket.location.bucket, Key=f"site/bad/sha256-{digest.hex}")
    assert bad["ContentLength"] == 9 * MiB + 3


def test_blob_objects_say_when_each_was_uploaded(bucket: Bucket, tmp_path: Path) -> None:
    before = time.time()
    digest = uploaded(bucket, tmp_path, 1000)
    entry = bucket.blob_objects()[digest]
    assert entry.key == bucket.keys.blob(digest) and entry.size == 1000
    assert before - 2 <= entry.modified <= time.time() + 2  # whole seconds, the store's clock


def test_unfinished_uploads_listed_sized_and_aborted(bucket: Bucket, rgw: S3Endpoint) -> None:
    s3, key = rgw.client(), bucket.keys.blob(DIGEST)
    upload_id = s3.create_multipart_upload(Bucket=bucket.location.bucket, Key=key)["UploadId"]
    for number in (1, 2):
        s3.upload_part(Bucket=bucket.location.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=b"x" * 1000)
    s3.create_multipart_upload(Bucket=bucket.location.bucket, Key="elsewhere/blob")  # not under the prefix
    [upload] = bucket.list_uploads()
    assert (upload.key, upload.upload_id) == (key, upload_id) and abs(upload.started - time.time()) < 60
    assert bucket.upload_size(upload) == 2000
    bucket.abort_upload(upload)
    assert bucket.list_uploads() == []
    assert bucket.upload_size(upload) == 0  # ended: no parts, and no error
    bucket.abort_upload(upload)


# -- manifests ------------------------------------------------------------------------------------


def test_manifest_round_trip_and_listing(bucket: Bucket, rgw: S3Endpoint) -> None:
    name = Name.parse("Team/Llama3.2")
    assert bucket.get_manifest("registry.ollama.ai", name, "latest") is None
    bucket.put_manifest("registry.ollama.ai", name, "latest", b'{"schemaVersion": 2}')
    bucket.put_manifest("host:5000", Name.parse("qwen2.5"), "7B", b"{}")
    rgw.client().put_object(Bucket=bucket.location.bucket, Key="site/manifests/README", Body=b"not a tag")
    assert bucket.get_manifest("registry.ollama.ai", name, "latest") == b'{"schemaVersion": 2}'
    assert sorted(bucket.list_manifests(), key=str) == [
        ("host:5000", Name("library", "qwen2.5"), "7b"),
        ("registry.ollama.ai", Name("team", "llama3.2"), "latest"),  # lowercased, as Ollama writes paths
    ]
    bucket.delete_manifest("registry.ollama.ai", name, "latest")
    assert bucket.get_manifest("registry.ollama.ai", name, "latest") is None
    assert bucket.list_manifests() == [("host:5000", Name("library", "qwen2.5"), "7b")]
    [entry] = bucket.manifest_objects().values()
    assert entry.key == "site/manifests/host:5000/library/qwen2.5/7b" and abs(entry.modified - time.time()) < 60


def test_pins(bucket: Bucket) -> None:
    name = Name.parse("Team/Llama3.2")
    bucket.set_pinned("registry.ollama.ai", name, "latest", True, b'{"by": "admin"}')
    bucket.set_pinned("host:5000", Name.parse("qwen2.5"), "7b", True)
    assert bucket.read_object("site/pins/registry.ollama.ai/team/llama3.2/latest") == b'{"by": "admin"}'
    assert bucket.list_pins() == {("registry.ollama.ai", Name("team", "llama3.2"), "latest"),
                                  ("host:5000", Name("library", "qwen2.5"), "7b")}
    bucket.set_pinned("registry.ollama.ai", name, "latest", False)
    assert bucket.list_pins() == {("host:5000", Name("library", "qwen2.5"), "7b")}


# -- leases ---------------------------------------------------------------------------------------

DIGEST = Digest("ab" * 32)


def test_lease_one_of_many_acquires(bucket: Bucket) -> None:
    leases = Leases(bucket)
    won = race(8, lambda i: leases.acquire(DIGEST, f"replica-{i}", f"http://replica-{i}:11434", 30))
    holders = [lease for lease in won if lease is not None]
    assert len(holders) == 1
    assert leases.read(DIGEST) == holders[0]
    assert leases.acquire(DIGEST, "late", "http://late:11434", 30) is None
    stored = json.loads(bucket.read_object(bucket.keys.lease(DIGEST)) or b"")
    assert set(stored) == {"owner", "url", "expires", "ttl", "token"}


def test_lease_renew_and_release_only_by_its_holder(bucket: Bucket) -> None:
    leases = Leases(bucket)
    lease = leases.acquire(DIGEST, "a", "http://a", 30)
    assert lease is not None
    impostor = replace(lease, token="0" * 32)  # the same owner, a holding of another time
    assert leases.renew(impostor) is None
    assert leases.release(impostor) is False
    assert leases.read(DIGEST) == lease
    renewed = leases.renew(lease, 60)
    assert renewed is not None and renewed.expires > lease.expires + 25
    assert leases.read(DIGEST) == renewed
    assert leases.release(renewed) is True
    assert leases.read(DIGEST) is None
    assert leases.renew(renewed) is None  # released: nothing left to renew


def test_lease_about_to_expire_is_left_to_expire(bucket: Bucket) -> None:
    """Within ``skew`` of its expiry a holder touches its lease no more: a taker may be about to."""
    leases = Leases(bucket)
    lease = leases.acquire(DIGEST, "a", "http://a", leases.skew / 2)
    assert lease is not None
    assert leases.renew(lease) is None
    assert leases.release(lease) is False
    assert leases.read(DIGEST) == lease


def expired_lease(leases: Leases) -> Lease:
    lease = leases.acquire(DIGEST, "dead", "http://dead", 0.2)
    assert lease is not None
    time.sleep(0.3)
    return lease


def test_lease_take_over_by_exactly_one(bucket: Bucket) -> None:
    leases = Leases(bucket)
    for _ in range(3):
        dead = expired_lease(leases)
        assert leases.read(DIGEST) == dead and dead.expired
        def take(i: int, dead: Lease = dead) -> Lease | None:
            return leases.take_over(dead, f"replica-{i}", f"http://replica-{i}", 30)

        taken = race(6, take)
        winners = [lease for lease in taken if lease is not None]
        assert len(winners) == 1, taken
        assert leases.read(DIGEST) == winners[0]
        assert bucket.read_object(bucket.keys.takeover(DIGEST)) is None  # the marker went with the take-over
        assert leases.take_over(dead, "late", "http://late", 30) is None  # the dead lease is gone already
        assert leases.release(winners[0])


def test_lease_take_over_refused_while_the_holder_lives(bucket: Bucket) -> None:
    leases = Leases(bucket)
    lease = leases.acquire(DIGEST, "alive", "http://alive", 30)
    assert lease is not None
    assert leases.take_over(lease, "eager", "http://eager", 30) is None
    assert leases.read(DIGEST) == lease


def test_lease_take_over_past_a_stale_marker(bucket: Bucket) -> None:
    """A replica that died while taking over left its marker: it is cleared, and the next try wins."""
    leases = Leases(bucket)
    dead = expired_lease(leases)
    marker = bucket.keys.takeover(DIGEST)
    bucket.write_object(marker, json.dumps({"owner": "busy", "expires": time.time() + 30}).encode())
    assert leases.take_over(dead, "b", "http://b", 30) is None  # another replica is taking over now
    assert bucket.read_object(marker) is not None
    bucket.write_object(marker, json.dumps({"owner": "died", "expires": time.time() - 1}).encode())
    assert leases.take_over(dead, "b", "http://b", 30) is None
    assert bucket.read_object(marker) is None
    taken = leases.take_over(dead, "b", "http://b", 30)
    assert taken is not None and leases.read(DIGEST) == taken


def test_lease_unreadable_counts_as_expired(bucket: Bucket) -> None:
    leases = Leases(bucket)
    bucket.write_object(bucket.keys.lease(DIGEST), b"not json")
    damaged = leases.read(DIGEST)
    assert damaged is not None and damaged.expired
    assert leases.take_over(damaged, "b", "http://b", 30) is not None


def test_lease_listing_and_clearing_an_expired_one(bucket: Bucket) -> None:
    """gc clears a lease its replica left to expire, never a live one, and finds stale take-over markers."""
    leases = Leases(bucket)
    dead = expired_lease(leases)
    alive = leases.acquire(Digest("cd" * 32), "alive", "http://alive", 30)
    assert alive is not None
    bucket.write_object(bucket.keys.takeover(Digest("ef" * 32)), json.dumps({"expires": time.time() - 1}).encode())
    bucket.write_object(bucket.keys.takeover(alive.digest), json.dumps({"expires": time.time() + 30}).encode())
    bucket.write_object(bucket.keys.gc_lock, b"{}")  # not a lease
    found, stale = leases.all()
    assert sorted(found, key=lambda lease: lease.owner) == [alive, dead]
    assert stale == [Digest("ef" * 32)]
    assert leases.clear(alive, "gc") is False  # held by another taker's marker
    bucket.delete_object(bucket.keys.takeover(alive.digest))
    assert leases.clear(alive, "gc") is False  # live
    assert leases.clear(dead, "gc") is True
    assert leases.read(DIGEST) is None and leases.read(alive.digest) == alive
    assert bucket.read_object(bucket.keys.takeover(DIGEST)) is None  # its marker went with it
    leases.remove_marker(Digest("ef" * 32))
    assert leases.all() == ([alive], [])


class IgnoresConditions(Bucket):
    """A store that drops If-None-Match, as an old MinIO or a careless gateway would."""

    def write_object(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        return super().write_object(key, data)


def test_lease_check_refuses_a_store_without_conditional_puts(bucket: Bucket, rgw: S3Endpoint) -> None:
    careless = rgw.connect(bucket.location, IgnoresConditions)
    with pytest.raises(StoreUnavailable) as caught:
        Leases(careless).check()
    assert str(caught.value) == (f"the object store at {rgw.url} ignores If-None-Match on PutObject, so replicas "
                                 f"cannot share fills through it: run one replica, or use a store that honours it")
    assert list(bucket.list_objects(bucket.keys.leases)) == []  # the probe cleaned up


# -- replica heartbeats ---------------------------------------------------------------------------


def test_replicas_announce_list_and_retire(bucket: Bucket) -> None:
    replicas = Roster(bucket)
    started = time.time()
    b = replicas.announce(Replica("b", "http://b:11434", "0.1.0", started, fills=(DIGEST,)))
    a = replicas.announce(Replica("a", "http://a:11434", "0.1.0", started))
    assert replicas.all() == [a, b]
    assert not a.gone and b.fills == (DIGEST,)
    bucket.write_object(bucket.keys.replica("a"), replace(a, last_seen=time.time() - 60).to_json())
    assert [r.gone for r in replicas.all()] == [True, False]
    replicas.retire("a")
    assert replicas.all() == [b]
    with pytest.raises(ValueError):
        replicas.announce(replace(a, id="../a"))
